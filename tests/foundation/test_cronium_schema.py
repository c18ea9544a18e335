"""Our models against Cronium's schema as its migrations make it (tests/data/cronium_schema.json):
no drift, column by column; db-init makes Cronium's tables; the test flavour is faithful."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.schema import DefaultClause

from cronium_fab.db.engine import Database
from cronium_fab.db.models import Base
from cronium_fab.db.queries import resolve_event
from cronium_fab.testing.factories import add_event, add_server
from tests.conftest import _pg_schema_url, cronium_db_url
from tests.cronium_schema import SCHEMA_FILE, columns, constraints, cronium_tables, differences, read_tables

PG = postgresql.dialect()  # type: ignore[no-untyped-call]

# Where db-init differs from Cronium on purpose (definition -> why). Nothing else may differ.
ON_PURPOSE = {
    "FOREIGN KEY (role_id) REFERENCES roles(id)":
        "roles is Cronium's RBAC table; we never read it, so db-init does not make it, nor an FK to it",
    "FOREIGN KEY (workflow_id) REFERENCES workflows(id)":
        "workflows are run by Cronium itself; db-init does not make that table, nor an FK to it",
}


def _sql(column: Column[object]) -> tuple[str, str | None]:
    """(type, DEFAULT) of a model column as PostgreSQL would show them in information_schema."""
    type_ = column.type.compile(dialect=PG).lower().replace("varchar", "character varying")
    if column.primary_key and column.autoincrement is True:
        return type_, f"nextval('{column.table.name}_{column.name}_seq'::regclass)"
    default = column.server_default
    if default is None:
        return type_, None
    assert isinstance(default, DefaultClause)
    arg = default.arg
    sql = arg if isinstance(arg, str) else str(arg.compile(dialect=PG))  # type: ignore[union-attr]
    if sql.startswith("'"):  # PostgreSQL shows a literal default with a cast to the column's type
        sql += "::" + ("character varying" if type_.startswith("character varying") else type_)
    return type_, sql


def model_drift(table: Table) -> list[str]:
    """Every difference between one model table and Cronium's, naming the column."""
    want = columns(table.name)
    out = []
    for column in table.columns:
        theirs = want.get(column.name)
        if theirs is None:
            out.append(f"{table.name}.{column.name}: not a column of Cronium's")
            continue
        type_, default = _sql(column)
        nullable = bool(column.nullable) and not column.primary_key
        if type_ != theirs.type:
            out.append(f"{table.name}.{column.name}: type {type_}, Cronium's is {theirs.type}")
        if nullable != theirs.nullable:
            out.append(f"{table.name}.{column.name}: {'NULL' if nullable else 'NOT NULL'}, Cronium's is "
                       f"{'NULL' if theirs.nullable else 'NOT NULL'}")
        if default != theirs.default:
            out.append(f"{table.name}.{column.name}: DEFAULT {default}, Cronium's is DEFAULT {theirs.default}")
    out += [f"{table.name}.{name}: missing from the model (Cronium has it)" for name in want if name not in table.columns]
    return out


def test_models_have_cronium_columns_exactly() -> None:
    """Name, NULL/NOT NULL, server DEFAULT and type of every column of every table we map."""
    drift = [line for table in Base.metadata.sorted_tables for line in model_drift(table)]
    assert drift == [], "models differ from Cronium's schema:\n" + "\n".join(drift)


def test_drift_is_reported_by_column() -> None:
    """Removing a default from a model column is caught, and the message names the column."""
    scheduled_for = Base.metadata.tables["jobs"].c.scheduled_for
    saved = scheduled_for.server_default
    scheduled_for.server_default = None
    try:
        drift = model_drift(Base.metadata.tables["jobs"])
    finally:
        scheduled_for.server_default = saved
    assert drift == ["jobs.scheduled_for: DEFAULT None, Cronium's is DEFAULT CURRENT_TIMESTAMP"]


def test_every_not_null_column_without_default_is_mapped() -> None:
    """A column we leave to its default must have one; NOT NULL without a default we must fill."""
    for table in Base.metadata.sorted_tables:
        mapper = next(m for m in Base.registry.mappers if m.local_table is table)
        mapped = {c.name for c in mapper.columns}
        for name, column in columns(table.name).items():
            if not column.nullable and column.default is None:
                assert name in mapped, f"{table.name}.{name} is NOT NULL without a default: the model must map it"


def test_shipped_schema_is_cronium_s(tmp_path: Path) -> None:
    """tests/data/cronium_schema.json is the team's shared copy, unchanged."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "cronium" / "schema.json"
    if not shared.exists():
        pytest.skip(f"no shared copy at {shared} to compare with (outside a developer checkout)")
    assert json.loads(shared.read_text()) == json.loads(SCHEMA_FILE.read_text())


@pytest.fixture
def pg_empty(postgres_url: str) -> Iterator[str]:
    yield from _pg_schema_url(postgres_url)


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_cronium_flavour_is_exactly_schema_json(postgres_url: str) -> None:
    """The test flavour built from schema.json reads back as schema.json: every column, NULL,
    DEFAULT and constraint (so tests on it test against Cronium's real schema)."""
    for url in cronium_db_url(postgres_url):
        tables = read_tables(_dsn(url))
        for table in cronium_tables():
            assert differences(table, tables[table]) == []


def test_db_init_on_empty_postgresql_makes_cronium_tables(pg_empty: str) -> None:
    db = Database(pg_empty)
    try:
        created = db.init()
    finally:
        db.dispose()
    assert sorted(created) == sorted(t.name for t in Base.metadata.sorted_tables)
    tables = read_tables(_dsn(pg_empty))
    problems = [line for t in created for line in differences(t, tables[t], ignore_constraints=ON_PURPOSE)]
    assert problems == [], "db-init differs from Cronium's migrations:\n" + "\n".join(problems)
    assert all(c in constraints(t) for t in created for c in tables[t]["constraints"])


@pytest.fixture
def cronium_db(postgres_url: str) -> Iterator[Database]:
    for url in cronium_db_url(postgres_url):
        database = Database(url)
        try:
            yield database
        finally:
            database.dispose()


def test_db_init_on_cronium_database_changes_nothing(cronium_db: Database) -> None:
    before = read_tables(_dsn(cronium_db.url))
    assert cronium_db.init() == []
    cronium_db.check()
    assert read_tables(_dsn(cronium_db.url)) == before


def test_older_database_without_columns_we_never_use_still_works(empty_db_url: str) -> None:
    """A database whose events/servers/users lack Cronium's columns we do not use (an older
    Cronium, an older db-init) is read and written unchanged."""
    db = Database(empty_db_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("CREATE TABLE users (id varchar(255) PRIMARY KEY, email varchar(255), username varchar(255), "
                              "created_at timestamp NOT NULL, updated_at timestamp NOT NULL)"))
        db.init()
        ev = add_event(db, servers=[add_server(db, "old")])
        with db.session() as s:
            assert [x.name for x in resolve_event(s, ev).servers] == ["old"]
    finally:
        db.dispose()
