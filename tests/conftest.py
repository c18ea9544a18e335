"""Shared fixtures: databases (SQLite and PostgreSQL, every test that crosses the DB boundary runs
on both), signing keys, a built runner. SSH host fixtures live in tests/conftest_ssh.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cronium_fab.db.engine import Database
from cronium_fab.settings import Settings
from cronium_fab.signing import generate_keypair


def _unignore_stop_signals() -> None:
    """A suite started in the background of a script (`cmd &` without job control ignores SIGINT)
    or under `nohup` hands those ignores to every program the tests start, and cronium-fab keeps
    ignored signals ignored, on purpose: the Ctrl-C tests would then see a run go on to its
    timeout. The programs under test get the dispositions of a terminal user's shell."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


_unignore_stop_signals()

pytest_plugins = ["tests.conftest_ssh"] if (Path(__file__).parent / "conftest_ssh.py").exists() else []

IN_CI = bool(os.environ.get("CI"))
LOCAL_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: required services must be present)", pytrace=False)
    pytest.skip(reason)


def _pg_answers(url: str) -> str | None:
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:  # any failure means "not usable here"
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """CRONIUM_TEST_DATABASE_URL, else testcontainers (when Docker answers), else the local server."""
    explicit = os.environ.get("CRONIUM_TEST_DATABASE_URL")
    if explicit:
        err = _pg_answers(explicit)
        if err:
            _unavailable(f"CRONIUM_TEST_DATABASE_URL does not answer: {err}")
        yield explicit
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
            yield pg.get_connection_url()
        return
    err = _pg_answers(LOCAL_PG)
    if err:
        _unavailable(f"no PostgreSQL: no Docker engine for testcontainers and {LOCAL_PG} says: {err}")
    yield LOCAL_PG


def _pg_schema_url(base: str) -> Iterator[str]:
    """A private schema per test on the shared server, dropped afterwards."""
    from cronium_fab.testing.pg import private_schema

    with private_schema(base) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database; the test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cronium.db'}"
    else:
        yield from _pg_schema_url(request.getfixturevalue("postgres_url"))


# The three databases every test that crosses the database boundary runs on: the embedded SQLite
# file and PostgreSQL, both made by our `db-init`, and PostgreSQL as Cronium's own migrations make it
# (built from tests/data/cronium_schema.json alone, never from our models).
DB_FLAVOURS = ["sqlite", "postgresql", "cronium"]


def cronium_db_url(postgres_url: str) -> Iterator[str]:
    """A private PostgreSQL schema holding Cronium's tables exactly as its migrations make them."""
    from tests.cronium_schema import create_cronium_tables

    for url in _pg_schema_url(postgres_url):
        create_cronium_tables(url.replace("postgresql+psycopg://", "postgresql://"))
        yield url


@pytest.fixture(params=DB_FLAVOURS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database with Cronium's tables, in each of the three flavours."""
    if request.param == "cronium":
        yield from cronium_db_url(request.getfixturevalue("postgres_url"))
        return
    for url in ([f"sqlite:///{tmp_path / 'cronium.db'}"] if request.param == "sqlite"
                else _pg_schema_url(request.getfixturevalue("postgres_url"))):
        database = Database(url)
        database.init()
        database.dispose()
        yield url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A Database with Cronium's tables (by db-init, or as Cronium's migrations make them)."""
    database = Database(db_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "cosign.key", d / "cosign.pub")
    return d / "cosign.key", d / "cosign.pub"


@pytest.fixture
def settings(db: Database, signing_keys: tuple[Path, Path], tmp_path: Path) -> Settings:
    key, pub = signing_keys
    return Settings(
        database_url=db.url,
        data_dir=tmp_path / "data",
        signing_key=key,
        public_key=pub,
        payload_dir=tmp_path / "payloads",
        runner_path=tmp_path / "dist" / "cronium-runner.pyz",
    )


@pytest.fixture(autouse=True)
def _no_encryption_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set ENCRYPTION_KEY explicitly when they need it; the developer's shell must not leak in."""
    monkeypatch.delenv("ENCRYPTION_KEY", raising=False)
    monkeypatch.delenv("CRONIUM_DATABASE_URL", raising=False)
