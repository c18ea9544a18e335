"""A database created by Cronium's own migrations (plain DDL, not our models) works unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from cronium_fab.db.engine import Database
from cronium_fab.db.queries import resolve_event, user_variables
from cronium_fab.payloads import PayloadStore
from cronium_fab.settings import Settings

# Cronium's schema as its drizzle migrations create it (CRONIUM.md §1), with columns we never map.
CRONIUM_DDL = """
CREATE TABLE users (id varchar(255) PRIMARY KEY, email varchar(255), username varchar(255), first_name varchar(255),
  role varchar(50) DEFAULT 'USER', created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE servers (id SERIAL PRIMARY KEY, user_id varchar(255) NOT NULL REFERENCES users(id), name varchar(255) NOT NULL,
  address varchar(255) NOT NULL, ssh_key text, password text, username varchar(255) DEFAULT 'root', port integer DEFAULT 22,
  online boolean DEFAULT false, last_checked timestamp, shared boolean DEFAULT false, is_archived boolean DEFAULT false,
  archived_at timestamp, archive_reason text, created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE events (id SERIAL PRIMARY KEY, user_id varchar(255) NOT NULL REFERENCES users(id), name varchar(255) NOT NULL,
  description text, short_name varchar(255), type varchar(50) NOT NULL, content text, http_method varchar(50), http_url text,
  http_headers JSONB, http_body text, tool_action_config JSONB, status varchar(50) NOT NULL, run_location varchar(50) DEFAULT 'LOCAL',
  server_id integer REFERENCES servers(id), timeout_value integer DEFAULT 30, timeout_unit varchar(50) DEFAULT 'SECONDS',
  retries integer DEFAULT 0, payload_version integer DEFAULT 1, last_run_at timestamp, next_run_at timestamp,
  success_count integer DEFAULT 0, failure_count integer DEFAULT 0, execution_count integer DEFAULT 0, max_executions integer DEFAULT 0,
  schedule_number integer DEFAULT 1, schedule_unit varchar(50) DEFAULT 'MINUTES', tags JSONB DEFAULT '[]',
  created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE env_vars (id SERIAL PRIMARY KEY, event_id integer NOT NULL REFERENCES events(id), key varchar(255) NOT NULL,
  value varchar(255) NOT NULL, created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE event_servers (id SERIAL PRIMARY KEY, event_id integer NOT NULL REFERENCES events(id) ON DELETE CASCADE,
  server_id integer NOT NULL REFERENCES servers(id) ON DELETE CASCADE, created_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE runner_payloads (id SERIAL PRIMARY KEY, event_id integer NOT NULL REFERENCES events(id) ON DELETE CASCADE,
  event_version integer NOT NULL, payload_path text NOT NULL, checksum_path text NOT NULL, payload_size integer NOT NULL,
  checksum text NOT NULL, created_at timestamp DEFAULT CURRENT_TIMESTAMP, is_active boolean DEFAULT true);
CREATE TABLE runner_deployments (id SERIAL PRIMARY KEY, server_id integer NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
  runner_version text NOT NULL, runner_path text NOT NULL, checksum text NOT NULL, deployed_at timestamp DEFAULT CURRENT_TIMESTAMP,
  last_used timestamp, status varchar(50) DEFAULT 'active');
CREATE TABLE jobs (id varchar(50) PRIMARY KEY, event_id integer REFERENCES events(id), user_id varchar(255) NOT NULL REFERENCES users(id),
  type varchar(50) NOT NULL, status varchar(50) NOT NULL DEFAULT 'queued', priority integer DEFAULT 0, payload JSONB NOT NULL,
  scheduled_for timestamp DEFAULT CURRENT_TIMESTAMP, orchestrator_id varchar(255), started_at timestamp, completed_at timestamp,
  result JSONB, attempts integer DEFAULT 0, last_error text, metadata JSONB, created_at timestamp DEFAULT CURRENT_TIMESTAMP,
  updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE executions (id varchar(100) PRIMARY KEY, job_id varchar(50) NOT NULL REFERENCES jobs(id), server_id integer,
  server_name varchar(255), status varchar(50) NOT NULL DEFAULT 'queued', started_at timestamp, completed_at timestamp,
  exit_code integer, output text, error text, metadata JSONB, setup_started_at timestamp, setup_completed_at timestamp,
  execution_started_at timestamp, execution_completed_at timestamp, cleanup_started_at timestamp, cleanup_completed_at timestamp,
  setup_duration integer, execution_duration integer, cleanup_duration integer, total_duration integer, execution_metadata JSONB,
  created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE logs (id SERIAL PRIMARY KEY, event_id integer REFERENCES events(id), workflow_id integer, job_id varchar(50) REFERENCES jobs(id),
  execution_id varchar(100) REFERENCES executions(id), status varchar(50) NOT NULL, output text, start_time timestamp NOT NULL,
  end_time timestamp, duration integer, execution_duration integer, setup_duration integer, successful boolean, event_name varchar(255),
  event_type varchar(50), retries integer DEFAULT 0, error text, user_id varchar(255), exit_code integer,
  created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE user_variables (id SERIAL PRIMARY KEY, user_id varchar(255) NOT NULL REFERENCES users(id), key varchar(255) NOT NULL,
  value text NOT NULL, description text, created_at timestamp DEFAULT CURRENT_TIMESTAMP, updated_at timestamp DEFAULT CURRENT_TIMESTAMP,
  UNIQUE (user_id, key));
"""


def _apply_ddl(db: Database) -> None:
    ddl = CRONIUM_DDL
    if db.dialect == "sqlite":
        ddl = ddl.replace("SERIAL PRIMARY KEY", "INTEGER PRIMARY KEY AUTOINCREMENT").replace("JSONB", "JSON")
    with db.engine.begin() as conn:
        for stmt in filter(str.strip, ddl.split(";")):
            conn.execute(text(stmt))


@pytest.fixture
def cronium_db(empty_db_url: str) -> Iterator[Database]:
    db = Database(empty_db_url)
    _apply_ddl(db)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, email) VALUES ('user_abc', 'a@b.c')"))
        conn.execute(text("INSERT INTO servers (user_id, name, address, username, port, ssh_key) "
                          "VALUES ('user_abc', 'prod-1', '10.0.0.1', 'deploy', 2222, '-----BEGIN OPENSSH PRIVATE KEY-----')"))
        conn.execute(text("INSERT INTO servers (user_id, name, address, is_archived) VALUES ('user_abc', 'gone', '10.0.0.2', true)"))
        conn.execute(text("INSERT INTO events (user_id, name, type, content, status, run_location) "
                          "VALUES ('user_abc', 'Backup', 'PYTHON', 'print(1)', 'ACTIVE', 'REMOTE')"))
        conn.execute(text("INSERT INTO event_servers (event_id, server_id) VALUES (1, 1), (1, 2)"))
        conn.execute(text("INSERT INTO env_vars (event_id, key, value) VALUES (1, 'REGION', 'eu')"))
        conn.execute(text("INSERT INTO user_variables (user_id, key, value) VALUES ('user_abc', 'count', '3')"))
    yield db
    db.dispose()


def test_db_init_on_cronium_database_changes_nothing(cronium_db: Database) -> None:
    assert cronium_db.init() == []
    cronium_db.check()


def test_resolution_and_payloads_on_cronium_schema(cronium_db: Database, settings: Settings) -> None:
    with cronium_db.session() as s:
        r = resolve_event(s, 1)
        assert user_variables(s, "user_abc") == {"count": 3}
    assert [(x.name, x.address, x.port, x.username) for x in r.servers] == [("prod-1", "10.0.0.1", 2222, "deploy")]
    assert [x.name for x in r.skipped] == ["gone"] and r.env == {"REGION": "eu"}
    store = PayloadStore(cronium_db, settings.payload_dir, signing_key=settings.signing_key, public_key=settings.public_key)
    built = store.build(1)
    assert built.version == 1
    loaded = store.load_verified(1)
    assert loaded.content.sha256 == built.sha256 and not loaded.rebuilt
    with cronium_db.engine.connect() as conn:
        assert conn.execute(text("SELECT is_active, checksum FROM runner_payloads")).one() == (True, built.sha256)
