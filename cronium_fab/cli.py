"""The ``cronium-fab`` program: a Fabric program with its own namespace (no fabfile needed).

Every task is a thin wrapper over the library; errors a user can act on are printed as one
line (no traceback) with a distinct exit status:

    0 success · 1 run FAILURE · 2 usage / configuration error · 3 run PARTIAL · 4 run TIMEOUT
    5 run CANCELLED
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fabric import Config, Executor, task
from fabric.main import Fab
from invoke import Call, Collection, Exit, Task

from . import __version__
from .errors import CroniumFabError
from .settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5


def user_errors(fn: F) -> F:
    """Turn CroniumFabError into a one-line message and its exit status (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CroniumFabError as exc:
            raise Exit(f"cronium-fab: error: {exc}", code=exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _settings() -> Settings:
    return Settings.from_env()


def _database(settings: Settings, *, check: bool = True) -> Any:
    from .db.engine import Database

    db = Database(settings.database_url)
    if check:
        db.check()
    return db


def payload_store(settings: Settings, db: Any) -> Any:
    from .payloads import PayloadStore

    passphrase = os.environ.get("CRONIUM_FAB_KEY_PASSPHRASE")
    return PayloadStore(
        db,
        settings.payload_dir,
        signing_key=settings.signing_key,
        public_key=settings.public_key,
        passphrase=passphrase.encode() if passphrase else None,
    )


@task(name="db-init")
@user_errors
def db_init(c: Any) -> None:
    """Create Cronium's tables on an empty database (existing tables are left untouched)."""
    settings = _settings()
    db = _database(settings, check=False)
    from .db.engine import safe_url

    created = db.init()
    print(
        f"database {safe_url(db.url)}: "
        + (f"created {', '.join(created)}" if created else "all tables already exist, nothing changed"),
        file=sys.stderr,
    )


@task(name="load", help={"file": "YAML inventory of servers, events, env vars and variables"})
@user_errors
def load(c: Any, file: str) -> None:
    """Register servers, events, links, env vars and variables from a YAML file (upsert by name)."""
    from .registry import load_inventory

    settings = _settings()
    db = _database(settings, check=False)
    db.init()
    report = load_inventory(db, Path(file))
    print(json.dumps({"servers": report.servers, "events": report.events, "variables": report.variables}))


@task(name="payload-build", help={"event": "event id"})
@user_errors
def payload_build(c: Any, event: int) -> None:
    """Build, sign and store an event's payload (what Cronium calls when an event is saved)."""
    settings = _settings()
    db = _database(settings)
    built = payload_store(settings, db).build(int(event))
    print(
        json.dumps(
            {
                "event_id": built.event_id,
                "version": built.version,
                "path": str(built.path),
                "checksum": built.sha256,
                "size": built.size,
                "changed": built.changed,
            }
        )
    )


@task(name="events")
@user_errors
def events(c: Any) -> None:
    """List events with their type and servers."""
    from sqlalchemy import select

    from .db.models import Event
    from .db.queries import event_servers

    settings = _settings()
    db = _database(settings)
    with db.session() as s:
        for ev in s.scalars(select(Event).order_by(Event.id)):
            servers, skipped = event_servers(s, ev)
            names = ", ".join(x.name for x in servers) or "-"
            print(f"{ev.id:>5}  {ev.type:<12} {ev.name:<30} servers: {names}")


def build_namespace() -> Collection:
    ns = Collection()
    for t in (db_init, load, payload_build, events):
        ns.add_task(t)
    return ns


class GroupExecutor(Executor):
    """Runs tasks marked ``all_hosts`` ONCE with the whole ``-H`` list, instead of once per host."""

    def expand_calls(self, calls: list[Any], apply_hosts: bool = True) -> list[Any]:
        host_str = self.core[0].args.hosts.value if self.core else None
        group_calls: list[Any] = []
        other: list[Any] = []
        for call in calls:
            if isinstance(call, Task):
                call = Call(task=call)
            if getattr(call.task, "all_hosts", False):
                if host_str:
                    call = call.clone(with_={})
                    call.kwargs = dict(call.kwargs, hosts=host_str)
                group_calls.append(call)
            else:
                other.append(call)
        return group_calls + super().expand_calls(other, apply_hosts=apply_hosts)


def program() -> Fab:
    return Fab(
        name="cronium-fab",
        binary="cronium-fab",
        version=__version__,
        namespace=build_namespace(),
        executor_class=GroupExecutor,
        config_class=Config,
    )


def main() -> None:
    program().run()
