"""A database as Cronium makes it (its migrations' schema, tests/data/cronium_schema.json), seeded
with plain SQL the way Cronium's app writes its rows (secrets encrypted by Node's own crypto, as
the app's encryption service does, older rows in plain text): `cronium-fab run-event --id N`
runs, and every row it writes is one Cronium's app can show."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from cronium_fab.db.engine import Database
from cronium_fab.settings import Settings
from cronium_fab.testing.hosts import DevHost
from tests.conftest import cronium_db_url
from tests.cronium_schema import columns
from tests.run.conftest import Fleet, trust

pytestmark = pytest.mark.ssh

KEY_HEX = "5c" * 32

# Cronium's app encrypts with Node's crypto (lib/encryption-service.ts): AES-256-GCM, 16-byte IV,
# AAD "cronium-server-encryption", base64(iv || ciphertext || tag). The plaintext comes on stdin.
NODE_ENCRYPT = """
const crypto = require('crypto');
const key = Buffer.from(process.env.ENCRYPTION_KEY, 'hex');
const input = require('fs').readFileSync(0, 'utf8');
const iv = crypto.randomBytes(16);
const cipher = crypto.createCipheriv('aes-256-gcm', key, iv);
cipher.setAAD(Buffer.from('cronium-server-encryption'));
const encrypted = cipher.update(input, 'utf8', 'hex') + cipher.final('hex');
process.stdout.write(Buffer.concat([iv, Buffer.from(encrypted, 'hex'), cipher.getAuthTag()]).toString('base64'));
"""

SCRIPT = """
import os
assert os.environ["API_TOKEN"] == "tok-" + "9f2c71", "the encrypted env var did not arrive"
cronium.setVariable("last_region", os.environ["REGION"])
cronium.output({"region": os.environ["REGION"], "legacy": os.environ["LEGACY"], "count": cronium.getVariable("count"),
                "server": cronium.event()["serverName"]})
print("ran on", cronium.event()["serverName"])
"""


TOKEN = "tok-9f2c71"


def app_encrypt(value: str) -> str:
    node = "/usr/bin/node"
    if not Path(node).exists():
        pytest.fail("Node.js is needed to encrypt the way Cronium's app does (/usr/bin/node)", pytrace=False)
    return subprocess.run([node, "-e", NODE_ENCRYPT], input=value, capture_output=True, text=True, check=True,
                          env={"ENCRYPTION_KEY": KEY_HEX}).stdout


@pytest.fixture
def cronium_fleet(postgres_url: str, settings_paths: dict[str, Path], signed_runner: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    for url in cronium_db_url(postgres_url):
        db = Database(url)
        monkeypatch.setenv("ENCRYPTION_KEY", KEY_HEX)
        try:
            yield Fleet(db, Settings(database_url=url, runner_path=signed_runner, helper_mode="bundled",
                                     **settings_paths))  # type: ignore[arg-type]
        finally:
            db.dispose()


@pytest.fixture
def settings_paths(signing_keys: tuple[Path, Path], tmp_path: Path) -> dict[str, Path]:
    return {"data_dir": tmp_path / "data", "signing_key": signing_keys[0], "public_key": signing_keys[1],
            "payload_dir": tmp_path / "payloads"}


def seed_like_the_app(db: Database, hosts: list[DevHost]) -> tuple[int, list[int]]:
    """users, servers, events, event_servers, env_vars, user_variables as the app inserts them:
    only the columns it sets, everything else left to Cronium's defaults."""
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, email, username, first_name) "
                          "VALUES ('user_2xk9', 'ops@example.test', 'ops', 'Ops')"))
        server_ids = []
        for i, h in enumerate(hosts):
            # the first server's key encrypted (today's app), the second's in plain text (older rows)
            key = app_encrypt(h.private_key_text) if i == 0 else h.private_key_text
            server_ids.append(conn.execute(text(
                "INSERT INTO servers (user_id, name, address, ssh_key, username, port, shared) "
                "VALUES ('user_2xk9', :name, :address, :key, :user, :port, false) RETURNING id"),
                {"name": h.name, "address": h.address, "key": key, "user": h.user, "port": h.port}).scalar_one())
        event_id = conn.execute(text(
            "INSERT INTO events (user_id, name, type, content, status, run_location, timeout_value, timeout_unit, "
            "trigger_type) VALUES ('user_2xk9', 'Nightly report', 'PYTHON', :script, 'ACTIVE', 'REMOTE', 2, "
            "'MINUTES', 'MANUAL') RETURNING id"), {"script": SCRIPT}).scalar_one()
        for sid in server_ids:
            conn.execute(text("INSERT INTO event_servers (event_id, server_id) VALUES (:e, :s)"),
                         {"e": event_id, "s": sid})
        conn.execute(text("INSERT INTO env_vars (event_id, key, value) VALUES (:e, 'REGION', :v), (:e, 'LEGACY', 'x1'), "
                          "(:e, 'API_TOKEN', :t)"), {"e": event_id, "v": app_encrypt("eu-west-1"), "t": app_encrypt(TOKEN)})
        conn.execute(text("INSERT INTO user_variables (user_id, key, value) VALUES ('user_2xk9', 'count', '41')"))
    return event_id, server_ids


def rows(db: Database, sql: str, **params: Any) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def assert_satisfies_cronium(table: str, row: dict[str, Any]) -> None:
    """Every column Cronium declares NOT NULL holds a value (the database checked the rest)."""
    for name, column in columns(table).items():
        assert column.nullable or row[name] is not None, f"{table}.{name} is NULL"


@pytest.mark.parametrize("mode", ["bundled", "api"])
def test_run_without_job_on_cronium_database(cronium_fleet: Fleet, ssh_hosts, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    for h in hosts:
        trust(cronium_fleet.settings, h)
    db = cronium_fleet.db
    event_id, server_ids = seed_like_the_app(db, hosts)
    env = dict(cronium_fleet.env(), CRONIUM_FAB_HELPER_MODE=mode, ENCRYPTION_KEY=KEY_HEX)
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(event_id), "--json"],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "SUCCESS"
    assert [h["output"] for h in doc["hosts"]] == [
        {"region": "eu-west-1", "legacy": "x1", "count": 41, "server": h.name} for h in hosts]
    assert {h["helper_mode"] for h in doc["hosts"]} == {mode}

    (job,) = rows(db, "SELECT * FROM jobs")
    assert_satisfies_cronium("jobs", job)
    (log,) = rows(db, "SELECT * FROM logs")
    assert job["id"] == doc["job_id"] and job["id"].startswith("job_") and len(job["id"]) == 16
    assert (job["event_id"], job["user_id"], job["type"], job["status"]) == (event_id, "user_2xk9", "SCRIPT", "completed")
    assert job["priority"] == 1 and job["attempts"] == 1 and job["scheduled_for"] is not None
    assert job["payload"] == {
        "executionLogId": log["id"], "input": {}, "script": {"type": "PYTHON", "content": SCRIPT},
        "target": {"serverId": server_ids[0], "serverIds": server_ids}, "timeout": {"value": 2, "unit": "MINUTES"}}
    owner = job["metadata"].pop("owner")   # ours: who ran it (a killed controller's rows are closed by the next)
    assert job["metadata"] == {"eventName": "Nightly report", "triggeredBy": "manual", "logId": log["id"]}
    assert set(owner) == {"host", "pid", "since"}
    assert job["result"]["status"] == "SUCCESS" and job["completed_at"] is not None

    assert_satisfies_cronium("logs", log)
    assert (log["event_id"], log["job_id"], log["status"], log["successful"]) == (event_id, job["id"], "SUCCESS", True)
    assert (log["event_name"], log["event_type"], log["user_id"]) == ("Nightly report", "PYTHON", "user_2xk9")

    execs = rows(db, "SELECT * FROM executions ORDER BY server_id")
    assert [(e["server_id"], e["status"], e["exit_code"]) for e in execs] == [(s, "completed", 0) for s in server_ids]
    for e in execs:
        assert_satisfies_cronium("executions", e)
        assert e["id"].startswith(f"exec_{job['id']}_{e['server_id']}_")
    (variable,) = rows(db, "SELECT * FROM user_variables WHERE key = 'last_region'")
    assert variable["value"] == "eu-west-1"
    (event,) = rows(db, "SELECT * FROM events")
    assert (event["execution_count"], event["success_count"], event["failure_count"]) == (1, 1, 0)
    deployments = rows(db, "SELECT * FROM runner_deployments ORDER BY server_id")
    assert [d["server_id"] for d in deployments] == server_ids and {d["status"] for d in deployments} == {"active"}
    (payload,) = rows(db, "SELECT * FROM runner_payloads")
    assert_satisfies_cronium("runner_payloads", payload)
    for secret in (hosts[0].private_key_text, TOKEN):
        for row in (job, log, *execs):
            assert secret not in json.dumps(row, default=str)


def test_wrong_encryption_key_is_refused_before_any_row(cronium_fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    event_id, _ = seed_like_the_app(cronium_fleet.db, hosts)
    env = dict(cronium_fleet.env(), ENCRYPTION_KEY="a7" * 32)
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(event_id)],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "does not decrypt with ENCRYPTION_KEY" in out.stderr and "BEGIN" not in out.stderr
    for table in ("jobs", "logs", "executions"):
        assert rows(cronium_fleet.db, f"SELECT * FROM {table}") == []
