"""Data layer on SQLite and PostgreSQL: db-init, event → servers resolution, credentials, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from cronium_fab.db.crypto import encrypt
from cronium_fab.db.engine import Database
from cronium_fab.db.models import Server
from cronium_fab.db.queries import decode_variable, encode_variable, resolve_event, user_variables
from cronium_fab.errors import ConfigError, CredentialError, EventNotFound, EventNotRunnable, NoServers
from cronium_fab.testing.factories import add_event, add_server

KEY_HEX = "aa" * 32


def test_db_init_creates_cronium_tables_and_is_idempotent(empty_db_url: str) -> None:
    db = Database(empty_db_url)
    created = db.init()
    assert {"events", "servers", "event_servers", "jobs", "executions", "logs", "user_variables",
            "runner_payloads", "runner_deployments", "env_vars", "users"} <= set(created)
    assert db.init() == []
    db.dispose()


def test_db_init_leaves_existing_tables_untouched(empty_db_url: str) -> None:
    db = Database(empty_db_url)
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE users (id varchar(255) PRIMARY KEY, email varchar(255), extra_col text)"))
        conn.execute(text("INSERT INTO users (id, email, extra_col) VALUES ('keep', 'k@x', 'mine')"))
    created = db.init()
    assert "users" not in created and "events" in created
    cols = {c["name"] for c in inspect(db.engine).get_columns("users")}
    assert "extra_col" in cols and "username" not in cols
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT extra_col FROM users WHERE id='keep'")).scalar() == "mine"
    db.dispose()


def test_event_servers_resolution_with_archived_skipped(db: Database) -> None:
    a = add_server(db, "a")
    b = add_server(db, "b", archived=True)
    c = add_server(db, "c")
    legacy = add_server(db, "legacy")
    ev = add_event(db, servers=[a, b, c], server_id=legacy, env={"K": "v"})
    with db.session() as s:
        r = resolve_event(s, ev)
    assert [x.name for x in r.servers] == ["a", "c"]
    assert [(x.name, x.reason) for x in r.skipped] == [("b", "server is archived")]
    assert r.env == {"K": "v"} and r.interpreter == "bash"


def test_falls_back_to_events_server_id(db: Database) -> None:
    legacy = add_server(db, "legacy")
    ev = add_event(db, server_id=legacy)
    with db.session() as s:
        assert [x.name for x in resolve_event(s, ev).servers] == ["legacy"]


def test_unknown_event(db: Database) -> None:
    with db.session() as s, pytest.raises(EventNotFound, match="event 999 not found"):
        resolve_event(s, 999)


@pytest.mark.parametrize("etype", ["HTTP_REQUEST", "TOOL_ACTION"])
def test_http_and_tool_events_are_refused_for_ssh(db: Database, etype: str) -> None:
    ev = add_event(db, type=etype, servers=[add_server(db)])
    with db.session() as s, pytest.raises(EventNotRunnable, match="only BASH, PYTHON and NODEJS"):
        resolve_event(s, ev)


def test_event_with_no_servers_says_why(db: Database) -> None:
    ev = add_event(db, servers=[add_server(db, "old", archived=True)])
    with db.session() as s, pytest.raises(NoServers, match="old .*archived"):
        resolve_event(s, ev)
    ev2 = add_event(db, name="lonely")
    with db.session() as s, pytest.raises(NoServers, match="no server"):
        resolve_event(s, ev2)


def test_encrypted_credentials_and_env_are_decrypted(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", KEY_HEX)
    key = bytes.fromhex(KEY_HEX)
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n-----END OPENSSH PRIVATE KEY-----\n"
    sid = add_server(db, ssh_key=encrypt(pem, key), password=encrypt("pw", key))
    ev = add_event(db, servers=[sid], env={"TOKEN": encrypt("t0ken-value", key), "PLAIN": "legacy"})
    with db.session() as s:
        r = resolve_event(s, ev)
    assert r.servers[0].private_key == pem and r.servers[0].password == "pw"
    assert r.env == {"TOKEN": "t0ken-value", "PLAIN": "legacy"}
    assert "xyz" not in repr(r) and "t0ken" not in repr(r)


def test_undecryptable_key_is_an_error_naming_the_server(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", KEY_HEX)
    sid = add_server(db, "db-primary", ssh_key=encrypt("-----BEGIN KEY-----", bytes(32)))
    ev = add_event(db, servers=[sid])
    with db.session() as s, pytest.raises(CredentialError, match="'db-primary'"):
        resolve_event(s, ev)


def test_wrong_encryption_key_length(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", "abcd")
    ev = add_event(db, servers=[add_server(db)])
    with db.session() as s, pytest.raises(ConfigError, match="64 hexadecimal"):
        resolve_event(s, ev)


def test_variables_round_trip_as_text(db: Database) -> None:
    from cronium_fab.db.models import UserVariable
    from cronium_fab.testing.factories import add_user

    add_user(db)
    values = {"s": "hello", "n": 42, "f": 1.5, "b": True, "z": None, "l": [1, "x"], "o": {"a": {"b": "é"}}}
    with db.session() as s:
        for k, v in values.items():
            s.add(UserVariable(user_id="u1", key=k, value=encode_variable(v)))
    with db.session() as s:
        assert user_variables(s, "u1") == values
        assert s.scalars(select(UserVariable.value).where(UserVariable.key == "s")).one() == "hello"
    assert decode_variable("not json {") == "not json {"


def test_unreachable_database_is_a_clear_error_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, CRONIUM_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "events"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot connect to the database" in out.stderr and "Traceback" not in out.stderr
    env["CRONIUM_DATABASE_URL"] = "mysql+nodriver://x"
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "events"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_server_rows_keep_cronium_column_names(db: Database) -> None:
    add_server(db, "n1")
    cols = {c["name"] for c in inspect(db.engine).get_columns("servers")}
    assert {"ssh_key", "password", "username", "port", "is_archived", "archived_at"} <= cols
    with db.session() as s:
        assert s.scalars(select(Server.name)).all() == ["n1"]


def test_embedded_database_is_private_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        db = Database(f"sqlite:///{tmp_path / 'data' / 'cronium.db'}")
        db.init()
        with db.session() as s:
            s.execute(text("SELECT 1"))
    finally:
        os.umask(old)
    for f in (tmp_path / "data").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    db.dispose()


@pytest.mark.parametrize("db_url", ["postgresql", "cronium"], indirect=True)   # SQLite has no row locks
def test_a_frozen_process_cannot_hold_postgresql_row_locks_for_ever(db: Database) -> None:
    """A serve worker frozen (SIGSTOP) inside a short transaction would keep its job row locked,
    and every other worker's reapers skip locked rows: PostgreSQL ends such a session."""
    with db.engine.connect() as conn:
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "30s"


def test_json_columns_round_trip_and_are_jsonb_on_postgresql(db: Database) -> None:
    """Cronium's JSON columns (``jsonb`` on PostgreSQL) keep nested values, and a key of one can be
    read in SQL (``->>`` / ``json_extract``), on every database."""
    from cronium_fab.db.models import Job
    from cronium_fab.testing.factories import add_user

    add_user(db)
    ev = add_event(db, servers=[add_server(db)])
    payload = {"input": {"n": 1, "l": [1, "é", None], "deep": {"ok": True}}, "script": {"type": "BASH"}}
    with db.session() as s:
        s.add(Job(id="job_json", event_id=ev, user_id="u1", type="SCRIPT", payload=payload, result={"status": "ok"}))
    with db.session() as s:
        job = s.get(Job, "job_json")
        assert job is not None and job.payload == payload and job.metadata_ == {}
        assert s.scalars(select(Job.result["status"].as_string()).where(Job.id == "job_json")).one() == "ok"
    if db.dialect == "postgresql":
        with db.engine.connect() as c:
            types = set(c.execute(text(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 'jobs' "
                "AND table_schema = current_schema() AND column_name IN ('payload', 'result', 'metadata')")).scalars())
        assert types == {"jsonb"}


def test_a_run_on_sqlite_does_not_load_the_postgresql_dialect(tmp_path: Path) -> None:
    """The embedded database's start-up stays light: SQLite never imports SQLAlchemy's PostgreSQL
    dialect (the JSON columns pick ``jsonb`` only when a PostgreSQL engine asks)."""
    code = (
        "import sys\n"
        "from cronium_fab.db.engine import Database\n"
        "from cronium_fab.db.queries import resolve_event\n"
        "from cronium_fab.records import RunRecorder\n"
        "from cronium_fab.testing.factories import add_event, add_server\n"
        f"db = Database('sqlite:///{tmp_path / 'c.db'}'); db.init()\n"
        "ev = add_event(db, servers=[add_server(db)])\n"
        "with db.session() as s: resolve_event(s, ev)\n"
        "ctx = RunRecorder(db).start(event_id=ev, event_name='ev', event_type='BASH', user_id='u1', job_id=None,"
        " input_data={'x': 1})\n"
        "print(sorted(m for m in sys.modules if m.startswith('sqlalchemy.dialects.postgresql')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
