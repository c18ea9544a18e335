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

import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy import or_, select

from . import __version__
from .build import RunnerArtifact
from .db.crypto import load_key
from .db.engine import Database
from .db.models import Server, utcnow
from .db.queries import ResolvedEvent, resolve_event, server_credentials, user_variables
from .errors import EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_TIMEOUT, CroniumFabError
from .helper_api import ExecutionContext, HelperAPI, HelperState
from .payloads import PayloadStore
from .records import Deployment, RunRecorder, execution_id_for, hand_run_payload
from .remote.connection import HostTarget, SSHSettings, open_connection
from .remote.errors import RemoteError
from .remote.runner_cache import runner_file_name
from .remote.session import HostRun, run_on_host
from .remote.tunnel import RemoteForward
from .settings import HELPER_MODES, Settings
from .signals import catch_stop_signals, restore_signals
from .signing import load_public_key, verify_file

log = logging.getLogger(__name__)

HOST_STATES = ("success", "failure", "timeout", "unreachable", "cancelled")
RUN_STATES = ("SUCCESS", "FAILURE", "PARTIAL", "TIMEOUT", "CANCELLED")
DEFAULT_OUTPUT_CAP = 4 * 1024 * 1024
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


@dataclass
class HostResult:
    server_id: int | None
    name: str
    host: str
    execution_id: str
    status: str = "cancelled"
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    output: Any = None
    variables: dict[str, Any] = field(default_factory=dict)
    condition: bool | None = None
    helper_mode: str | None = None  # None: the host was never reached
    helper_mode_note: str | None = None
    runner_cached: bool | None = None
    duration_ms: int = 0
    error: str | None = None
    error_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_id": self.server_id, "name": self.name, "host": self.host,
            "execution_id": self.execution_id, "status": self.status, "exit_code": self.exit_code,
            "signal": self.signal, "stdout": self.stdout, "stderr": self.stderr, "output": self.output,
            "variables": self.variables, "condition": self.condition, "helper_mode": self.helper_mode,
            "helper_mode_note": self.helper_mode_note, "runner_cached": self.runner_cached,
            "duration_ms": self.duration_ms, "error": self.error, "error_kind": self.error_kind,
        }


@dataclass
class RunResult:
    status: str
    event_id: int
    event_name: str
    job_id: str
    log_id: int
    hosts: list[HostResult]
    skipped: list[dict[str, Any]]
    duration_ms: int
    payload_version: int

    @property
    def exit_code(self) -> int:
        return {"SUCCESS": EXIT_OK, "FAILURE": EXIT_FAILURE, "PARTIAL": EXIT_PARTIAL,
                "TIMEOUT": EXIT_TIMEOUT, "CANCELLED": EXIT_CANCELLED}[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "event_id": self.event_id, "event_name": self.event_name,
            "job_id": self.job_id, "log_id": self.log_id, "payload_version": self.payload_version,
            "duration_ms": self.duration_ms, "skipped": self.skipped,
            "hosts": [h.to_dict() for h in self.hosts],
        }


def aggregate_status(states: list[str], cancelled: bool = False) -> str:
    """SUCCESS all succeeded · PARTIAL some did · TIMEOUT none did and one timed out · FAILURE none did."""
    if cancelled:
        return "CANCELLED"
    if states and all(s == "success" for s in states):
        return "SUCCESS"
    if any(s == "success" for s in states):
        return "PARTIAL"
    if any(s == "timeout" for s in states):
        return "TIMEOUT"
    return "FAILURE"


# --------------------------------------------------------------------------------------------
# live output

class LivePrinter:
    """Whole lines per host, prefixed with the server name, never interleaved mid-line."""

    def __init__(self, out: IO[str] | None, names: list[str]) -> None:
        self.out = out
        self.width = max((len(n) for n in names), default=4)
        self._lock = threading.Lock()
        self._partial: dict[tuple[str, str], bytes] = {}

    def feed(self, host: str, stream: str, data: bytes) -> None:
        if self.out is None:
            return
        key = (host, stream)
        buf = self._partial.get(key, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[key] = rest
        if len(rest) > 65536:  # a huge line without newline: show it in pieces
            lines.append(rest)
            self._partial[key] = b""
        if lines:
            self._emit(host, stream, lines)

    def flush(self, host: str) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((host, stream), b"")
            if rest:
                self._emit(host, stream, [rest])

    def _emit(self, host: str, stream: str, lines: list[bytes]) -> None:
        mark = "|" if stream == "stdout" else "!"
        text = "".join(
            f"{host:<{self.width}} {mark} {line.decode('utf-8', 'replace')}\n" for line in lines
        )
        with self._lock:
            assert self.out is not None
            self.out.write(text)
            self.out.flush()

    def message(self, text: str) -> None:
        if self.out is None:
            return
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()


class CappedBuffer:
    """Keeps the last ``cap`` bytes of a stream and counts what was dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.cap:
            cut = len(self.data) - self.cap
            del self.data[:cut]
            self.dropped += cut

    def text(self) -> str:
        body = bytes(self.data).decode("utf-8", "replace")
        return f"[... {self.dropped} bytes truncated ...]\n{body}" if self.dropped else body


# --------------------------------------------------------------------------------------------
# targets

@dataclass
class Target:
    host: HostTarget
    server_id: int | None
    name: str
    address: str


def resolve_targets(session: Any, event: ResolvedEvent, hosts: list[str] | None) -> list[Target]:
    """The event's servers, or the -H values: a server's name/address uses its record, anything
    else is an SSH destination (``[user@]host[:port]``, resolved through ~/.ssh/config)."""
    if not hosts:
        return [
            Target(HostTarget(name=s.name, host=s.address, port=s.port, user=s.username, server_id=s.id,
                              private_key=s.private_key, password=s.password), s.id, s.name, s.address)
            for s in event.servers
        ]
    key = load_key()
    targets: list[Target] = []
    for value in hosts:
        value = value.strip()
        if not value:
            continue
        row = session.scalars(
            select(Server)
            .where(Server.user_id == event.user_id, Server.is_archived.is_(False),
                   or_(Server.name == value, Server.address == value))
            .order_by(Server.id)
        ).first()
        if row is not None:
            s = server_credentials(row, key)
            targets.append(Target(HostTarget(name=s.name, host=s.address, port=s.port, user=s.username,
                                             server_id=s.id, private_key=s.private_key, password=s.password),
                                  s.id, s.name, s.address))
            continue
        user, _, hostport = value.rpartition("@")
        host, port = hostport, None
        if hostport.count(":") == 1:
            host, _, p = hostport.partition(":")
            port = int(p) if p.isdigit() else None
        targets.append(Target(HostTarget(name=value, host=host, port=port, user=user or None),
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


@contextmanager
def _interrupts_cancel(cancel: threading.Event, on_signal: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP set ``cancel`` (and say which) instead of killing us mid-record."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        on_signal(signal.Signals(signum).name)
        cancel.set()

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


def run_event(settings: Settings, request: RunRequest, *, out: IO[str] | None = sys.stderr,
              cancel: threading.Event | None = None,
              on_host_done: Callable[[HostResult], None] | None = None) -> RunResult:
    """Run one event on all its hosts and record everything. Raises CroniumFabError for bad input
    (before any row is written); host failures are results, not exceptions."""
    return EventRun(settings, request, out=out, cancel=cancel, on_host_done=on_host_done).run()


EXEC_STATUS = {"success": "completed", "failure": "failed", "timeout": "timeout", "unreachable": "failed",
               "cancelled": "cancelled"}


class EventRun:
    """The state of one run, shared by the host workers (each host only touches its own HostResult)."""

    def __init__(self, settings: Settings, request: RunRequest, *, out: IO[str] | None,
                 cancel: threading.Event | None, on_host_done: Callable[[HostResult], None] | None) -> None:
        self.settings = settings
        self.request = request
        self.out = out
        self.cancel = cancel or threading.Event()
        self.on_host_done = on_host_done
        self.mode = request.helper_mode or settings.helper_mode
        if self.mode not in HELPER_MODES:
            raise CroniumFabError(f"helper mode {self.mode!r} is not one of {', '.join(HELPER_MODES)}")
        self.api: HelperAPI | None = None
        self._started_together: set[str] = set()
        self.cancel_reason: str | None = None   # "the controller received SIGINT" when a signal cancelled us

    def _cancel_message(self, what: str) -> str:
        return f"{what}: {self.cancel_reason}" if self.cancel_reason else what

    def _cancelled_by(self, signame: str) -> None:
        self.cancel_reason = self.cancel_reason or f"the controller received {signame}" + (
            " (Ctrl-C)" if signame == "SIGINT" else "")

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> RunResult:
        # SIGTERM/SIGINT become "cancel" for the whole run, so a signal never kills us mid-write
        with _interrupts_cancel(self.cancel, self._cancelled_by):
            return self._run()

    def _run(self) -> RunResult:
        t0 = time.monotonic()
        settings, request = self.settings, self.request
        db = Database(settings.database_url)
        db.check()
        with db.session() as s:
            self.event = event = resolve_event(s, request.event_id, require_servers=not request.hosts)
            self.targets = resolve_targets(s, event, request.hosts)
            self.variables = user_variables(s, event.user_id)
        store = PayloadStore(db, settings.payload_dir, signing_key=settings.signing_key,
                             public_key=settings.public_key)
        self.payload = store.load_verified(event.id)
        self.runner = load_runner(settings)
        self.timeout = request.timeout if request.timeout is not None else event.timeout_seconds
        self.ssh = _ssh_settings(settings)
        self.recorder = recorder = RunRecorder(db)
        # bad input stops before this line; from here on every row must end in a terminal state
        self.ctx = ctx = recorder.start(
            event_id=event.id, event_name=event.name, event_type=event.type, user_id=event.user_id,
            job_id=request.job_id, input_data=request.input,
            new_job_payload=hand_run_payload(event, [t.server_id for t in self.targets], request.input,
                                             request.timeout))
        self.trigger = "job" if request.job_id else "manual"
        self.results: list[HostResult] = []
        results = self.results
        try:
            for i, t in enumerate(self.targets):
                key: str | int = t.server_id if t.server_id is not None else f"h{i}"
                results.append(HostResult(server_id=t.server_id, name=t.name, host=t.address,
                                          execution_id=execution_id_for(ctx.job_id, key)))
            recorder.add_executions(ctx.job_id, [(r.execution_id, t.server_id, t.name,
                                                  {"host": t.address, "trigger": self.trigger})
                                                 for t, r in zip(self.targets, results, strict=True)])
            self.printer = LivePrinter(self.out, [t.name for t in self.targets])
            if self.mode == "bundled":
                self._run_hosts()
            else:
                lifetime = self.timeout + KILL_GRACE + settings.watchdog_margin + settings.setup_timeout + 300
                with HelperAPI(db, secret=settings.api_secret, lifetime_s=lifetime) as api:
                    self.api = api
                    try:
                        self._run_hosts()
                    finally:
                        self.api = None
            states = [r.status for r in results]
            status = aggregate_status(states, cancelled=self.cancel.is_set() and "cancelled" in states)
            duration_ms = int((time.monotonic() - t0) * 1000)
            result = RunResult(status=status, event_id=event.id, event_name=event.name, job_id=ctx.job_id,
                               log_id=ctx.log_id, hosts=results,
                               skipped=[{"server_id": s.id, "name": s.name, "reason": s.reason}
                                        for s in event.skipped],
                               duration_ms=duration_ms, payload_version=self.payload.version)
            failures = [r for r in results if r.status != "success"]
            recorder.finish(
                ctx, event_id=event.id, status=status, output=_log_output(results), duration_ms=duration_ms,
                setup_ms=None, execution_ms=max((r.duration_ms for r in results), default=0),
                exit_code=_run_exit_code(results),
                error="; ".join(f"{r.name}: {r.error or r.status}" for r in failures) or None,
                result=_job_result(result),
                open_executions=[r.execution_id for r in results],
            )
        except BaseException as exc:
            recorder.abort(ctx, [r.execution_id for r in results], f"run aborted: {type(exc).__name__}: {exc}")
            raise
        finally:
            db.dispose()
        self.printer.message(summary_table(result))
        return result

    def _run_hosts(self) -> None:
        parallel = max(1, min(self.request.parallel or self.settings.parallel, len(self.targets)))
        # The first `parallel` hosts start at once: mark them running in one transaction, instead
        # of one per host with every thread queueing on the database at the same moment.
        self._started_together = {r.execution_id for r in self.results[:parallel]}
        self.recorder.hosts_running(list(self._started_together))
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cronium-host") as pool:
            pending: set[Future[None]] = {pool.submit(self._host, i) for i in range(len(self.targets))}
            while pending:
                try:
                    _done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    self._cancelled_by("SIGINT")
                    self.cancel.set()
                if self.cancel.is_set():
                    for f in pending:
                        f.cancel()  # hosts not started yet never start
        for res in self.results:  # hosts whose turn never came
            if res.runner_cached is None and res.status == "cancelled" and res.error is None:
                res.error = self._cancel_message("cancelled before start")
                self._finish_host(res, None, None, None)

    # -- one host -----------------------------------------------------------------------------
    def _host(self, i: int) -> None:
        res = self.results[i]
        try:
            self._run_host(self.targets[i], res)
        except Exception as exc:  # never lose a host's row because of a bug: record it, minimally
            res.status, res.error_kind = "failure", "internal"
            res.error = f"internal error: {type(exc).__name__}: {exc}"[:2000]
            log.debug("host %s: internal error", res.name, exc_info=True)
            self.recorder.host_failed(res.execution_id, res.error)
        if self.on_host_done is not None:
            self.on_host_done(res)

    def _run_host(self, target: Target, res: HostResult) -> None:
        if self.cancel.is_set():
            res.status, res.error = "cancelled", self._cancel_message("cancelled before start")
            self._finish_host(res, None, None, None)
            return
        t0 = time.monotonic()
        started = utcnow()
        if res.execution_id not in self._started_together:
            self.recorder.hosts_running([res.execution_id])
        stdout, stderr = CappedBuffer(self.request.output_cap), CappedBuffer(self.request.output_cap)

        def on_record(kind: str, ts: float, data: bytes) -> None:
            (stdout if kind == "stdout" else stderr).add(data)
            self.printer.feed(target.name, kind, data)

        connected: datetime | None = None
        run: HostRun | None = None
        deployment: Deployment | None = None
        try:
            conn = open_connection(target.host, self.ssh)
        except RemoteError as exc:
            res.status = "unreachable"
            res.error, res.error_kind = str(exc), exc.kind
        else:
            connected = utcnow()
            try:
                with self._helpers_for(conn, target, res, started) as api_header:
                    if res.error is None:
                        run = run_on_host(conn, self.runner, self._header(target, res, api_header),
                                          self.payload.content.data, on_record=on_record, cancel=self.cancel,
                                          watchdog_s=self.timeout + KILL_GRACE + self.settings.watchdog_margin,
                                          setup_timeout_s=self.settings.setup_timeout)
                        _apply_run(res, run)
                        if res.status == "cancelled" and self.cancel_reason:
                            res.error = self._cancel_message("cancelled")
                        if run.error_kind in ("watchdog-timeout", "disconnected", "setup-timeout"):
                            conn.close()  # a dead or frozen peer: never wait on it again (tunnel cancel)
                        if self.api is not None and res.helper_mode == "api":
                            _merge_api_state(res, self.api.unregister(res.execution_id))
            finally:
                conn.close()
            if run is not None and target.server_id is not None and run.error_kind not in (
                    "python-missing", "python-too-old"):
                deployment = Deployment(
                    server_id=target.server_id, runner_version=__version__,
                    runner_path=f"${{XDG_CACHE_HOME:-~/.cache}}/cronium/{runner_file_name(self.runner.sha256)}",
                    checksum=self.runner.sha256, installed=run.runner_installed,
                    ok=run.error_kind != "runner-install-failed")
        self.printer.flush(target.name)
        res.stdout, res.stderr = stdout.text(), stderr.text()
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
        token = api.register_execution(ExecutionContext(
            execution_id=res.execution_id, job_id=self.ctx.job_id, event_id=self.event.id,
            event_name=self.event.name, user_id=self.event.user_id, server_id=target.server_id,
            server_name=target.name, input=self.ctx.input, trigger=self.trigger, started_at=started))
        fwd = RemoteForward(conn, "127.0.0.1", api.port, name=target.name)
        try:
            with _closes_on_hang(conn, self.settings.setup_timeout):
                fwd.open()
        except RemoteError as exc:
            api.unregister(res.execution_id)
            if self.mode == "api":
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
        header: dict[str, Any] = {
            "protocol": 1,
            "payload_sha256": self.payload.content.sha256,
            "payload_size": len(self.payload.content.data),
            "manifest": self.payload.content.manifest,
            "manifest_sha256": self.payload.content.manifest_sha256,
            "job_id": self.ctx.job_id, "execution_id": res.execution_id, "event_id": self.event.id,
            "event_name": self.event.name, "server_id": target.server_id, "server_name": target.name,
            "user_id": self.event.user_id, "trigger": self.trigger,
            "helper_mode": "api" if api_header else "bundled",
            "env": self.event.env, "variables": self.variables, "input": self.ctx.input,
            "timeout": self.timeout, "kill_grace": KILL_GRACE, "limits": {},
            "output_cap": self.request.output_cap, "keep_workdir": self.request.keep_workdir,
        }
        if api_header:
            header["api"] = api_header
        return header

    def _finish_host(self, res: HostResult, run: HostRun | None, phases: dict[str, datetime | None] | None,
                     deployment: Deployment | None) -> None:
        out_text = res.stdout + (("\n--- stderr ---\n" + res.stderr) if res.stderr else "")
        self.recorder.host_finished(
            res.execution_id, status=EXEC_STATUS[res.status], exit_code=res.exit_code, output=out_text,
            error=res.error, phases=phases or {},
            metadata={"runner_cached": res.runner_cached, "helper_mode": res.helper_mode,
                      "helper_mode_note": res.helper_mode_note, "output": res.output,
                      "condition": res.condition, "variables": res.variables, "signal": res.signal,
                      "error_kind": res.error_kind},
            user_id=self.event.user_id, variables=res.variables,
            # API mode: the API stored every variable the moment the script set it; never twice
            write_variables=res.helper_mode == "bundled",
            deployment=deployment,
        )


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


def _run_exit_code(results: list[HostResult]) -> int:
    codes = [r.exit_code for r in results if r.status != "success"]
    if not codes:
        return 0
    return next((c for c in codes if c), 1)


def _log_output(results: list[HostResult]) -> str:
    parts = []
    for r in results:
        parts.append(f"=== {r.name} ({r.host}): {r.status}" + (f" exit {r.exit_code}" if r.exit_code is not None else "")
                     + (f" [helpers: {r.helper_mode}]" if r.helper_mode else ""))
        if r.helper_mode_note:
            parts.append(f"--- {r.helper_mode_note}")
        if r.stdout:
            parts.append(r.stdout.rstrip("\n"))
        if r.stderr:
            parts.append("--- stderr ---\n" + r.stderr.rstrip("\n"))
        if r.error:
            parts.append(f"--- error: {r.error}")
    return "\n".join(parts)


def _job_result(result: RunResult) -> dict[str, Any]:
    d = result.to_dict()
    for h in d["hosts"]:  # keep jobs.result small; full output is in executions/logs
        h.pop("stdout", None)
        h.pop("stderr", None)
    return d


def _apply_run(res: HostResult, run: HostRun) -> None:
    res.runner_cached = run.runner_cached
    r = run.result
    if r is None:
        res.error, res.error_kind = run.error, run.error_kind
        res.status = {"cancelled": "cancelled", "watchdog-timeout": "timeout", "disconnected": "unreachable"}.get(
            run.error_kind or "", "failure")
        return
    res.exit_code = r.get("exit_code")
    res.signal = r.get("signal")
    res.output = r.get("output")
    res.variables = r.get("variables") or {}
    res.condition = r.get("condition")
    res.error, res.error_kind = r.get("error"), r.get("error_kind")
    status = r.get("status")
    res.status = {"success": "success", "failure": "failure", "timeout": "timeout", "cancelled": "cancelled"}.get(
        status or "", "failure")


def summary_table(result: RunResult) -> str:
    rows = [("HOST", "STATUS", "EXIT", "DURATION", "RUNNER", "HELPERS")]
    for h in result.hosts:
        cached = "-" if h.runner_cached is None else ("cached" if h.runner_cached else "installed")
        rows.append((h.name, h.status, "-" if h.exit_code is None else str(h.exit_code),
                     f"{h.duration_ms / 1000:.2f}s", cached,
                     (h.helper_mode or "-") + ("*" if h.helper_mode_note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    errors = [f"  {h.name}: {h.error}" for h in result.hosts if h.error]
    errors += [f"  {h.name}: * {h.helper_mode_note}" for h in result.hosts if h.helper_mode_note]
    skipped = [f"  skipped {s['name']}: {s['reason']}" for s in result.skipped]
    tail = [f"{result.status}: {sum(h.status == 'success' for h in result.hosts)}/{len(result.hosts)} hosts "
            f"succeeded in {result.duration_ms / 1000:.2f}s (job {result.job_id}, log {result.log_id})"]
    return "\n".join(["", *lines, *errors, *skipped, *tail])

