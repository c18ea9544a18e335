"""One event run across all its hosts: resolve → payload → runner → parallel hosts → aggregate → record.

Usable from Python with no CLI::

    from cronium_fab.execute import RunRequest, run_event
    result = run_event(Settings.from_env(), RunRequest(event_id=7))
    print(result.status, [h.status for h in result.hosts])

Hosts run in a bounded thread pool (``parallel``); each host's row is written the moment it
finishes, so one slow or dead host never delays the others' results. Human output (live lines
prefixed by the server name, then a summary table) goes to ``out`` (stderr in the CLI); the
JSON document is for stdout.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy.orm import Session

from . import __version__
from .build import RunnerArtifact
from .db.crypto import load_key
from .db.engine import Database
from .db.models import utcnow
from .db.queries import (
    ResolvedEvent,
    ResolvedServer,
    find_server,
    resolve_event,
    server_credentials,
    server_names,
    user_variables,
)
from .errors import ConfigError, CroniumFabError
from .helper_api import ExecutionContext, HelperAPI, HelperState
from .output import CappedBuffer, LivePrinter
from .payloads import PayloadStore, VerifiedPayload
from .records import (
    Deployment,
    JobContext,
    QueueClaim,
    RunRecorder,
    execution_id_for,
    hand_run_payload,
    recover_lost_runs,
)
from .remote.connection import (
    HostTarget,
    SSHSettings,
    destination_problem,
    open_connection,
    parse_destination,
)
from .remote.errors import DEAD_PEER, NO_RUNNER, RemoteError
from .remote.runner_cache import runner_file_name
from .remote.session import HostRun, run_on_host
from .remote.tunnel import RemoteForward
from .results import HostResult, HostStatus, RunResult, aggregate_status, failure_reason, summary_table
from .settings import HELPER_MODES, Settings
from .signals import catch_stop_signals, restore_signals
from .signing import load_public_key, verify_file

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_CAP = 4 * 1024 * 1024
CAP_SLACK = 4096   # the runner's "[cronium-runner: N bytes of stdout dropped by output_cap]" lines
KILL_GRACE = 5.0


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

    @property
    def trigger(self) -> str:
        return "job" if self.request.job_id else "manual"


def plan_run(settings: Settings, request: RunRequest, db: Database) -> RunPlan:
    """Resolve the event, its targets, payload and runner. Raises CroniumFabError for bad input."""
    mode = request.helper_mode or settings.helper_mode
    if mode not in HELPER_MODES:
        raise CroniumFabError(f"helper mode {mode!r} is not one of {', '.join(HELPER_MODES)}")
    with db.session() as s:
        event = resolve_event(s, request.event_id, require_servers=not request.hosts)
        targets = resolve_targets(s, event, request.hosts, request.key_files)
        variables = user_variables(s, event.user_id)
    store = PayloadStore(db, settings.payload_dir, signing_key=settings.signing_key, public_key=settings.public_key)
    payload = store.load_verified(event.id)
    return RunPlan(settings=settings, request=request, mode=mode, event=event, targets=tuple(targets),
                   variables=variables, payload=payload, runner=load_runner(settings),
                   timeout=request.timeout if request.timeout is not None else event.timeout_seconds,
                   ssh=_ssh_settings(settings))


def run_event(settings: Settings, request: RunRequest, *, out: IO[str] | None = sys.stderr,
              cancel: threading.Event | Cancel | None = None,
              on_host_done: Callable[[HostResult], None] | None = None,
              connection_slots: threading.Semaphore | None = None) -> RunResult:
    """Run one event on all its hosts and record everything. Raises CroniumFabError for bad input
    (before any row is written); host failures are results, not exceptions. ``cancel`` stops the
    run (a ``Cancel`` says why); ``connection_slots`` bounds the hosts of several runs at once."""
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
                user_id=plan.event.user_id, job_id=request.job_id, input_data=request.input,
                new_job_payload=hand_run_payload(plan.event, [t.server_id for t in plan.targets], request.input,
                                                 request.timeout))
            run = EventRun(plan, db, recorder, ctx, out=out, cancel=stop, on_host_done=on_host_done,
                           connection_slots=connection_slots)
            return run.run(t0)
        finally:
            db.dispose()


class EventRun:
    """The state of one run, shared by the host workers (each host only touches its own HostResult)."""

    def __init__(self, plan: RunPlan, db: Database, recorder: RunRecorder, ctx: JobContext, *,
                 out: IO[str] | None, cancel: Cancel, on_host_done: Callable[[HostResult], None] | None,
                 connection_slots: threading.Semaphore | None = None) -> None:
        self.plan = plan
        self.connection_slots = connection_slots
        self.db = db
        self.recorder = recorder
        self.ctx = ctx
        self.cancel = cancel
        self.on_host_done = on_host_done
        self.printer = LivePrinter(out, [t.name for t in plan.targets])
        self.results = [
            HostResult(server_id=t.server_id, name=t.name, host=t.address,
                       execution_id=execution_id_for(ctx.job_id, t.server_id if t.server_id is not None else f"h{i}"))
            for i, t in enumerate(plan.targets)
        ]
        self.api: HelperAPI | None = None
        self._started_together: set[str] = set()

    # -- the whole run ------------------------------------------------------------------------
    def run(self, t0: float) -> RunResult:
        plan, recorder, ctx, results = self.plan, self.recorder, self.ctx, self.results
        event = plan.event
        try:
            recorder.add_executions(ctx.job_id, [(r.execution_id, t.server_id, t.name,
                                                  {"host": t.address, "trigger": plan.trigger})
                                                 for t, r in zip(plan.targets, results, strict=True)])
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
            states = [r.status for r in results]
            status = aggregate_status(states, cancelled=self.cancel.is_set() and "cancelled" in states)
            result = RunResult(status=status, event_id=event.id, event_name=event.name, job_id=ctx.job_id,
                               log_id=ctx.log_id, hosts=results,
                               skipped=[{"server_id": s.id, "name": s.name, "reason": s.reason}
                                        for s in event.skipped],
                               duration_ms=int((time.monotonic() - t0) * 1000),
                               payload_version=plan.payload.version)
            recorder.finish(ctx, result)
        except BaseException as exc:
            recorder.abort(ctx, [r.execution_id for r in results], f"run aborted: {type(exc).__name__}: {exc}")
            raise
        self.printer.message(summary_table(result))
        return result

    def _run_hosts(self) -> None:
        parallel = max(1, min(self.plan.request.parallel or self.plan.settings.parallel, len(self.plan.targets)))
        # The first `parallel` hosts start at once: mark them running in one transaction, instead
        # of one per host with every thread queueing on the database at the same moment.
        self._started_together = {r.execution_id for r in self.results[:parallel]}
        self.recorder.hosts_running(list(self._started_together))
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cronium-host") as pool:
            pending: set[Future[None]] = {pool.submit(self._host, i) for i in range(len(self.plan.targets))}
            while pending:
                try:
                    _done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    self.cancel.by_signal("SIGINT")
                if self.cancel.is_set():
                    for f in pending:
                        f.cancel()  # hosts not started yet never start
        for res in self.results:  # hosts whose turn never came
            if res.runner_cached is None and res.status == "cancelled" and res.error is None:
                res.error = self.cancel.message("cancelled before start")
                self._finish_host(res, None, None, None)

    # -- one host -----------------------------------------------------------------------------
    def _host(self, i: int) -> None:
        res = self.results[i]
        try:
            if self.connection_slots is None:
                self._run_host(self.plan.targets[i], res)
            else:
                with self.connection_slots:
                    self._run_host(self.plan.targets[i], res)
        except Exception as exc:  # never lose a host's row because of a bug: record it, minimally
            res.status, res.error_kind = "failure", "internal"
            res.error = f"internal error: {type(exc).__name__}: {exc}"[:2000]
            log.debug("host %s: internal error", res.name, exc_info=True)
            self.recorder.host_failed(res.execution_id, res.error)
        if self.on_host_done is not None:
            self.on_host_done(res)

    def _run_host(self, target: Target, res: HostResult) -> None:
        if self.cancel.is_set():
            res.status, res.error = "cancelled", self.cancel.message("cancelled before start")
            self._finish_host(res, None, None, None)
            return
        t0 = time.monotonic()
        started = utcnow()
        if res.execution_id not in self._started_together:
            self.recorder.hosts_running([res.execution_id])
        # The runner enforces output_cap and says what it dropped (head, a marker, tail); ours only
        # bounds memory against a runner that does not, with room for its marker: one cap, one marker.
        cap = self.plan.request.output_cap + CAP_SLACK
        stdout, stderr = CappedBuffer(cap), CappedBuffer(cap)

        def on_record(kind: str, ts: float, data: bytes) -> None:
            (stdout if kind == "stdout" else stderr).add(data)
            self.printer.feed(target.name, kind, data)

        connected: datetime | None = None
        run: HostRun | None = None
        deployment: Deployment | None = None
        try:
            conn = open_connection(target.host, self.plan.ssh)
        except RemoteError as exc:
            res.status = "unreachable"
            res.error, res.error_kind = str(exc), exc.kind
        else:
            connected = utcnow()
            try:
                with self._helpers_for(conn, target, res, started) as api_header:
                    if res.error is None:
                        plan = self.plan
                        run = run_on_host(conn, plan.runner, self._header(target, res, api_header),
                                          plan.payload.content.data, on_record=on_record, cancel=self.cancel.event,
                                          watchdog_s=plan.timeout + KILL_GRACE + plan.settings.watchdog_margin,
                                          setup_timeout_s=plan.settings.setup_timeout)
                        _apply_run(res, run)
                        if res.status == "cancelled" and self.cancel.reason:
                            res.error = self.cancel.message("cancelled")
                        if run.error_kind in DEAD_PEER:
                            conn.close()  # a dead or frozen peer: never wait on it again (tunnel cancel)
                        if self.api is not None and res.helper_mode == "api":
                            _merge_api_state(res, self.api.unregister(res.execution_id))
            finally:
                conn.close()
            if run is not None and target.server_id is not None and run.error_kind not in NO_RUNNER:
                deployment = Deployment(
                    server_id=target.server_id, runner_version=__version__,
                    runner_path=f"${{XDG_CACHE_HOME:-~/.cache}}/cronium/{runner_file_name(self.plan.runner.sha256)}",
                    checksum=self.plan.runner.sha256, installed=run.runner_installed,
                    ok=run.error_kind != "runner-install-failed")
        self.printer.flush(target.name)
        res.stdout, res.stderr = stdout.text(), stderr.text()
        if res.status == "failure" and res.error is None:
            res.error = failure_reason(res.exit_code, res.signal, res.stderr)
        res.duration_ms = int((time.monotonic() - t0) * 1000)
        self._finish_host(res, run, _phase_times(run, started, connected), deployment)

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
            with _closes_on_hang(conn, self.plan.settings.setup_timeout):
                fwd.open()
        except RemoteError as exc:
            api.unregister(res.execution_id)
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
            with _closes_on_hang(conn, 10.0):
                fwd.close()
            if res.helper_mode == "api":
                api.unregister(res.execution_id)

    def _header(self, target: Target, res: HostResult, api_header: dict[str, Any] | None) -> dict[str, Any]:
        plan, event, content = self.plan, self.plan.event, self.plan.payload.content
        header: dict[str, Any] = {
            "protocol": 1,
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
            "output_cap": plan.request.output_cap, "keep_workdir": plan.request.keep_workdir,
        }
        if api_header:
            header["api"] = api_header
        return header

    def _finish_host(self, res: HostResult, run: HostRun | None, phases: dict[str, datetime | None] | None,
                     deployment: Deployment | None) -> None:
        # API mode: the API stored every variable the moment the script set it; never twice
        self.recorder.host_finished(res, phases=phases or {}, user_id=self.plan.event.user_id,
                                    write_variables=res.helper_mode == "bundled", deployment=deployment)


@contextmanager
def _closes_on_hang(conn: Any, seconds: float) -> Iterator[None]:
    """Bound a blocking SSH global request (port forward open/cancel): Paramiko waits for the
    reply as long as the transport lives, and keepalives do not kill a frozen peer. Closing the
    connection after ``seconds`` ends the wait (the request then fails like a dead connection)."""
    timer = threading.Timer(seconds, conn.close)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
                                                "disconnected": "unreachable"}
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
