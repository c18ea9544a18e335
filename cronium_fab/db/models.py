"""SQLAlchemy models of the Cronium tables we read and write (docs/CRONIUM.md §1).

The tables are Cronium's, exactly as its own migrations make them (``tests/data/cronium_schema.json``,
read from a database made by them): every column with its type, NULL/NOT NULL and DEFAULT, and its
keys. A test compares the two column by column, so ``db-init`` on an empty database makes the
tables Cronium makes, and rows we write satisfy every constraint of Cronium's. ``db-init`` never
alters a table that exists. Columns we never use are in the tables (``cronium_only``) but not in
the mapping, so a database that lacks them still works.

Defaults are declared twice on purpose: ``server_default`` is Cronium's DDL default (rows others
write get it), ``default`` the same value on the Python side (an object we create knows it before
a flush, and we never send an explicit NULL for a column that has a default). Timestamps are naive
UTC, as Cronium stores them (``timestamp without time zone``).

Foreign keys to tables we never use (``roles``, ``workflows``) are left out: db-init cannot create
them, and Cronium's own database has them anyway.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine


class _JSONOrJSONB(TypeDecorator[Any]):
    """JSON, as ``jsonb`` on PostgreSQL (Cronium's columns): what ``JSON().with_variant(JSONB(),
    "postgresql")`` is, but the PostgreSQL dialect is imported only by a PostgreSQL engine, so a
    run on SQLite does not load it (2.5 MB and ~55 ms of CPU of a CLI start, measured side by side)."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


JSONType = _JSONOrJSONB()


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def server_default(value: bool | int | str) -> Any:
    """Cronium's DDL default for a plain value (``false``, ``30``, ``'DRAFT'``)."""
    if isinstance(value, bool):
        return true() if value else false()
    if isinstance(value, int):
        return text(str(value))
    return text("'" + value.replace("'", "''") + "'")


def has_default(value: bool | int | str) -> dict[str, Any]:
    """Cronium's DDL default, and the same value on the Python side."""
    return {"default": value, "server_default": server_default(value)}


def json_default(factory: type[list[Any]] | type[dict[str, Any]]) -> dict[str, Any]:
    """``DEFAULT '[]'::jsonb`` / ``'{}'::jsonb`` (PostgreSQL casts the literal to the column's type)."""
    return {"default": factory, "server_default": text("'[]'" if factory is list else "'{}'")}


def cronium_only(*columns: Column[Any]) -> tuple[Column[Any], ...]:
    """Cronium's columns that we never read or write: ``db-init`` makes them (so its tables are
    Cronium's), the ORM leaves them out of every SELECT and INSERT (their defaults fill them), so a
    database that lacks one (an older Cronium, an older db-init) works unchanged."""
    return columns


def unmapped(table_args: tuple[Column[Any], ...]) -> list[str]:
    return [c.name for c in table_args]


def stamp(*, now: bool = False) -> MappedColumn[Any]:
    """``timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP`` (or ``now()``, as some of Cronium's tables say)."""
    return mapped_column(DateTime, nullable=False, default=utcnow,
                         server_default=func.now() if now else func.current_timestamp())


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __table_args__ = cronium_only(
        Column("password", Text, nullable=True),
        Column("first_name", String(255), nullable=True),
        Column("last_name", String(255), nullable=True),
        Column("profile_image_url", String(255), nullable=True),
        Column("role", String(50), nullable=False, server_default=server_default("USER")),
        Column("role_id", Integer, nullable=True),  # Cronium: REFERENCES roles(id), a table we never use
        Column("status", String(50), nullable=False, server_default=server_default("ACTIVE")),
        Column("invite_token", String(255), nullable=True),
        Column("invite_expiry", DateTime, nullable=True),
        Column("last_login", DateTime, nullable=True),
    )
    __mapper_args__ = {"exclude_properties": unmapped(__table_args__)}
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    username: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()


class Server(Base):
    __tablename__ = "servers"
    __table_args__ = cronium_only(
        Column("shared", Boolean, nullable=False, server_default=server_default(False)),
        Column("online", Boolean, nullable=True),
        Column("last_checked", DateTime, nullable=True),
        Column("archived_by", String(255), nullable=True),
        Column("archive_reason", Text, nullable=True),
        Column("deletion_scheduled_at", DateTime, nullable=True),
        Column("ssh_key_purged", Boolean, nullable=False, server_default=server_default(False)),
        Column("password_purged", Boolean, nullable=False, server_default=server_default(False)),
    )
    __mapper_args__ = {"exclude_properties": unmapped(__table_args__)}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(255), ForeignKey("users.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    address: Mapped[str] = mapped_column(String(255), nullable=False)
    ssh_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    username: Mapped[str] = mapped_column(String(255), nullable=False, **has_default("root"))
    port: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(22))
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()
    password: Mapped[str | None] = mapped_column(Text, nullable=True)
    is_archived: Mapped[bool] = mapped_column(Boolean, nullable=False, **has_default(False))
    archived_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = cronium_only(
        Column("shared", Boolean, nullable=False, server_default=server_default(False)),
        Column("http_method", String(20), nullable=True),
        Column("http_url", String(1000), nullable=True),
        Column("http_headers", JSONType, nullable=True),
        Column("http_body", Text, nullable=True),
        Column("trigger_type", String(50), nullable=False, server_default=server_default("MANUAL")),
        Column("schedule_number", Integer, nullable=False, server_default=server_default(1)),
        Column("schedule_unit", String(50), nullable=False, server_default=server_default("MINUTES")),
        Column("custom_schedule", String(255), nullable=True),
        Column("start_time", DateTime, nullable=True),
        Column("max_executions", Integer, nullable=False, server_default=server_default(0)),
        Column("reset_counter_on_active", Boolean, nullable=False, server_default=server_default(False)),
        Column("next_run_at", DateTime, nullable=True),
        Column("tool_action_config", JSONType, nullable=True),
    )
    __mapper_args__ = {"exclude_properties": unmapped(__table_args__)}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(255), ForeignKey("users.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    type: Mapped[str] = mapped_column(String(50), nullable=False)
    content: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(50), nullable=False, **has_default("DRAFT"))
    run_location: Mapped[str] = mapped_column(String(50), nullable=False, **has_default("LOCAL"))
    server_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("servers.id"), nullable=True)
    timeout_value: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(30))
    timeout_unit: Mapped[str] = mapped_column(String(50), nullable=False, **has_default("SECONDS"))
    retries: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(0))
    execution_count: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(0))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    success_count: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(0))
    failure_count: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(0))
    tags: Mapped[Any] = mapped_column(JSONType, nullable=False, **json_default(list))
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()
    payload_version: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(1))


class EnvVar(Base):
    __tablename__ = "env_vars"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(Integer, ForeignKey("events.id"), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    value: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()


class EventServer(Base):
    __tablename__ = "event_servers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(Integer, ForeignKey("events.id"), nullable=False)
    server_id: Mapped[int] = mapped_column(Integer, ForeignKey("servers.id"), nullable=False)
    created_at: Mapped[datetime] = stamp()


class RunnerPayload(Base):
    __tablename__ = "runner_payloads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(Integer, ForeignKey("events.id", ondelete="CASCADE"), nullable=False)
    event_version: Mapped[int] = mapped_column(Integer, nullable=False)
    payload_path: Mapped[str] = mapped_column(Text, nullable=False)
    checksum_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload_size: Mapped[int] = mapped_column(Integer, nullable=False)
    checksum: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = stamp(now=True)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, **has_default(True))


class RunnerDeployment(Base):
    __tablename__ = "runner_deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    server_id: Mapped[int] = mapped_column(Integer, ForeignKey("servers.id", ondelete="CASCADE"), nullable=False)
    runner_version: Mapped[str] = mapped_column(Text, nullable=False)
    runner_path: Mapped[str] = mapped_column(Text, nullable=False)
    checksum: Mapped[str] = mapped_column(Text, nullable=False)
    deployed_at: Mapped[datetime] = stamp(now=True)
    last_used: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    status: Mapped[str] = mapped_column(Text, nullable=False, **has_default("active"))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(50), primary_key=True)
    event_id: Mapped[int] = mapped_column(Integer, ForeignKey("events.id"), nullable=False)
    user_id: Mapped[str] = mapped_column(String(255), ForeignKey("users.id"), nullable=False)
    type: Mapped[str] = mapped_column(String(50), nullable=False)
    status: Mapped[str] = mapped_column(String(50), nullable=False, **has_default("queued"))
    priority: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(1))
    payload: Mapped[Any] = mapped_column(JSONType, nullable=False)
    scheduled_for: Mapped[datetime] = stamp()
    orchestrator_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    result: Mapped[Any | None] = mapped_column(JSONType, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, **has_default(0))
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metadata_: Mapped[Any] = mapped_column("metadata", JSONType, nullable=False, **json_default(dict))
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()


class Execution(Base):
    __tablename__ = "executions"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(50), ForeignKey("jobs.id"), nullable=False)
    server_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("servers.id"), nullable=True)
    server_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(50), nullable=False, **has_default("queued"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metadata_: Mapped[Any] = mapped_column("metadata", JSONType, nullable=False, **json_default(dict))
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()
    setup_started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    setup_completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    execution_started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    execution_completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cleanup_started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cleanup_completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    setup_duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    execution_duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cleanup_duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    execution_metadata: Mapped[Any | None] = mapped_column(JSONType, nullable=True)


class Log(Base):
    __tablename__ = "logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(Integer, ForeignKey("events.id"), nullable=False)
    workflow_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # FK workflows (not ours)
    status: Mapped[str] = mapped_column(String(50), nullable=False, **has_default("RUNNING"))
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    start_time: Mapped[datetime] = stamp()
    end_time: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    successful: Mapped[bool | None] = mapped_column(Boolean, nullable=True, **has_default(False))
    retries: Mapped[int | None] = mapped_column(Integer, nullable=True, **has_default(0))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(50), ForeignKey("jobs.id"), nullable=True)
    event_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    event_type: Mapped[str | None] = mapped_column(String(50), nullable=True)
    execution_id: Mapped[str | None] = mapped_column(String(100), ForeignKey("executions.id"), nullable=True)
    execution_duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    setup_duration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = stamp()
    updated_at: Mapped[datetime] = stamp()


class UserVariable(Base):
    __tablename__ = "user_variables"
    __table_args__ = (UniqueConstraint("user_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(255), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    value: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = stamp(now=True)
    updated_at: Mapped[datetime] = stamp(now=True)
