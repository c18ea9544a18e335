"""One event run across all its hosts: resolve → payload → runner → parallel hosts → aggregate → record.

Usable from Python with no CLI::

    from cronium_fab.execute import RunRequest, run_event
    result = run_event(Settings.from_env(), RunRequest(event_id=7))
    print(result.status, [h.status for h in result.hosts])

Hosts run in a bounded thread pool (``parallel``), batch after batch (``--batch``), until the
failure budget says stop (``control.py``); each host's row is written the moment it finishes, so
one slow or dead host never delays the others' results. Human output (live lines prefixed by the
server name, on a terminal a status line, then a summary) goes to ``out`` (stderr in the CLI);
the JSON document is for stdout. ``plan_fleet`` checks every host and runs nothing (``--plan``).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session

from . import __version__
from .build import RunnerArtifact
from .control import RERUN_STATES, Budget, RerunOnly, RunControl
from .db.crypto import load_key
from .db.engine import Database
from .db.models import utcnow
from .db.queries import (
    ResolvedEvent,
    ResolvedServer,
    SkippedServer,
    find_server,
    get_server,
    job_payload,
    resolve_event,
    server_credentials,
    server_names,
    stored_run,
    user_variables,
)
from .errors import ConfigError, CroniumFabError
from .helper_api import ExecutionContext, HelperAPI, HelperState
from .output import CappedBuffer, HostFiles, LivePrinter, TerminalView, output_file_stems, prepare_output_dir
from .payloads import PayloadStore, VerifiedPayload
from .records import (
    Deployment,
    JobContext,
    QueueClaim,
    RunRecorder,
    execution_id_for,
    hand_run_payload,
    host_state_of,
    recover_lost_runs,
)
from .remote.connection import HostTarget, SSHSettings, connect, destination_problem, parse_destination
from .remote.deadlines import closes_on_hang
from .remote.errors import DEAD_PEER, NO_RUNNER, RemoteError
from .remote.pool import FDS_PER_HOST, ConnectionPool, hosts_at_once_for_fds, pool_key
from .remote.protocol import PROTOCOL
from .remote.runner_cache import runner_file_name
from .remote.session import Heartbeat, HostRun, probe_host, run_on_host
from .remote.tunnel import RemoteForward
from .results import (
    FleetPlan,
    HostCheck,
    HostResult,
    HostStatus,
    RunResult,
    aggregate_status,
    failure_reason,
    summary_table,
)
from .settings import HELPER_MODES, KILL_GRACE, Settings
from .signals import catch_stop_signals, restore_signals
from .signing import load_public_key, verify_file

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_CAP = 4 * 1024 * 1024
CAP_SLACK = 4096   # the runner's "[cronium-runner: N bytes of stdout dropped by output_cap]" lines
FULL_OUTPUT_CAP = 1 << 40  # the runner's cap with --output-dir: in effect none


@dataclass
class RunRequest:
    event_id: int
    hosts: list[str] | None = None  # -H values; None: the event's servers
    job_id: str | None = None
    input: Any = None
    helper_mode: str | None = None  # auto | api | bundled; None: settings
    parallel: int | None = None
    timeout: float | None = None  # override the event's timeout (seconds)
    keep_workdir: bool = False
    output_cap: int = DEFAULT_OUTPUT_CAP
    key_files: tuple[str, ...] = ()  # -i KEY: for destinations and servers stored without a credential
    claim: QueueClaim | None = None  # a job a serve worker claimed: rows only while its lease holds
    # run control (control.py): what is given here wins over a Cronium job's payload.fleet
    batch: str | Sequence[int | str] | None = None  # "1,10%,100%", or [1, "10%", "100%"]
    max_failures: int | str | None = None  # N or "P%"
    fail_fast: bool = False  # max_failures 0
    max_unreachable: int | str | None = None  # N or "P%", counted apart from script failures
    connect_retries: int | str | None = None  # None: the job's, else 1
    output_dir: str | os.PathLike[str] | None = None  # each host's full stdout/stderr in NAME.stdout/.stderr
    rerun_of: int | None = None  # a log id: run on that run's hosts that did not succeed (see rerun_only)
    rerun_only: RerunOnly = "all"  # all | failed | unreachable

    def __post_init__(self) -> None:
        self.control()  # a bad value is refused here, before anything is opened or written
        if self.rerun_only not in RERUN_STATES:
            raise ConfigError(f"--only must be one of {', '.join(RERUN_STATES)}, got {self.rerun_only!r}")

    def control(self, job_fleet: Any = None) -> RunControl:
        fields = {name: getattr(self, name) for name in
                  ("batch", "max_failures", "fail_fast", "max_unreachable", "connect_retries", "output_dir")}
        return RunControl.from_fields(fields, job_fleet=job_fleet, job_id=self.job_id)


# --------------------------------------------------------------------------------------------
# targets

@dataclass
class Target:
    host: HostTarget
    server_id: int | None
    name: str
    address: str


def _server_target(s: ResolvedServer, key_files: tuple[str, ...] = ()) -> Target:
    return Target(HostTarget(name=s.name, host=s.address, port=s.port, user=s.username, server_id=s.id,
                             private_key=s.private_key, password=s.password, key_files=key_files),
                  s.id, s.name, s.address)


def resolve_targets(session: Session, event: ResolvedEvent, hosts: list[str] | None,
                    key_files: tuple[str, ...] = ()) -> list[Target]:
    """The event's servers, or the -H values: a server's name/address uses its record, anything
    else is an SSH destination (``[user@]host[:port]``, resolved through ~/.ssh/config). A value
    that is neither (a typo) is refused, naming the user's servers it is close to."""
    if not hosts:
        return [_server_target(s, key_files) for s in event.servers]
    key = load_key()
    targets: list[Target] = []
    for value in hosts:
        value = value.strip()
        if not value:
            continue
        row = find_server(session, value, user_id=event.user_id)
        if row is not None:
            targets.append(_server_target(server_credentials(row, key), key_files))
            continue
        user, host, port = parse_destination(value)
        problem = destination_problem(host)
        if problem:
            names = server_names(session, event.user_id)
            close = sorted(difflib.get_close_matches(value, names, n=3, cutoff=0.6))
            raise ConfigError(
                f"-H {value!r} is neither one of your servers nor a host that resolves ({problem}); "
                + (f"did you mean {' or '.join(close)}?" if close else
                   f"your servers: {', '.join(names[:20]) or 'none'} (`cronium-fab events` lists each event's)"))
        targets.append(Target(HostTarget(name=value, host=host, port=port, user=user, key_files=key_files),
                              None, value, host))
    if not targets:
        raise CroniumFabError("-H was given but names no host")
    unique: list[Target] = []
    seen: set[object] = set()
    for t in targets:  # the same server named twice (by name and by address) runs once
        ident = t.server_id if t.server_id is not None else (t.host.host, t.host.port, t.host.user)
        if ident not in seen:
            seen.add(ident)
            unique.append(t)
    return unique


# --------------------------------------------------------------------------------------------
# the run

def load_runner(settings: Settings) -> RunnerArtifact:
    """The local runner, signature-verified. The upload re-checks the file against this digest,
    so the bytes that reach a host are the bytes whose signature we checked."""
    data = verify_file(settings.runner_path, load_public_key(settings.public_key))
    return RunnerArtifact(settings.runner_path, hashlib.sha256(data).hexdigest(), len(data))


def _ssh_settings(settings: Settings) -> SSHSettings:
    return SSHSettings(
        host_key_policy=settings.host_key_policy,  # type: ignore[arg-type]
        known_hosts_path=settings.known_hosts,
        connect_timeout=settings.connect_timeout,
        keepalive_interval=int(settings.keepalive),
        retry_delay=settings.connect_retry_delay,
    )


class Cancel:
    """The run's cancel flag and, when a signal set it, why ("the controller received SIGINT")."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self.reason: str | None = None

    def by_signal(self, signame: str) -> None:
        self.stop(f"the controller received {signame}" + (" (Ctrl-C)" if signame == "SIGINT" else ""))

    def stop(self, reason: str) -> None:
        """Cancel the run because of ``reason`` (the first reason given is the one shown)."""
        self.reason = self.reason or reason
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def message(self, what: str) -> str:
        return f"{what}: {self.reason}" if self.reason else what


@contextmanager
def _interrupts_cancel(cancel: Cancel) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP cancel the run (and say which) instead of killing us mid-record."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        cancel.by_signal(signal.Signals(signum).name)

    previous = catch_stop_signals(handler)   # `nohup cronium-fab run-event ...` survives logout
    try:
        yield
    finally:
        restore_signals(previous)


def _phase_times(run: HostRun | None, started: datetime, connected: datetime | None) -> dict[str, datetime | None]:
    """executions phase columns: setup = connect + runner bootstrap/install, then the script, then
    the runner's cleanup (from its result record)."""
    phases: dict[str, datetime | None] = {"setup_started_at": started, "setup_completed_at": connected}
    if run is None or connected is None:
        return phases
    setup_done = connected + timedelta(seconds=run.setup_s or 0.0)
    phases["setup_completed_at"] = setup_done
    if run.execution_s is not None:
        exec_done = setup_done + timedelta(seconds=run.execution_s)
        phases["execution_started_at"] = setup_done
        phases["execution_completed_at"] = exec_done
        cleanup_ms = ((run.result or {}).get("durations_ms") or {}).get("cleanup")
        if cleanup_ms is not None:
            phases["cleanup_started_at"] = exec_done - timedelta(milliseconds=cleanup_ms)
            phases["cleanup_completed_at"] = exec_done
    return phases


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, resolved and verified before any row is written."""

    settings: Settings
    request: RunRequest
    mode: str                       # auto | api | bundled
    event: ResolvedEvent
    targets: tuple[Target, ...]
    variables: dict[str, Any]       # the user's variables (bundled mode pre-fills them)
    payload: VerifiedPayload
    runner: RunnerArtifact
    timeout: float                  # the script's, in seconds
    ssh: SSHSettings
    control: RunControl = field(default_factory=RunControl)
    batches: tuple[range, ...] = ()  # host indexes of each batch, in order
    skipped: tuple[SkippedServer, ...] = ()  # servers left out (archived; gone since the run reran)
    input: Any = None               # the request's, or the rerun run's
    output_dir: Path | None = None

    @property
    def trigger(self) -> str:
        return "job" if self.request.job_id else "manual"

    def batch_of(self, index: int) -> int:
        return next(n for n, b in enumerate(self.batches, 1) if index in b)


@dataclass(frozen=True)
class _Resolved:
    event: ResolvedEvent
    control: RunControl
    targets: list[Target]
    skipped: tuple[SkippedServer, ...]
    input: Any
    variables: dict[str, Any]


def _resolve(request: RunRequest, db: Database) -> _Resolved:
    """What a run's request names, read from the database (nothing written): the event, the run
    control (the request's over the job's ``payload.fleet``), the targets (a rerun's: that run's)."""
    input_data = request.input
    with db.session() as s:
        payload_of_job = job_payload(s, request.job_id) if request.job_id else None
        control = request.control(payload_of_job.get("fleet") if isinstance(payload_of_job, dict) else None)
        event = resolve_event(s, request.event_id, require_servers=not request.hosts and request.rerun_of is None)
        skipped: tuple[SkippedServer, ...] = tuple(event.skipped)
        if request.rerun_of is not None:
            if request.hosts:
                raise ConfigError("a rerun runs on the hosts of the run it reruns: -H/--hosts cannot go with it")
            targets, skipped, previous_input = rerun_targets(s, event, request.rerun_of, request.rerun_only)
            if input_data is None:
                input_data = previous_input
        else:
            targets = resolve_targets(s, event, request.hosts, request.key_files)
        variables = user_variables(s, event.user_id)
    return _Resolved(event, control, targets, skipped, input_data, variables)


def plan_run(settings: Settings, request: RunRequest, db: Database) -> RunPlan:
    """Resolve the event, its targets, payload and runner. Raises CroniumFabError for bad input."""
    mode = _helper_mode(settings, request)
    r = _resolve(request, db)
    store = PayloadStore(db, settings.payload_dir, signing_key=settings.signing_key, public_key=settings.public_key)
    payload = store.load_verified(r.event.id)
    output_dir = prepare_output_dir(r.control.output_dir) if r.control.output_dir else None
    return RunPlan(settings=settings, request=request, mode=mode, event=r.event, targets=tuple(r.targets),
                   variables=r.variables, payload=payload, runner=load_runner(settings),
                   timeout=request.timeout if request.timeout is not None else r.event.timeout_seconds,
                   ssh=_ssh_settings(settings), control=r.control, batches=tuple(r.control.batches(len(r.targets))),
                   skipped=r.skipped, input=r.input, output_dir=output_dir)


def _helper_mode(settings: Settings, request: RunRequest) -> str:
    mode = request.helper_mode or settings.helper_mode
    if mode not in HELPER_MODES:
        raise CroniumFabError(f"helper mode {mode!r} is not one of {', '.join(HELPER_MODES)}")
    return mode


def plan_fleet(settings: Settings, request: RunRequest, *, cancel: threading.Event | None = None) -> FleetPlan:
    """``run-event --plan``: resolve the hosts and batches and check each host (reachable, host
    key known, python3 >= 3.8, runner cached) with one probe exec that runs no script. Nothing is
    written: no row, no host key (an unknown key is looked at, never recorded), no runner, no
    payload build, no output directory. Raises CroniumFabError for bad input, as a run would."""
    _helper_mode(settings, request)
    db = Database(settings.database_url)
    try:
        db.check()
        r = _resolve(request, db)
        store = PayloadStore(db, settings.payload_dir, signing_key=settings.signing_key,
                             public_key=settings.public_key)
        version, current = store.payload_state(r.event.id)
    finally:
        db.dispose()
    runner = load_runner(settings)
    payload = (f"v{version}, current" if current else
               f"v{version}, stale: the run rebuilds and signs it first" if version else
               "not built yet: the run builds and signs it first")
    ssh = _ssh_settings(settings)
    unknown_ok = settings.host_key_policy == "accept-new"
    look = replace(ssh, host_key_policy="accept-once" if unknown_ok else "strict")
    batches = r.control.batches(len(r.targets))
    checks = [HostCheck(name=t.name, host=t.address, server_id=t.server_id,
                        batch=next(n for n, b in enumerate(batches, 1) if i in b)) for i, t in enumerate(r.targets)]
    stop = cancel or threading.Event()

    def check(i: int) -> None:
        target, c = r.targets[i], checks[i]
        try:
            conn, c.connect_attempts = connect(target.host, look, retries=r.control.connect_retries, cancel=stop)
        except RemoteError as exc:
            c.error, c.error_kind, c.connect_attempts = str(exc), exc.kind, exc.attempts
            c.reachable = exc.kind in ("auth-refused", "host-key-unknown", "host-key-changed", "key-invalid")
            c.host_key = {"host-key-unknown": "unknown", "host-key-changed": "changed"}.get(exc.kind, c.host_key)
            return
        try:
            c.reachable = True
            c.host_key = "unknown" if getattr(conn, "first_contact", None) else "known"
            if c.host_key == "unknown":
                c.error = f"host key {conn.first_contact} is not known yet: the run records it (accept-new)"
            probe = probe_host(conn, runner.sha256, settings.setup_timeout)
        except RuntimeError as exc:
            c.error, c.error_kind = str(exc), "remote"
            return
        finally:
            conn.close()
        c.runner = None if probe.runner_cached is None else "cached" if probe.runner_cached else "install"
        if probe.python is None:
            c.error, c.error_kind = "python3 is not on the login PATH: the runner needs Python >= 3.8", "python-missing"
            return
        c.python = ".".join(map(str, probe.python))
        if probe.python < (3, 8):
            c.error, c.error_kind = f"python3 is {c.python}: the runner needs Python >= 3.8", "python-too-old"
            return
        c.ready = True

    parallel = hosts_at_once_for_fds(_wanted_at_once(request, settings, len(r.targets)))
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cronium-plan") as pool:
        list(pool.map(check, range(len(r.targets))))
    return FleetPlan(event_id=r.event.id, event_name=r.event.name, event_type=r.event.type, payload=payload,
                     hosts=checks, control=r.control.to_payload(), parallel=parallel,
                     skipped=[{"server_id": s.id, "name": s.name, "reason": s.reason} for s in r.skipped],
                     rerun_of=request.rerun_of)


class NothingToRerun(CroniumFabError):
    """The run named has no host in the states asked for."""


def rerun_targets(session: Session, event: ResolvedEvent, log_id: int, only: str
                  ) -> tuple[list[Target], tuple[SkippedServer, ...], Any]:
    """The hosts of run ``log_id`` that ended in one of ``RERUN_STATES[only]``, in that run's
    order, resolved again (a server's current record and credentials; a -H destination as it
    was written); servers deleted or archived since are left out with the reason. Also returns
    that run's input."""
    previous = stored_run(session, log_id)
    if previous is None:
        raise CroniumFabError(f"run {log_id} not found: give a log id (`cronium-fab runs` lists them)")
    if previous.event_id != event.id:
        raise CroniumFabError(f"run {log_id} is a run of event {previous.event_id}, not of event {event.id}")
    if previous.log_status in ("PENDING", "RUNNING"):
        raise CroniumFabError(f"run {log_id} is still {previous.log_status}: rerun it once it has ended")
    wanted = RERUN_STATES[only]
    chosen = [h for h in previous.hosts if host_state_of(h.exec_status, h.host_status) in wanted]
    if not chosen:
        states = ", ".join(sorted(wanted))
        raise NothingToRerun(f"run {log_id} has no host that ended {states}: nothing to rerun "
                             f"(`cronium-fab show {log_id}` shows its hosts)")
    key = load_key()
    targets: list[Target] = []
    gone: list[SkippedServer] = []
    for h in chosen:
        if h.server_id is None:
            user, host, port = parse_destination(h.name)
            targets.append(Target(HostTarget(name=h.name, host=host, port=port, user=user), None, h.name, host))
            continue
        row = get_server(session, h.server_id)
        if row is None or row.is_archived or row.user_id != event.user_id:
            what = "deleted" if row is None else "archived" if row.is_archived else "no longer the event user's"
            gone.append(SkippedServer(h.server_id, h.name, f"server {what} since run {log_id}"))
        else:
            targets.append(_server_target(server_credentials(row, key)))
    if not targets:
        raise NothingToRerun(f"run {log_id}: every host to rerun is gone ("
                             + "; ".join(f"{g.name}: {g.reason}" for g in gone) + ")")
    return targets, tuple(gone), previous.input


def rerun_request(db: Database, log_id: int, **fields: Any) -> RunRequest:
    """A ``RunRequest`` that reruns run ``log_id`` (its event; ``fields`` as RunRequest's, e.g.
    ``rerun_only="failed"``, ``batch="1,100%"``)."""
    with db.session() as s:
        previous = stored_run(s, log_id)
    if previous is None or previous.event_id is None:
        raise CroniumFabError(f"run {log_id} not found: give a log id (`cronium-fab runs` lists them)")
    return RunRequest(event_id=previous.event_id, rerun_of=log_id, **fields)


def run_event(settings: Settings, request: RunRequest, *, out: IO[str] | None = sys.stderr,
              cancel: threading.Event | Cancel | None = None,
              on_host_done: Callable[[HostResult], None] | None = None, live_status: bool = False,
              connection_slots: threading.Semaphore | None = None,
              connections: ConnectionPool | None = None) -> RunResult:
    """Run one event on all its hosts and record everything. Raises CroniumFabError for bad input
    (before any row is written); host failures are results, not exceptions. ``cancel`` stops the
    run (a ``Cancel`` says why); ``live_status``: ``out`` is a terminal, keep a status line at its
    bottom (``output.TerminalView``); ``connection_slots`` bounds the hosts of several runs at once;
    ``connections``: keep each host's connection after a clean run, for the next (``serve``)."""
    t0 = time.monotonic()
    stop = cancel if isinstance(cancel, Cancel) else Cancel(cancel)
    # SIGTERM/SIGINT become "cancel" for the whole run, so a signal never kills us mid-write
    with _interrupts_cancel(stop):
        db = Database(settings.database_url)
        try:
            db.check()
            recover_lost_runs(db)   # rows a killed controller of this host left open
            plan = plan_run(settings, request, db)
            recorder = RunRecorder(db, claim=request.claim)
            # bad input stops before this line; from here on every row must end in a terminal state
            ctx = recorder.start(
                event_id=plan.event.id, event_name=plan.event.name, event_type=plan.event.type,
                user_id=plan.event.user_id, job_id=request.job_id, input_data=plan.input,
                new_job_payload=hand_run_payload(plan.event, [t.server_id for t in plan.targets], plan.input,
                                                 request.timeout, fleet=plan.control.to_payload()),
                metadata={"rerunOf": request.rerun_of} if request.rerun_of is not None else None)
            names = [t.name for t in plan.targets]
            printer = TerminalView(out, names) if live_status and out is not None else LivePrinter(out, names)
            run = EventRun(plan, db, recorder, ctx, printer=printer, cancel=stop, on_host_done=on_host_done,
                           connection_slots=connection_slots, connections=connections)
            return run.run(t0)
        finally:
            db.dispose()


def _wanted_at_once(request: RunRequest, settings: Settings, hosts: int) -> int:
    """Hosts at once as asked (``--parallel``, else the settings), never more than there are."""
    return max(1, min(request.parallel or settings.parallel, hosts))


class EventRun:
    """The state of one run, shared by the host workers (each host only touches its own HostResult)."""

    def __init__(self, plan: RunPlan, db: Database, recorder: RunRecorder, ctx: JobContext, *,
                 printer: LivePrinter, cancel: Cancel, on_host_done: Callable[[HostResult], None] | None,
                 connection_slots: threading.Semaphore | None = None,
                 connections: ConnectionPool | None = None) -> None:
        self.plan = plan
        self.connection_slots = connection_slots
        self.connections = connections
        self.db = db
        self.recorder = recorder
        self.ctx = ctx
        self.cancel = cancel
        self.on_host_done = on_host_done
        self.printer = printer
        self.budget = Budget(plan.control, len(plan.targets))
        self.results = [
            HostResult(server_id=t.server_id, name=t.name, host=t.address, batch=plan.batch_of(i),
                       execution_id=execution_id_for(ctx.job_id, t.server_id if t.server_id is not None else f"h{i}"))
            for i, t in enumerate(plan.targets)
        ]
        self.api: HelperAPI | None = None
        self._started: set[int] = set()
        self._files = output_file_stems([t.name for t in plan.targets]) if plan.output_dir else None

    # -- the whole run ------------------------------------------------------------------------
    def run(self, t0: float) -> RunResult:
        plan, recorder, ctx, results = self.plan, self.recorder, self.ctx, self.results
        event = plan.event
        try:
            try:
                recorder.add_executions(ctx.job_id, [
                    (r.execution_id, t.server_id, t.name,
                     {"host": t.address, "trigger": plan.trigger, "index": i, "batch": r.batch})
                    for i, (t, r) in enumerate(zip(plan.targets, results, strict=True))])
                if plan.mode == "bundled":
                    self._run_hosts()
                else:
                    s = plan.settings
                    lifetime = plan.timeout + KILL_GRACE + s.watchdog_margin + s.setup_timeout + 300
                    with HelperAPI(self.db, secret=s.api_secret, lifetime_s=lifetime) as api:
                        self.api = api
                        try:
                            self._run_hosts()
                        finally:
                            self.api = None
            finally:
                self.printer.close()
            states = [r.status for r in results]
            status = aggregate_status(states, cancelled=self.cancel.is_set() and "cancelled" in states,
                                      stopped=self.budget.stopped is not None)
            result = RunResult(status=status, event_id=event.id, event_name=event.name, job_id=ctx.job_id,
                               log_id=ctx.log_id, hosts=results,
                               skipped=[{"server_id": s.id, "name": s.name, "reason": s.reason}
                                        for s in plan.skipped],
                               duration_ms=int((time.monotonic() - t0) * 1000),
                               payload_version=plan.payload.version,
                               stopped=self.budget.stopped if status == "STOPPED" else None,
                               batches=len(plan.batches), rerun_of=plan.request.rerun_of)
            recorder.finish(ctx, result)
        except BaseException as exc:
            recorder.abort(ctx, [r.execution_id for r in results], f"run aborted: {type(exc).__name__}: {exc}")
            raise
        self.printer.message(summary_table(result))
        return result

    def _stop_starting(self) -> bool:
        return self.cancel.is_set() or self.budget.stopped is not None

    def _run_hosts(self) -> None:
        plan = self.plan
        biggest = max((len(b) for b in plan.batches), default=1)
        wanted = _wanted_at_once(plan.request, plan.settings, biggest)
        parallel = hosts_at_once_for_fds(wanted)
        if parallel < wanted:
            self.printer.message(f"{parallel} hosts at once, not {wanted}: that is what this process's open files "
                                 f"limit allows ({FDS_PER_HOST} per host); raise it (ulimit -n) for more")
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cronium-host") as pool:
            for number, batch in enumerate(plan.batches, 1):
                if self._stop_starting():
                    break
                if len(plan.batches) > 1:
                    self.printer.message(f"batch {number}/{len(plan.batches)}: {len(batch)} "
                                         f"host{'s' if len(batch) != 1 else ''}")
                self._run_batch(pool, batch, parallel)
        self._end_not_started()

    def _run_batch(self, pool: ThreadPoolExecutor, batch: range, parallel: int) -> None:
        """The hosts of one batch, ``parallel`` at a time; returns when all that started ended.
        A host starts only while the budget allows it (and the run is not cancelled)."""
        waiting = deque(batch)
        first = [waiting.popleft() for _ in range(min(parallel, len(waiting)))]
        # The first hosts start at once: mark them running in one transaction, instead of one per
        # host with every thread queueing on the database at the same moment.
        self.recorder.hosts_running([self.results[i].execution_id for i in first])
        running: set[Future[None]] = {self._start(pool, i, marked=True) for i in first}
        while running:
            try:
                _done, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                self.cancel.by_signal("SIGINT")
            while waiting and len(running) < parallel and not self._stop_starting():
                running.add(self._start(pool, waiting.popleft(), marked=False))

    def _start(self, pool: ThreadPoolExecutor, i: int, *, marked: bool) -> Future[None]:
        self._started.add(i)
        return pool.submit(self._host, i, marked)

    def _end_not_started(self) -> None:
        """Hosts whose turn never came: ``cancelled`` (a signal) or ``skipped`` (the budget)."""
        left = [r for i, r in enumerate(self.results) if i not in self._started]
        if not left:
            return
        status: HostStatus
        if self.cancel.is_set():
            status, reason = "cancelled", self.cancel.message("cancelled before start")
        else:
            status, reason = "skipped", f"not started: {self.budget.stopped or 'the run stopped'}"
        for res in left:
            res.status, res.error = status, reason
        self.recorder.hosts_not_started([r.execution_id for r in left], status, reason)
        for res in left:
            self.printer.host_finished(res.name, res.status)
            if self.on_host_done is not None:
                self.on_host_done(res)

    # -- one host -----------------------------------------------------------------------------
    def _host(self, i: int, marked: bool) -> None:
        res = self.results[i]
        try:
            if self.connection_slots is None:
                self._run_host(i, self.plan.targets[i], res, marked)
            else:
                with self.connection_slots:
                    self._run_host(i, self.plan.targets[i], res, marked)
        except Exception as exc:  # never lose a host's row because of a bug: record it, minimally
            res.status, res.error_kind = "failure", "internal"
            res.error = f"internal error: {type(exc).__name__}: {exc}"[:2000]
            log.debug("host %s: internal error", res.name, exc_info=True)
            self.recorder.host_failed(res.execution_id, res.error)
        reason = self.budget.record(res.status)
        if reason is not None and any(j not in self._started for j in range(len(self.results))):
            self.printer.message(f"stopping: {reason}; running hosts finish, no new host starts")
        self.printer.host_finished(res.name, res.status)
        if self.on_host_done is not None:
            self.on_host_done(res)

    def _run_host(self, i: int, target: Target, res: HostResult, marked: bool) -> None:
        if self.cancel.is_set():
            res.status, res.error = "cancelled", self.cancel.message("cancelled before start")
            self._finish_host(res, None, None, None)
            return
        t0 = time.monotonic()
        started = utcnow()
        if not marked:
            self.recorder.hosts_running([res.execution_id])
        self.printer.host_started(target.name)
        # The runner enforces output_cap and says what it dropped (head, a marker, tail); ours only
        # bounds memory against a runner that does not, with room for its marker: one cap, one marker.
        # (With --output-dir the runner keeps everything and this buffer is the only cap.)
        cap = self.plan.request.output_cap + (0 if self.plan.output_dir else CAP_SLACK)
        stdout, stderr = CappedBuffer(cap), CappedBuffer(cap)
        files = HostFiles(self.plan.output_dir, self._files[i]) if self.plan.output_dir and self._files else None

        def on_record(kind: str, ts: float, data: bytes) -> None:
            (stdout if kind == "stdout" else stderr).add(data)
            if files is not None:
                files.write(kind, data)
            self.printer.feed(target.name, kind, data)

        try:
            run, phases, deployment, connected = self._connect_and_run(target, res, started, on_record)
        finally:
            if files is not None:
                files.close()
        self.printer.flush(target.name)
        res.stdout, res.stderr = stdout.text(), stderr.text()
        if res.status == "failure" and res.error is None:
            res.error = failure_reason(res.exit_code, res.signal, res.stderr)
        res.duration_ms = int((time.monotonic() - t0) * 1000)
        self._finish_host(res, run, phases, deployment)

    def _connect_and_run(self, target: Target, res: HostResult, started: datetime,
                         on_record: Callable[[str, float, bytes], None]
                         ) -> tuple[HostRun | None, dict[str, datetime | None], Deployment | None, datetime | None]:
        connected: datetime | None = None
        run: HostRun | None = None
        deployment: Deployment | None = None
        pool, key = self.connections, ""
        try:
            conn = None
            if pool is not None:
                key = pool_key(target.host, self.plan.ssh)
                conn = pool.take(key, self.plan.ssh)
                res.connection_reused = conn is not None
            if conn is None:
                conn, res.connect_attempts = connect(target.host, self.plan.ssh,
                                                     retries=self.plan.control.connect_retries, cancel=self.cancel.event)
                if pool is not None:
                    pool.opened(conn)
        except RemoteError as exc:
            res.status, res.connect_attempts = "unreachable", exc.attempts
            res.error, res.error_kind = str(exc), exc.kind
            if self.cancel.is_set() and exc.kind in ("connection-refused", "connection-reset", "timeout"):
                res.status, res.error = "cancelled", self.cancel.message(f"cancelled while connecting ({exc})")
        else:
            connected = utcnow()
            try:
                with self._helpers_for(conn, target, res, started) as api_header:
                    if res.error is None:
                        plan = self.plan
                        run = run_on_host(conn, plan.runner, self._header(target, res, api_header),
                                          plan.payload.content.data, on_record=on_record, cancel=self.cancel.event,
                                          watchdog_s=plan.timeout + KILL_GRACE + plan.settings.watchdog_margin,
                                          setup_timeout_s=plan.settings.setup_timeout,
                                          heartbeat=Heartbeat(plan.settings.heartbeat_interval,
                                                              plan.settings.heartbeat_timeout))
                        _apply_run(res, run)
                        if res.status == "cancelled" and self.cancel.reason:
                            res.error = self.cancel.message("cancelled")
                        if run.error_kind in DEAD_PEER:
                            conn.close()  # a dead or frozen peer: never wait on it again (tunnel cancel)
                        if self.api is not None and res.helper_mode == "api":
                            _merge_api_state(res, self.api.unregister(res.execution_id))
            finally:
                if pool is None:
                    conn.close()
                elif run is not None and run.result is not None and run.error_kind is None and not self.cancel.is_set():
                    pool.give(key, conn)     # a clean run: the next run on this host starts on it
                else:
                    pool.discard(conn)
            if run is not None and target.server_id is not None and run.error_kind not in NO_RUNNER:
                deployment = Deployment(
                    server_id=target.server_id, runner_version=__version__,
                    runner_path=f"${{XDG_CACHE_HOME:-~/.cache}}/cronium/{runner_file_name(self.plan.runner.sha256)}",
                    checksum=self.plan.runner.sha256, installed=run.runner_installed,
                    ok=run.error_kind != "runner-install-failed")
        return run, _phase_times(run, started, connected), deployment, connected

    @contextmanager
    def _helpers_for(self, conn: Any, target: Target, res: HostResult, started: datetime
                     ) -> Iterator[dict[str, Any] | None]:
        """API mode for this host: register the execution, open the remote forward, yield the
        header's ``api`` part; in ``auto`` a refused forward falls back to bundled mode (noted)."""
        api = self.api
        if api is None:
            res.helper_mode = "bundled"
            yield None
            return
        event = self.plan.event
        token = api.register_execution(ExecutionContext(
            execution_id=res.execution_id, job_id=self.ctx.job_id, event_id=event.id,
            event_name=event.name, user_id=event.user_id, server_id=target.server_id,
            server_name=target.name, input=self.ctx.input, trigger=self.plan.trigger, started_at=started))
        fwd = RemoteForward(conn, "127.0.0.1", api.port, name=target.name)
        try:
            with closes_on_hang(conn, self.plan.settings.setup_timeout):
                fwd.open()
        except RemoteError as exc:
            api.unregister(res.execution_id)
            conn.reusable = False   # whatever the server made of the request, no other run inherits it
            if self.plan.mode == "api":
                res.status, res.error_kind = "failure", exc.kind
                res.error = f"API mode needs SSH remote forwarding, which this host refused: {exc}"
                res.helper_mode = "api"
            else:
                res.helper_mode = "bundled"
                res.helper_mode_note = f"fell back to bundled mode: {exc}"
                self.printer.message(f"{target.name}: {res.helper_mode_note}")
            yield None
            return
        res.helper_mode = "api"
        try:
            yield {"endpoint": f"http://127.0.0.1:{fwd.remote_port}", "token": token}
        finally:
            with closes_on_hang(conn, 10.0):
                fwd.close()
            if not fwd.cancelled:
                conn.close()   # the server may still listen for this run: the connection serves no other
            if res.helper_mode == "api":
                api.unregister(res.execution_id)

    def _header(self, target: Target, res: HostResult, api_header: dict[str, Any] | None) -> dict[str, Any]:
        plan, event, content = self.plan, self.plan.event, self.plan.payload.content
        header: dict[str, Any] = {
            "protocol": PROTOCOL,
            "payload_sha256": content.sha256,
            "payload_size": len(content.data),
            "manifest": content.manifest,
            "manifest_sha256": content.manifest_sha256,
            "job_id": self.ctx.job_id, "execution_id": res.execution_id, "event_id": event.id,
            "event_name": event.name, "server_id": target.server_id, "server_name": target.name,
            "user_id": event.user_id, "trigger": plan.trigger,
            "helper_mode": "api" if api_header else "bundled",
            "env": event.env, "variables": plan.variables, "input": self.ctx.input,
            "timeout": plan.timeout, "kill_grace": KILL_GRACE, "limits": {},
            # --output-dir keeps all of it: the runner streams everything, the records keep the tail
            "output_cap": FULL_OUTPUT_CAP if plan.output_dir else plan.request.output_cap,
            "keep_workdir": plan.request.keep_workdir,
        }
        if api_header:
            header["api"] = api_header
        return header

    def _finish_host(self, res: HostResult, run: HostRun | None, phases: dict[str, datetime | None] | None,
                     deployment: Deployment | None) -> None:
        # API mode: the API stored every variable the moment the script set it; never twice
        self.recorder.host_finished(res, phases=phases or {}, user_id=self.plan.event.user_id,
                                    write_variables=res.helper_mode == "bundled", deployment=deployment)


def _merge_api_state(res: HostResult, state: HelperState) -> None:
    """What the API served is the truth in API mode (the runner's local record is a copy)."""
    if state.output_set:
        res.output = state.output
    if state.condition is not None:
        res.condition = state.condition
    if state.variables_set:
        res.variables = {**res.variables, **state.variables_set}


# a host whose runner delivered no result: its state by the kind of failure (else "failure")
STATUS_WITHOUT_RESULT: dict[str, HostStatus] = {"cancelled": "cancelled", "watchdog-timeout": "timeout",
                                                "disconnected": "unreachable", "unresponsive": "unreachable"}
# the runner's result "status" -> the host's state (anything else: "failure")
RUNNER_STATUS: dict[str, HostStatus] = {s: s for s in ("success", "failure", "timeout", "cancelled")}


def _apply_run(res: HostResult, run: HostRun) -> None:
    res.runner_cached = run.runner_cached
    r = run.result
    if r is None:
        res.error, res.error_kind = run.error, run.error_kind
        res.status = STATUS_WITHOUT_RESULT.get(run.error_kind or "", "failure")
        return
    res.exit_code = r.get("exit_code")
    res.signal = r.get("signal")
    res.output = r.get("output")
    res.variables = r.get("variables") or {}
    res.condition = r.get("condition")
    res.error, res.error_kind = r.get("error"), r.get("error_kind")
    status = r.get("status")
    res.status = RUNNER_STATUS.get(status or "", "failure")
