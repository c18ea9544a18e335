"""The ``cronium-fab`` program: a Fabric program with its own namespace (no fabfile needed).

Every task is a thin wrapper over the library; errors a user can act on are printed as one
line (no traceback) with the exit status of their type (``errors.py`` lists them).

With ``--json``, stdout always carries exactly one JSON document: the run's result, or
``{"status": "ERROR", "error": "...", "exit_code": N}`` when the run could not happen.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

from fabric import Config, Executor, task
from fabric.main import Fab
from invoke import Call, Collection, Exit, Task
from invoke.exceptions import ParseError

from . import __version__
from .errors import EXIT_FAILURE, EXIT_INTERNAL, EXIT_USAGE, CroniumFabError
from .settings import Settings, keep_connections_from_env

F = TypeVar("F", bound=Callable[..., Any])

def user_errors(fn: F) -> F:
    """Turn CroniumFabError into a one-line message and its exit status (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            if sys.stdout is not None:
                sys.stdout.flush()   # a reader that is gone shows here, not as a traceback at exit
            return result
        except CroniumFabError as exc:
            raise Exit(f"cronium-fab: error: {exc}", code=exc.exit_code) from None
        except Exit:
            raise
        except BrokenPipeError as exc:
            if not _stdout_reader_gone():
                raise Exit(f"cronium-fab: error: {exc}", code=EXIT_FAILURE) from None
            # whoever read our stdout is gone (`cronium-fab events | head -1`): nothing to say to them
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)   # nothing left to flush at exit
                os.close(devnull)
            raise Exit(code=EXIT_FAILURE) from None
        except Exception as exc:  # a bug: one line, its own exit status, never mistaken for FAILURE
            if os.environ.get("CRONIUM_FAB_DEBUG"):
                raise
            raise Exit(f"cronium-fab: internal error: {type(exc).__name__}: {exc} "
                       "(set CRONIUM_FAB_DEBUG=1 for the traceback)", code=EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def _stdout_reader_gone() -> bool:
    """Whether fd 1 is a pipe or socket whose reading end is closed."""
    import select

    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


class RunExit(Exit):
    """The exit status of a run that happened (its JSON document is already on stdout)."""


def json_errors(fn: F) -> F:
    """With ``--json``, a run that could not happen still prints one JSON document on stdout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunExit:
            raise
        except Exit as exc:
            if kwargs.get("json"):
                message = str(exc.message or "").removeprefix("cronium-fab: ").removeprefix("error: ")
                print(json.dumps({"status": "ERROR", "error": message, "exit_code": exc.code}))
            raise

    return wrapper  # type: ignore[return-value]


def _positive_int(flag: str, value: str | None, *, what: str = "an event id",
                  lister: str = "`cronium-fab events`") -> int:
    if value is None:
        raise Exit(f"cronium-fab: error: {flag} is required: {what} ({lister} lists them)", code=EXIT_USAGE)
    if not str(value).strip().isdigit() or int(value) < 1:
        raise Exit(f"cronium-fab: error: {flag} needs {what} (a positive integer), got {value!r}; "
                   f"{lister} lists them", code=EXIT_USAGE)
    return int(value)


def _seconds(flag: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise Exit(f"cronium-fab: error: {flag} needs a number of seconds greater than 0, got {value!r}",
                   code=EXIT_USAGE)
    return seconds


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


@task(name="load", help={"file": "YAML inventory of servers, events, env vars and variables",
                          "json": "print what was loaded as one JSON document on stdout"})
@user_errors
def load(c: Any, file: str, json: bool = False) -> None:  # noqa: A002 - the CLI flag is --json
    """Register servers, events, links, env vars and variables from a YAML file (upsert by name)."""
    import json as jsonlib

    from .registry import load_inventory

    settings = _settings()
    db = _database(settings, check=False)
    db.init()
    report = load_inventory(db, Path(file))
    if json:
        print(jsonlib.dumps({"servers": report.servers, "events": report.events, "variables": report.variables,
                             "created": report.created, "updated": report.updated, "unchanged": report.unchanged}))
        return
    print(report.summary())


@task(name="payload-build", help={"event": "event id"})
@user_errors
def payload_build(c: Any, event: str | None = None) -> None:
    """Build, sign and store an event's payload (what Cronium calls when an event is saved)."""
    event_id = _positive_int("--event", event)
    settings = _settings()
    db = _database(settings)
    built = payload_store(settings, db).build(event_id)
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


# Flags of every command that runs an event (run-event, rerun).
RUN_HELP = {
    "json": "print one JSON document with the aggregate result on stdout",
    "parallel": "how many hosts at once (default 128, env CRONIUM_FAB_PARALLEL)",
    "helper_mode": "auto | api | bundled (default auto, env CRONIUM_FAB_HELPER_MODE)",
    "host_key_policy": "strict (unknown hosts refused) | accept-new (first key recorded)",
    "timeout": "override the event's timeout: seconds (> 0)",
    "keep_workdir": "keep the remote work directory (debugging)",
    "quiet": "no live output, only the summary",
    "batch": "start hosts in successive batches, each once the previous one ended: a size or a list, "
             "e.g. 1,10%,100% (a canary, then 10%, then the rest; the last size repeats)",
    "max_failures": "failure budget over the whole run: once more than N (or P%) of the hosts failed their "
                    "script, no new host starts; those never started end `skipped` (exit 7)",
    "fail_fast": "the same as --max-failures 0",
    "max_unreachable": "the same for unreachable hosts, counted apart from script failures",
    "connect_retries": "try a refused, reset or timed-out connect again N times (default 1, with jitter)",
    "output_dir": "write each host's full stdout and stderr to DIR/NAME.stdout and DIR/NAME.stderr",
    "plan": "check each host (reachable, host key, python3 >= 3.8, runner cached) and show what would "
            "happen; runs nothing, writes nothing",
}


# their defaults (Invoke makes a flag of each: bool -> --flag, else --flag VALUE)
RUN_FLAGS: dict[str, Any] = {
    "json": False, "parallel": 0, "helper_mode": None, "host_key_policy": None, "timeout": None,
    "keep_workdir": False, "quiet": False, "batch": None, "max_failures": None, "fail_fast": False,
    "max_unreachable": None, "connect_retries": None, "output_dir": None, "plan": False,
}


def run_flags(fn: F) -> F:
    """Give a task that runs an event the flags every such task takes (``RUN_FLAGS``, described
    in ``RUN_HELP``): Invoke reads a task's flags from its signature; ``fn`` gets them as ``**flags``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in RUN_FLAGS.items()]
    fn.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return fn


def _run_settings(flags: dict[str, Any]) -> Settings:
    settings = _settings()
    changes: dict[str, Any] = {}
    if flags["host_key_policy"]:
        changes["host_key_policy"] = flags["host_key_policy"]
    if flags["helper_mode"]:
        changes["helper_mode"] = flags["helper_mode"]
    if flags["parallel"]:
        changes["parallel"] = int(flags["parallel"])
    return settings.with_(**changes) if changes else settings


def _key_files(c: Any) -> tuple[str, ...]:
    """``-i KEY`` (fab's and our core flag): for destinations and servers stored without a credential."""
    return tuple(str(k) for k in (c.config.connect_kwargs.get("key_filename") or []))


def _request_fields(flags: dict[str, Any]) -> dict[str, Any]:
    """The RunRequest fields the run flags give (RunRequest checks them when it is made)."""
    fields = {k: flags[k] for k in ("keep_workdir", "batch", "max_failures", "fail_fast", "max_unreachable",
                                    "connect_retries", "output_dir")}
    return dict(fields, timeout=_seconds("--timeout", flags["timeout"]))


def _stderr_is_a_terminal() -> bool:
    """Where the live status line may go: stderr is a terminal that can move its cursor."""
    try:
        return sys.stderr is not None and sys.stderr.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
    except (AttributeError, ValueError):
        return False


def _execute(settings: Settings, request: Any, flags: dict[str, Any]) -> None:
    """Run (with ``--plan`` only check) ``request``, print what it did, exit with its status."""
    import json as jsonlib

    from .execute import plan_fleet
    from .execute import run_event as execute_run_event

    json, quiet = flags["json"], flags["quiet"]
    result: Any
    if flags["plan"]:
        result = plan_fleet(settings, request)
        print(result.text(), file=sys.stderr)
    else:
        from .remote.pool import process_pool

        live = not json and not quiet and _stderr_is_a_terminal()
        # served by a worker's run process: its connections from earlier commands (docs/WORKER.md)
        kept = process_pool() if settings.keep_connections > 0 else None
        result = execute_run_event(settings, request, out=None if quiet else sys.stderr, live_status=live,
                                   connections=kept)
        if quiet:
            from .results import summary_table

            print(summary_table(result), file=sys.stderr)
    if json:
        print(jsonlib.dumps(result.to_dict(), ensure_ascii=False, default=str))
    if result.exit_code:
        raise RunExit(code=result.exit_code)


@task(
    name="run-event",
    auto_shortflags=False,
    help={
        "id": "event id",
        "job": "an existing Cronium job id: its input feeds cronium.input() and its rows are updated",
        "hosts": "comma-separated hosts instead of the event's servers (same as fab -H)",
        "input": "JSON given to cronium.input() (hand runs)",
        **RUN_HELP,
    },
)
@run_flags
@json_errors
@user_errors
def run_event(
    c: Any,
    id: str | None = None,  # noqa: A002 - the CLI flag is --id
    job: str | None = None,
    hosts: str | None = None,
    input: str | None = None,  # noqa: A002
    **flags: Any,
) -> None:
    """Run an event on all its servers in parallel; exit 0 only when every host succeeded."""
    import json as jsonlib

    from .execute import RunRequest

    settings = _run_settings(flags)
    try:
        input_data = jsonlib.loads(input) if input is not None else None
    except ValueError as exc:
        raise Exit(f"cronium-fab: error: --input is not valid JSON: {exc}", code=EXIT_USAGE) from None
    request = RunRequest(
        event_id=_positive_int("--id", id),
        hosts=[h for h in hosts.split(",") if h.strip()] if hosts else None,
        job_id=job,
        input=input_data,
        **_request_fields(flags),
        key_files=_key_files(c),
    )
    _execute(settings, request, flags)


run_event.all_hosts = True


@task(
    name="rerun",
    auto_shortflags=False,
    positional=["log_id"],
    help={
        "log_id": "the run to rerun: its log id (`cronium-fab runs` lists them)",
        "only": "which hosts of that run: all (every host that did not succeed: failed, timeout, unreachable, "
                "cancelled, skipped; the default) | failed (script failed or timed out) | unreachable",
        **RUN_HELP,
    },
)
@run_flags
@json_errors
@user_errors
def rerun(c: Any, log_id: str | None = None, only: str = "all", **flags: Any) -> None:
    """Run a past run's event again on exactly its hosts that did not succeed (with that run's input)."""
    from .execute import RunRequest, rerun_request

    log = _positive_int("LOG_ID", log_id, what="a run's log id", lister="`cronium-fab runs`")
    settings = _run_settings(flags)
    fields = dict(_request_fields(flags), rerun_only=only)
    RunRequest(event_id=log, **fields)  # bad flags are refused before the database is opened
    db = _database(settings)
    try:
        request = rerun_request(db, log, **fields)
    finally:
        db.dispose()
    _execute(settings, request, flags)


@task(name="runs", auto_shortflags=False,
      help={"event": "only this event's runs", "limit": "how many (the newest first; default 20)",
            "json": "one JSON document on stdout: {\"runs\": [...]}"})
@json_errors
@user_errors
def runs(c: Any, event: str | None = None, limit: str = "20", json: bool = False) -> None:  # noqa: A002
    """List the latest runs: log id, start time, status, event, host counts by state."""
    import json as jsonlib

    from .history import list_runs, runs_table

    event_id = _positive_int("--event", event) if event is not None else None
    n = _positive_int("--limit", limit, what="how many runs to list")
    settings = _settings()
    db = _database(settings)
    try:
        views = list_runs(db, event_id=event_id, limit=n)
    finally:
        db.dispose()
    if json:
        print(jsonlib.dumps({"runs": [v.to_dict() for v in views]}, ensure_ascii=False, default=str))
    else:
        print(runs_table(views))


@task(name="show", auto_shortflags=False, positional=["log_id"],
      help={"log_id": "the run's log id (`cronium-fab runs` lists them)",
            "host": "only this host (its name, address or execution id), with all its output",
            "json": "one JSON document on stdout"})
@json_errors
@user_errors
def show(c: Any, log_id: str | None = None, host: str | None = None, json: bool = False) -> None:  # noqa: A002
    """Show one run: its status, its hosts (failures first) and their output (identical output once)."""
    import json as jsonlib

    from .history import show_run

    log = _positive_int("LOG_ID", log_id, what="a run's log id", lister="`cronium-fab runs`")
    settings = _settings()
    db = _database(settings)
    try:
        detail = show_run(db, log, host=host)
    finally:
        db.dispose()
    if json:
        print(jsonlib.dumps(detail.to_dict(), ensure_ascii=False, default=str))
    else:
        print(detail.text())


@task(
    name="known-hosts-add",
    auto_shortflags=False,
    help={
        "host": "the hosts (also as plain arguments: `known-hosts-add a b c`): server names or addresses from "
                "the database, [user@]host[:port] or [host]:port; comma-separated",
        "event": "every server of this event (its event_servers, else events.server_id)",
        "yes": "record without asking (needed when stdin is not a terminal)",
        "replace": "replace a different key recorded for a host (after checking the new fingerprint!)",
    },
)
@user_errors
def known_hosts_add(c: Any, host: str | None = None, event: str | None = None, yes: bool = False,
                    replace: bool = False) -> None:
    """Show servers' host key fingerprints and record them in cronium-fab's known_hosts."""
    from .remote.connection import HostKeyOffer, SSHSettings, offered_host_key, save_host_key
    from .remote.errors import RemoteError

    settings = _settings()
    wanted = [(v.strip(), *_host_and_port(settings, v.strip())) for v in (host or "").split(",") if v.strip()]
    if event is not None:
        wanted += _event_hosts(settings, _positive_int("--event", event))
    if not wanted:
        raise Exit("cronium-fab: error: name the hosts (`known-hosts-add web1 web2`) or an event (`--event N`)",
                   code=EXIT_USAGE)
    ssh = SSHSettings(known_hosts_path=settings.known_hosts, connect_timeout=settings.connect_timeout)
    offers: list[HostKeyOffer] = []
    labels: dict[str, str] = {}   # known_hosts entry -> what the user called it
    unreachable: list[str] = []
    seen: set[tuple[str, int]] = set()
    for label, name, port in wanted:
        if (name, port) in seen:
            continue
        seen.add((name, port))
        try:
            offer = offered_host_key(name, port, ssh)
        except RemoteError as exc:
            print(f"{label}: cannot fetch its host key: {exc}", file=sys.stderr)
            unreachable.append(label)
            continue
        offers.append(offer)
        labels[offer.name] = label if label == offer.name else f"{label} ({offer.name})"
        state = " (already recorded)" if offer.already_known else (
            f" (a DIFFERENT key is recorded: {offer.known_fingerprints()})" if offer.known else "")
        print(f"{labels[offer.name]}: {offer.key_type} {offer.fingerprint}{state}", file=sys.stderr)
    changed = [o for o in offers if o.known and not o.already_known]
    if changed and not replace:
        raise Exit(f"cronium-fab: error: {', '.join(labels[o.name] for o in changed)}: a DIFFERENT key is recorded; if the "
                   "server was reinstalled and you checked the new fingerprint, pass --replace (nothing recorded)",
                   code=EXIT_USAGE)
    new = [o for o in offers if not o.already_known]
    if not new:
        if offers:
            print("already recorded", file=sys.stderr)
    else:
        if not yes:
            if not sys.stdin.isatty():
                raise Exit("cronium-fab: error: stdin is not a terminal: check the fingerprints above and pass --yes",
                           code=EXIT_USAGE)
            what = "this key" if len(new) == 1 else f"these {len(new)} keys"
            if input(f"record {what}? [y/N] ").strip().lower() not in ("y", "yes"):
                raise Exit("not recorded", code=EXIT_FAILURE)
        settings.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for offer in new:
            save_host_key(offer, ssh, replace=True)
        print(f"recorded {len(new)} key(s) in {settings.known_hosts}", file=sys.stderr)
    if unreachable:
        raise Exit(f"cronium-fab: error: no host key from {', '.join(unreachable)} (see above)", code=EXIT_FAILURE)


def _event_hosts(settings: Settings, event_id: int) -> list[tuple[str, str, int]]:
    """(name, address, port) of every server an event runs on."""
    from .db.queries import event_servers, get_event

    db = _database(settings)
    try:
        with db.session() as s:
            servers, _skipped = event_servers(s, get_event(s, event_id))
            return [(x.name, x.address, x.port or 22) for x in servers]
    finally:
        db.dispose()


def _host_and_port(settings: Settings, value: str) -> tuple[str, int]:
    """A server's name/address from the database, or ``[user@]host[:port]`` / ``[host]:port``."""
    from .remote.connection import parse_destination

    _user, host, port = parse_destination(value)
    if port is None:
        from .db.engine import Database
        from .db.queries import find_server

        db = Database(settings.database_url)
        try:
            if db.sqlite_path is None or db.sqlite_path.exists():
                with db.session() as s:
                    row = find_server(s, host)
                    if row is not None:
                        return row.address, row.port or 22
        finally:
            db.dispose()
    return host, port or 22


@task(
    name="serve",
    auto_shortflags=False,
    help={
        "jobs": "jobs at once (default 1); their hosts share --parallel connections",
        "worker_id": "this worker's id in jobs.orchestrator_id (default env CRONIUM_FAB_WORKER_ID, else user@host); "
                     "keep it the same across restarts",
        "lease": "seconds a claim lives without a heartbeat (default 30): a killed worker's jobs go to others then",
        "poll": "seconds between looks for jobs Cronium's app wrote (default 1; enqueue wakes workers at once)",
        "drain_timeout": "on SIGTERM, seconds to let running jobs finish before cancelling them (default 60)",
        "parallel": "connections at once over all jobs (default 128, env CRONIUM_FAB_PARALLEL)",
        "keep_connections": "seconds a host's SSH connection stays open after a clean run, for the next run "
                            "on it (default 300, env CRONIUM_FAB_KEEP_CONNECTIONS; 0: a new one every run)",
    },
)
@user_errors
def serve(c: Any, jobs: int = 1, worker_id: str | None = None, lease: str | None = None, poll: str | None = None,
          drain_timeout: str | None = None, parallel: int = 0, keep_connections: str | None = None) -> None:
    """Work Cronium's job queue: claim due SSH jobs and run them (several workers share PostgreSQL)."""
    from .jobqueue import QueueSettings, default_worker_id
    from .serve import serve as serve_jobs

    settings = _settings()
    if parallel:
        settings = settings.with_(parallel=int(parallel))
    if keep_connections is not None:
        try:
            off = float(keep_connections) == 0
        except ValueError:
            off = False
        keep = 0.0 if off else _seconds("--keep-connections", keep_connections)
        settings = settings.with_(keep_connections=keep)
    if int(jobs) < 1:
        raise Exit("cronium-fab: error: --jobs must be at least 1", code=EXIT_USAGE)
    qs = QueueSettings(worker_id=worker_id or default_worker_id(), lease_s=_seconds("--lease", lease) or 30.0,
                       poll_s=_seconds("--poll", poll) or 1.0, jobs=int(jobs))
    code = serve_jobs(settings, qs, drain_timeout=_seconds("--drain-timeout", drain_timeout) or 60.0, out=sys.stderr)
    if code:
        raise Exit(code=code)


@task(
    name="enqueue",
    auto_shortflags=False,
    help={"event": "event id", "input": "JSON given to cronium.input()",
          "at": "when it is due: ISO time (UTC, e.g. 2026-12-03T18:00) or +SECONDS (default now)",
          "priority": "higher runs first (default 1, Cronium's NORMAL)", "json": "print {job_id, log_id} as JSON"},
)
@user_errors
def enqueue(c: Any, event: str | None = None, input: str | None = None, at: str | None = None,  # noqa: A002
            priority: int = 1, json: bool = False) -> None:  # noqa: A002
    """Queue a run of an event as Cronium's app does; a `cronium-fab serve` worker runs it."""
    import json as jsonlib
    from datetime import datetime, timedelta

    from .db.models import utcnow
    from .jobqueue import enqueue as enqueue_job

    event_id = _positive_int("--event", event)
    try:
        input_data = jsonlib.loads(input) if input is not None else None
    except ValueError as exc:
        raise Exit(f"cronium-fab: error: --input is not valid JSON: {exc}", code=EXIT_USAGE) from None
    when = None
    if at:
        try:
            when = (utcnow() + timedelta(seconds=float(at[1:]))) if at.startswith("+") else datetime.fromisoformat(at)
        except ValueError:
            raise Exit(f"cronium-fab: error: --at {at!r} is neither an ISO time (2026-12-03T18:00) nor +SECONDS",
                       code=EXIT_USAGE) from None
        if when.tzinfo is not None:
            when = when.astimezone(UTC).replace(tzinfo=None)
    db = _database(_settings())
    try:
        job_id, log_id = enqueue_job(db, event_id, input_data=input_data, at=when, priority=int(priority))
    finally:
        db.dispose()
    print(jsonlib.dumps({"job_id": job_id, "log_id": log_id}) if json else job_id)


@task(name="recover")
@user_errors
def recover(c: Any) -> None:
    """Close the rows of runs whose controller was killed on this host ("controller lost")."""
    from .records import recover_lost_runs

    db = _database(_settings())
    try:
        closed = recover_lost_runs(db)
    finally:
        db.dispose()
    print(f"closed {len(closed)} run(s) whose controller is gone" + (f": {', '.join(closed)}" if closed else ""),
          file=sys.stderr)


@task(name="jobs", auto_shortflags=False,
      help={"status": "only jobs in these states (comma-separated: queued, claimed, running, completed, failed, "
                      "cancelled)",
            "event": "only this event's jobs", "worker": "only jobs this worker id claimed",
            "limit": "how many, newest first (default 50)", "json": "print the jobs as one JSON document"})
@user_errors
def jobs(c: Any, status: str | None = None, event: str | None = None, worker: str | None = None,
         limit: str = "50", json: bool = False) -> None:  # noqa: A002
    """List the latest jobs with their status, worker and attempts."""
    import json as jsonlib
    from typing import get_args

    from .jobqueue import jobs_table
    from .records import JobStatus

    known = get_args(JobStatus)
    states = [x.strip() for x in status.split(",") if x.strip()] if status else None
    unknown = [x for x in states or [] if x not in known]
    if unknown or states == []:
        raise Exit(f"cronium-fab: error: --status {status!r}: the states are {', '.join(known)}", code=EXIT_USAGE)
    event_id = _positive_int("--event", event) if event is not None else None
    n = _positive_int("--limit", limit, what="how many jobs to list")
    db = _database(_settings())
    try:
        rows = jobs_table(db, limit=n, statuses=states, event_id=event_id, worker=worker)
    finally:
        db.dispose()
    if json:
        print(jsonlib.dumps(rows))
        return
    for r in rows:
        print(f"{r['id']:<18} event {r['event_id']:<5} {r['status']:<10} attempts {r['attempts']}  "
              f"worker {r['worker'] or '-'}" + (f"  ({r['last_error']})" if r["last_error"] else ""))


@task(name="worker", auto_shortflags=False, help={"socket": "listen here (default: <data dir>/worker.sock, "
                                                             "env CRONIUM_FAB_WORKER_SOCKET)"})
@user_errors
def worker(c: Any, socket: str | None = None) -> None:
    """Keep cronium-fab loaded and serve this user's `cronium-fab` commands in forks (docs/WORKER.md)."""
    from .wire import startup_fingerprint
    from .worker import ServedProgram, serve

    program = ServedProgram(main=main, commands=frozenset(build_namespace().task_names), preload=WORKER_PRELOAD,
                            import_check=("cronium_fab.cli", "cronium_fab.worker"),
                            keep_s=keep_connections_from_env())
    code = serve(socket, program, fingerprint=startup_fingerprint())
    if code:
        raise Exit(code=code)


# Everything a command may import, so that a worker's fork finds it loaded.
WORKER_PRELOAD = (
    "cronium_fab.execute",
    "cronium_fab.serve",
    "cronium_fab.history",
    "cronium_fab.payloads",
    "rich.console",
    "rich.live",
    "cronium_fab.registry",
    "cronium_fab.db.queries",
    "cronium_fab.remote.known_hosts",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql.psycopg",
    "psycopg",
)


def build_namespace() -> Collection:
    ns = Collection()
    for t in (db_init, load, payload_build, events, run_event, rerun, runs, show, known_hosts_add, serve, enqueue,
              jobs, recover, worker):
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


JSON_COMMANDS = {"run-event", "rerun", "runs", "show"}


class _Program(Fab):
    """Fab with our usage-error contract: a bad flag or an unknown command exits 2 (not Invoke's 1,
    which would read as a FAILED run), and `run-event --json` still prints one JSON document."""

    def _usage(self, exc: ParseError) -> Exit:
        message = f"cronium-fab: error: {exc} (`cronium-fab --help` lists commands, `cronium-fab --help CMD` flags)"
        if "--json" in sys.argv[1:] and JSON_COMMANDS & set(sys.argv[1:]):
            print(json.dumps({"status": "ERROR", "error": str(exc), "exit_code": EXIT_USAGE}))
        return Exit(message, code=EXIT_USAGE)

    def parse_core(self, argv: list[str] | None) -> None:
        try:
            super().parse_core(argv)
        except ParseError as exc:
            raise self._usage(exc) from None

    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ParseError as exc:
            raise self._usage(exc) from None


def program() -> Fab:
    return _Program(
        name="cronium-fab",
        binary="cronium-fab",
        version=__version__,
        namespace=build_namespace(),
        executor_class=GroupExecutor,
        config_class=Config,
    )


def normalize_argv(argv: list[str], commands: set[str]) -> list[str]:
    """``CMD --help`` -> ``--help CMD`` (Invoke would take ``--help`` as the value of CMD's first
    positional argument); ``known-hosts-add a b c`` -> ``known-hosts-add --host a,b,c``."""
    words = argv[1:]
    end = words.index("--") if "--" in words else len(words)
    command = next((i for i, w in enumerate(words[:end]) if w in commands), None)
    if command is None:
        return argv
    if any(w in ("--help", "-h") for w in words[command + 1:end]):
        return [argv[0], *words[:command], "--help", words[command]]
    if words[command] == "known-hosts-add":
        hosts, rest, skip = [], [], False
        for w in words[command + 1:end]:
            if skip or w.startswith("-"):
                rest.append(w)
                skip = w in ("--event", "--host")
            else:
                hosts.append(w)
        if hosts:
            return [argv[0], *words[:command + 1], "--host", ",".join(hosts), *rest, *words[end:]]
    return argv


def main() -> None:
    prog = program()
    sys.argv = normalize_argv(sys.argv, set(prog.namespace.task_names))
    prog.run()
