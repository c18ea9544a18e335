"""`cronium-fab load FILE.yaml`: standalone users register servers, events, links, env, variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import yaml
from sqlalchemy import select

from cronium_fab.db.crypto import decrypt
from cronium_fab.db.engine import Database
from cronium_fab.db.models import EnvVar, Event, Server, UserVariable
from cronium_fab.db.queries import resolve_event
from cronium_fab.errors import ConfigError
from cronium_fab.registry import load_inventory

KEY_HEX = "bb" * 32


def _inventory(tmp_path: Path, **changes: object) -> Path:
    key = tmp_path / "id_test"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nkeytext\n-----END OPENSSH PRIVATE KEY-----\n")
    doc = {
        "servers": [
            {"name": "web1", "address": "10.0.0.1", "username": "deploy", "ssh_key_file": str(key)},
            {"name": "web2", "address": "10.0.0.2", "port": 2222, "password_env": "WEB2_PW"},
        ],
        "events": [{"name": "report", "type": "BASH", "script": "df -h", "timeout": {"value": 2, "unit": "MINUTES"},
                    "servers": ["web1", "web2"], "env": {"REGION": "eu", "TOKEN": {"from_env": "REPORT_TOKEN"}}}],
        "variables": {"threshold": 90, "owner": "ops"},
    }
    doc.update(changes)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_load_registers_everything_and_resolves(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB2_PW", "pw2")
    monkeypatch.setenv("REPORT_TOKEN", "tok")
    report = load_inventory(db, _inventory(tmp_path))
    with db.session() as s:
        ev = resolve_event(s, report.events["report"])
        variables = {v.key: v.value for v in s.scalars(select(UserVariable))}
    assert [(x.name, x.address, x.port, x.username) for x in ev.servers] == [
        ("web1", "10.0.0.1", 22, "deploy"), ("web2", "10.0.0.2", 2222, "root")]
    assert "keytext" in (ev.servers[0].private_key or "") and ev.servers[1].password == "pw2"
    assert ev.env == {"REGION": "eu", "TOKEN": "tok"} and ev.timeout_seconds == 120
    assert variables == {"threshold": "90", "owner": "ops"}


def test_load_twice_upserts_by_name(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB2_PW", "pw2")
    monkeypatch.setenv("REPORT_TOKEN", "tok")
    first = load_inventory(db, _inventory(tmp_path))
    second = load_inventory(db, _inventory(tmp_path, events=[{"name": "report", "type": "PYTHON", "script": "print(1)",
                                                              "servers": ["web1"]}]))
    assert first.servers == second.servers and first.events == second.events
    with db.session() as s:
        assert len(s.scalars(select(Server)).all()) == 2
        ev = s.scalars(select(Event)).one()
        assert (ev.type, ev.content) == ("PYTHON", "print(1)")
        assert s.scalars(select(EnvVar)).all() == []
        assert [x.name for x in resolve_event(s, ev.id).servers] == ["web1"]


def test_secrets_are_encrypted_like_cronium_when_key_is_set(db: Database, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", KEY_HEX)
    monkeypatch.setenv("WEB2_PW", "pw2")
    monkeypatch.setenv("REPORT_TOKEN", "tok")
    load_inventory(db, _inventory(tmp_path))
    with db.session() as s:
        web2 = s.scalars(select(Server).where(Server.name == "web2")).one()
        token = s.scalars(select(EnvVar).where(EnvVar.key == "TOKEN")).one()
    assert web2.password != "pw2" and decrypt(web2.password, bytes.fromhex(KEY_HEX), what="x") == "pw2"
    assert token.value != "tok" and decrypt(token.value, bytes.fromhex(KEY_HEX), what="x") == "tok"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"servers": [{"address": "x"}]}, "'name' is required"),
        ({"events": [{"name": "e", "type": "RUBY"}]}, "not BASH, PYTHON or NODEJS"),
        ({"events": [{"name": "e", "type": "BASH", "script": "true", "servers": ["nope"]}]},
         "server 'nope' is not defined"),
        ({"events": [{"name": "e", "type": "BASH", "script": "true", "timeout": "soon"}]}, "timeout must be"),
        ({"events": [{"name": "e", "type": "BASH", "scrpt": "true"}]}, "unknown key.*scrpt"),
        ({"events": [{"name": "e", "type": "BASH"}]}, "'script' is required"),
        ({"events": [{"name": "e", "type": "HTTP_REQUEST", "script": "x"}]}, "run in Cronium itself"),
        ({"serverz": []}, "unknown key.*serverz"),
    ],
)
def test_bad_inventory_is_refused_and_writes_nothing(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      change: dict[str, object], message: str) -> None:
    monkeypatch.setenv("WEB2_PW", "pw2")
    monkeypatch.setenv("REPORT_TOKEN", "tok")
    with pytest.raises(ConfigError, match=message):
        load_inventory(db, _inventory(tmp_path, **change))
    with db.session() as s:
        assert s.scalars(select(Server)).all() == [] and s.scalars(select(Event)).all() == []


def test_missing_env_for_secret_is_a_clear_error(db: Database, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WEB2_PW is not set"):
        load_inventory(db, _inventory(tmp_path))


def test_load_command(db: Database, tmp_path: Path) -> None:
    path = _inventory(tmp_path, servers=[{"name": "a", "address": "10.1.1.1"}], events=[], variables={})
    env = dict(os.environ, CRONIUM_DATABASE_URL=db.url)
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "load", str(path)], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "created 1: server a\n"      # a human summary, not raw JSON
    again = subprocess.run([sys.executable, "-m", "cronium_fab", "load", str(path), "--json"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["servers"] == {"a": ANY} and doc["unchanged"] == ["server a"] and doc["created"] == []
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "load", str(tmp_path / "missing.yaml")], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr
