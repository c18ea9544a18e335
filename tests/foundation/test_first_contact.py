"""The mistakes a new user makes get a straight answer: `CMD --help`, YAML key typos, `load`'s summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cronium_fab.cli import build_namespace, normalize_argv
from cronium_fab.db.engine import Database
from cronium_fab.errors import ConfigError
from cronium_fab.registry import load_inventory

COMMANDS = sorted(build_namespace().task_names)


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cronium_fab", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CRONIUM_FAB_WORKER": "off"}, timeout=60)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_shows_its_help_after_its_name(command: str, flag: str, tmp_path: Path) -> None:
    out = _cli([command, flag], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: cronium-fab [--core-opts] " + command), out.stdout[:200]
    assert "Docstring:" in out.stdout and "error" not in out.stderr
    assert not (tmp_path / ".local").exists(), "showing help must not create a database"


def test_argv_normalization() -> None:
    commands = set(COMMANDS)
    assert normalize_argv(["p", "load", "--help"], commands) == ["p", "--help", "load"]
    assert normalize_argv(["p", "-d", "known-hosts-add", "x", "-h"], commands) == ["p", "-d", "--help", "known-hosts-add"]
    assert normalize_argv(["p", "known-hosts-add", "a", "b", "--yes", "c"], commands) == [
        "p", "known-hosts-add", "--host", "a,b,c", "--yes"]
    assert normalize_argv(["p", "known-hosts-add", "--event", "3", "--yes"], commands) == [
        "p", "known-hosts-add", "--event", "3", "--yes"]
    assert normalize_argv(["p", "run-event", "--id", "1", "--", "--help"], commands) == [
        "p", "run-event", "--id", "1", "--", "--help"]


def test_yaml_key_typos_say_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump({"servers": [{"name": "a", "adress": "10.0.0.1", "usernme": "x"}]}))
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.init()
    try:
        with pytest.raises(ConfigError) as err:
            load_inventory(db, path)
        assert "'adress': did you mean 'address'?" in str(err.value)
        assert "'usernme': did you mean 'username'?" in str(err.value)
        path.write_text(yaml.safe_dump({"server": []}))
        with pytest.raises(ConfigError, match="did you mean 'servers'"):
            load_inventory(db, path)
    finally:
        db.dispose()


def test_load_summary_says_created_updated_unchanged(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", "ab" * 32)
    path = tmp_path / "inv.yaml"
    doc = {"servers": [{"name": "web1", "address": "10.0.0.1", "password": "pw1"}, {"name": "web2", "address": "10.0.0.2"}],
           "events": [{"name": "report", "type": "BASH", "script": "df -h", "servers": ["web1"], "env": {"K": "v"}}],
           "variables": {"owner": "ops"}}
    path.write_text(yaml.safe_dump(doc))
    first = load_inventory(db, path)
    assert first.created == ["server web1", "server web2", "event report", "variable owner"]
    second = load_inventory(db, path)      # secrets re-encrypted with new IVs are still "unchanged"
    assert second.created == [] and second.updated == [] and len(second.unchanged) == 4
    doc["servers"][1]["port"] = 2222       # type: ignore[index]
    doc["events"][0]["env"] = {"K": "w"}   # type: ignore[index]
    path.write_text(yaml.safe_dump(doc))
    third = load_inventory(db, path)
    assert third.updated == ["server web2", "event report"]
    assert third.summary().splitlines() == ["updated 2: server web2, event report",
                                            "unchanged 2: server web1, variable owner"]


@pytest.mark.parametrize(("event", "message"), [
    ({"timeout": -5}, "timeout must be a whole number of seconds of at least 1"),
    ({"timeout": 0}, "at least 1"),
    ({"timeout": True}, "at least 1"),
    ({"timeout": {"value": 5, "unit": "WEEKS"}}, "timeout unit 'WEEKS'"),
    ({"script": 42}, "script must be text, not 42"),
    ({"script": [1, 2]}, "script must be text"),
    ({"servers": "demo-1"}, "servers must be a list, not 'demo-1' (e.g. servers: [web1, web2])"),
    ({"servers": [1]}, "servers lists server names"),
    ({"env": {"DEBUG": True}}, "env.DEBUG must be text, a number or {from_env: NAME}"),
    ({"env": ["A=1"]}, "env must be a mapping"),
])
def test_load_checks_every_field_s_type(event: dict[str, object], message: str, tmp_path: Path) -> None:
    spec = {"name": "e", "type": "BASH", "script": "true", "servers": ["demo-1"], **event}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump({"servers": [{"name": "demo-1", "address": "10.0.0.1"}], "events": [spec]}))
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.init()
    try:
        with pytest.raises(ConfigError) as err:
            load_inventory(db, path)
        assert message in str(err.value) and "events[0]" in str(err.value)
        from sqlalchemy import func, select

        from cronium_fab.db.models import Server

        with db.session() as s:   # all or nothing: the valid server before the bad event is not kept
            assert s.scalar(select(func.count()).select_from(Server)) == 0
    finally:
        db.dispose()


@pytest.mark.parametrize(("server", "message"), [
    ({"port": "22"}, "port must be a whole number"),
    ({"port": True}, "port must be a whole number"),
    ({"port": 70000}, "between 1 and 65535"),
    ({"address": 10}, "address must be text"),
    ({"archived": "yes"}, "archived must be true/false"),
])
def test_load_checks_server_fields(server: dict[str, object], message: str, tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump({"servers": [{"name": "a", "address": "10.0.0.1", **server}]}))
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.init()
    try:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_inventory(db, path)
    finally:
        db.dispose()
