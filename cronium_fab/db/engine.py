"""Engine and sessions: ``CRONIUM_DATABASE_URL`` (Cronium's PostgreSQL) or the embedded SQLite file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigError, DatabaseUnavailable
from .models import Base

PG_IDLE_IN_TRANSACTION = "30s"  # a session idle this long inside a transaction is ended by PostgreSQL


def normalize_url(url: str) -> str:
    """Accept Cronium's ``postgresql://`` / ``postgres://`` URLs and use psycopg 3 for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"CRONIUM_DATABASE_URL is not a database URL: {safe_url(url)}; "
            "use postgresql+psycopg://user:pass@host:5432/db or sqlite:///path/file.db"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"database {safe_url(url)}: only PostgreSQL (postgresql://...) and SQLite (sqlite:///path) are supported"
        )
    if parsed.get_backend_name() == "sqlite":
        # hide_parameters: an error message must never carry a bound value (a password, a variable)
        engine = create_engine(url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: no corruption, far fewer fsyncs
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "before_execute")
        def _sqlite_lock_for_update(conn: Any, statement: Any, *_args: Any) -> None:
            # SQLite has no FOR UPDATE: a read that asks for it (ORM or Core) takes the database's
            # write lock instead (BEGIN IMMEDIATE), so what it read cannot change before its
            # transaction writes. pysqlite would begin only at the first write, leaving the read
            # outside the transaction (a claim could overwrite a cancel written in between).
            if getattr(statement, "_for_update_arg", None) is None:
                return
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                return
            if not conn.connection.driver_connection.in_transaction:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    try:
        engine = create_engine(
            # no pre-ping: it doubles every query of the helper API; runs are short, and a connection
            # idle for 5 minutes is replaced instead
            # TCP keepalives and a user timeout: a cut network fails a query within ~30 s instead
            # of the kernel's ~15 minutes of retransmissions (a worker must notice it lost its lease)
            url, pool_recycle=300, hide_parameters=True,
            connect_args={"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                          "keepalives_count": 3, "tcp_user_timeout": 30000},
        )
    except Exception as exc:  # a missing driver, a bad dialect
        raise ConfigError(f"cannot use database {safe_url(url)}: {exc}") from None

    @event.listens_for(engine, "connect")
    def _pg_session(dbapi_conn: Any, _record: Any) -> None:
        # a process frozen (SIGSTOP) inside one of our short transactions would hold its row locks
        # for ever: the job's row, which other workers' reapers skip (SKIP LOCKED). The server
        # ends such a session instead.
        cur = dbapi_conn.cursor()
        cur.execute(f"SET idle_in_transaction_session_timeout = '{PG_IDLE_IN_TRANSACTION}'")
        cur.close()
        dbapi_conn.commit()

    return engine


def check_connection(engine: Engine) -> None:
    """Fail with a clear message (no traceback) when the database does not answer."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailable(
            f"cannot connect to the database {safe_url(str(engine.url))}: {reason}. "
            "Check CRONIUM_DATABASE_URL (unset it to use the embedded SQLite database)."
        ) from None


def init_db(engine: Engine) -> list[str]:
    """Create Cronium's tables that do not exist yet; never alter existing ones. Returns created names."""
    check_connection(engine)
    existing = set(inspect(engine).get_table_names())
    Base.metadata.create_all(engine, checkfirst=True)
    return [t.name for t in Base.metadata.sorted_tables if t.name not in existing]


def missing_tables(engine: Engine) -> list[str]:
    existing = set(inspect(engine).get_table_names())
    return [t.name for t in Base.metadata.sorted_tables if t.name not in existing]


class Database:
    """An engine plus a session factory. One per process (or per test)."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        # The same pool, each statement its own transaction: a single read pays no BEGIN and no
        # ROLLBACK round trip (PostgreSQL: 0.2 ms instead of 0.4 ms per read, measured locally).
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def sqlite_path(self) -> Path | None:
        if self.dialect != "sqlite":
            return None
        db = self.engine.url.database
        return Path(db).expanduser() if db and db != ":memory:" else None

    def init(self) -> list[str]:
        path = self.sqlite_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # create the file 0600 before SQLite does (it would use the umask); its -wal/-shm
            # files take the database file's mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        created = init_db(self.engine)
        if path is not None:
            os.chmod(path, 0o600)
        return created

    def check(self) -> None:
        path = self.sqlite_path
        if path is not None and not path.exists():
            raise DatabaseUnavailable(
                f"no database at {path}: run `cronium-fab db-init` (or `cronium-fab load FILE`) first, "
                "or set CRONIUM_DATABASE_URL"
            )
        check_connection(self.engine)
        missing = missing_tables(self.engine)
        if missing:
            raise DatabaseUnavailable(
                f"the database {safe_url(self.url)} lacks tables {', '.join(missing)}: "
                "run `cronium-fab db-init` first"
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on any error."""
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
