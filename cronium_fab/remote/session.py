"""One run of the runner on one host, over an already open connection.

Warm path: exactly one exec (the bootstrap), and the header + payload are written right after it
without waiting for any answer; no runner bytes travel. Cold path: the bootstrap answers
``CRONIUM-RUNNER-MISS``; we install the runner (second exec, bytes on stdin) and bootstrap again
(third exec); a second miss is ``runner-install-failed``.

The runner's stdin stays open while the script runs: EOF means "stop" (PROTOCOL.md §2), so
``shutdown_write`` is only ever used to cancel. With a ``Heartbeat``, each side proves it is alive
to the other: we write a byte every ``interval`` after the payload (the runner stops the script
when they stop: a frozen or cut-off controller), and a runner silent for ``timeout`` (it writes a
``K`` record while the script is quiet) ends the host as ``unresponsive`` (a frozen host, a cut
network: TCP may stay up for minutes, and SSH keepalives want no reply). Raw Paramiko channels are used (not Fabric's
``run``, which polls with a 10 ms sleep and starts a stdin-reader thread per command).
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fabric
import paramiko

from ..build import RunnerArtifact
from ..settings import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT
from .protocol import (
    HEARTBEAT,
    NO_PYTHON,
    PROTOCOL,
    PYTHON_TOO_OLD,
    RUNNER_MISS,
    Bootstrap,
    OutputDecoder,
    ProtocolError,
    Record,
    encode_input,
)
from .runner_cache import INSTALLED, PROBE_RE, bootstrap_command, install_command, probe_command

OnRecord = Callable[[str, float, bytes], None]
"""Called with ("stdout" | "stderr", the runner's unix timestamp, raw bytes) for each O/E record."""

_STREAMS = {"O": "stdout", "E": "stderr"}
_SEND_CHUNK = 32 * 1024
_STDERR_CAP = 64 * 1024


@dataclass
class HostRun:
    """What happened on one host. ``result`` is the runner's R record when one arrived.

    ``error_kind`` (None when the runner delivered its result normally): ``python-missing``,
    ``python-too-old``, ``runner-install-failed``, ``setup-timeout``, ``disconnected``,
    ``watchdog-timeout``, ``cancelled`` (a result may still be present: the runner's own
    ``cancelled`` record), ``protocol``.
    """

    result: dict[str, Any] | None = None
    hello: dict[str, Any] | None = None
    runner_cached: bool = False  # the first bootstrap found the runner
    runner_installed: bool = False  # we uploaded it during this run
    error_kind: str | None = None
    error: str | None = None
    setup_s: float | None = None  # from the first exec until the runner's hello (incl. install)
    execution_s: float | None = None  # from the hello until the result record
    install_s: float | None = None
    execs: int = 0  # exec channels opened (1 on the warm path)
    runner_bytes_sent: int = 0
    exit_status: int | None = None  # of the runner's process (or the bootstrap shell)
    runner_stderr: bytes = field(default=b"", repr=False)  # the runner's own diagnostics

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.result is not None


@dataclass(frozen=True)
class Heartbeat:
    """Liveness in both directions (PROTOCOL.md §2 ``heartbeat``): a sign of life every
    ``interval`` seconds; a side silent for ``timeout`` seconds is taken for gone."""

    interval: float = HEARTBEAT_INTERVAL
    timeout: float = HEARTBEAT_TIMEOUT

    def header(self) -> dict[str, float]:
        return {"interval": self.interval, "timeout": self.timeout}


class _Abort(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def run_on_host(
    conn: fabric.Connection,
    runner: RunnerArtifact,
    header: dict[str, Any],
    payload: bytes,
    on_record: OnRecord,
    cancel: threading.Event,
    watchdog_s: float | None,
    *,
    setup_timeout_s: float = 60.0,
    cancel_grace_s: float = 10.0,
    heartbeat: Heartbeat | None = None,
) -> HostRun:
    """Run ``payload`` with ``runner`` on the host of ``conn`` (already open, see ``open_connection``).

    ``header`` is the PROTOCOL.md §2 header; ``protocol``, ``payload_size`` and ``payload_sha256``
    are filled in here. ``watchdog_s`` bounds the execution phase (from the hello to the result)
    on the controller side, behind the runner's own timeout; ``setup_timeout_s`` bounds the set-up
    (bootstrap and install). Cancelling (``cancel.set()``) or the watchdog closes the runner's stdin
    and waits up to ``cancel_grace_s`` for its ``cancelled`` result (it stops the script's process
    tree first). ``heartbeat`` (see ``Heartbeat``): a runner silent for its timeout, once the
    payload is sent, ends the run as ``unresponsive``. Never raises for remote failures: they
    are in ``HostRun.error_kind``.
    """
    run = HostRun()
    transport = conn.transport
    if transport is None or not transport.is_active():
        run.error_kind, run.error = "disconnected", "connection is not open"
        return run
    if heartbeat is not None:
        header = {**header, "heartbeat": heartbeat.header()}
    stdin_data = encode_input(header, payload)
    boot = bootstrap_command(runner.sha256)
    t0 = time.monotonic()
    setup_deadline = t0 + setup_timeout_s
    try:
        for attempt in (1, 2):
            if cancel.is_set():
                raise _Abort("cancelled", "cancelled before the runner started")
            missed = _bootstrap(transport, boot, stdin_data, run, on_record, cancel, watchdog_s,
                                t0, setup_deadline, cancel_grace_s, heartbeat)
            if not missed:
                run.runner_cached = attempt == 1
                return run
            if attempt == 2:
                raise _Abort("runner-install-failed", "the runner was installed but the bootstrap still misses it "
                             "(cache directory not writable, or not owned by the login user?)")
            t_install = time.monotonic()
            _install(transport, runner, run, setup_deadline)
            run.install_s = time.monotonic() - t_install
    except _Abort as e:
        run.error_kind, run.error = e.kind, str(e)
    return run


def _open_exec(transport: paramiko.Transport, command: str, run: HostRun, deadline: float) -> paramiko.Channel:
    try:
        chan = transport.open_session(timeout=max(1.0, deadline - time.monotonic()))
        chan.exec_command(command)
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise _Abort("disconnected", f"cannot start a command: {e}") from e
    run.execs += 1
    return chan


def _bootstrap(
    transport: paramiko.Transport,
    boot: str,
    stdin_data: bytes,
    run: HostRun,
    on_record: OnRecord,
    cancel: threading.Event,
    watchdog_s: float | None,
    t0: float,
    setup_deadline: float,
    cancel_grace_s: float,
    heartbeat: Heartbeat | None,
) -> bool:
    """One bootstrap exec; return True on a runner miss, False when the run is over (result or not)."""
    chan = _open_exec(transport, boot, run, setup_deadline)
    try:
        return _drive(chan, stdin_data, run, on_record, cancel, watchdog_s, t0, setup_deadline, cancel_grace_s,
                      heartbeat)
    finally:
        chan.close()


def _drive(
    chan: paramiko.Channel,
    stdin_data: bytes,
    run: HostRun,
    on_record: OnRecord,
    cancel: threading.Event,
    watchdog_s: float | None,
    t0: float,
    setup_deadline: float,
    cancel_grace_s: float,
    heartbeat: Heartbeat | None,
) -> bool:
    pending = memoryview(stdin_data)
    # the runner's last sign of life, counted once the payload is sent (the runner sends K records
    # from then on, through the payload's extraction, the script and its clean-up)
    heard: float | None = None
    beat_at = 0.0  # when our next heartbeat byte is due
    looped = time.monotonic()
    decoder = OutputDecoder()
    stderr = bytearray()
    t_hello: float | None = None
    exec_deadline: float | None = None
    stop_deadline: float | None = None  # set once we closed stdin to stop the runner
    stop_kind = ""
    drain_deadline: float | None = None  # after R: a short wait for the exit status
    while True:
        progressed = False
        if pending and chan.send_ready():
            try:
                n = chan.send(bytes(pending[:_SEND_CHUNK]))
                pending = pending[n:]
            except OSError:
                pending = memoryview(b"")  # the remote side stopped reading (miss, or runner refused)
            progressed = True
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(65536)
            if heard is not None:   # counting (the payload is sent): any byte is a sign of life
                heard = time.monotonic()
            if len(stderr) < _STDERR_CAP:
                stderr += data[: _STDERR_CAP - len(stderr)]
        if chan.recv_ready():
            data = chan.recv(65536)
            if heard is not None:
                heard = time.monotonic()
            progressed = True
            try:
                events = decoder.feed(data)
            except ProtocolError as e:
                run.runner_stderr = bytes(stderr)
                raise _Abort("protocol", f"runner output does not follow the protocol: {e}{_stderr_note(stderr)}") from e
            for ev in events:
                if isinstance(ev, Bootstrap):
                    run.runner_stderr = bytes(stderr)
                    if ev.marker == RUNNER_MISS:
                        return True
                    if ev.marker == NO_PYTHON:
                        raise _Abort("python-missing", "python3 not found on PATH; install python3 (>= 3.8)")
                    if ev.marker == PYTHON_TOO_OLD:
                        raise _Abort("python-too-old", f"python3 >= 3.8 required, found {ev.detail}; install a newer python3")
                    raise _Abort("protocol", f"unexpected bootstrap marker {ev.marker}")
                assert isinstance(ev, Record)
                if ev.kind == "H":
                    run.hello = ev.json
                    t_hello = time.monotonic()
                    run.setup_s = t_hello - t0
                    if watchdog_s is not None:
                        exec_deadline = t_hello + watchdog_s
                    proto = (ev.json or {}).get("protocol")
                    if proto != PROTOCOL:
                        raise _Abort("protocol", f"runner speaks protocol {proto!r}, controller speaks {PROTOCOL}")
                elif ev.kind in _STREAMS:
                    on_record(_STREAMS[ev.kind], ev.ts or 0.0, ev.data)
                elif ev.kind == "R":
                    run.result = ev.json
                    run.execution_s = time.monotonic() - (t_hello if t_hello is not None else t0)
                    drain_deadline = time.monotonic() + 2.0
        elif chan.eof_received or chan.closed:
            run.runner_stderr = bytes(stderr)
            run.exit_status = _exit_status(chan, 1.0)
            if run.result is not None:
                if stop_kind:
                    run.error_kind, run.error = stop_kind, _stop_message(stop_kind)
                return False
            if stop_kind:
                raise _Abort(stop_kind, _stop_message(stop_kind) + " (no result record from the runner)")
            what = "the runner" if decoder.started else "the bootstrap"
            raise _Abort(
                "disconnected" if decoder.started else "protocol",
                f"{what} ended without a result (exit status {run.exit_status}){_stderr_note(stderr)}"
                + (f"; shell said: {decoder.noise[:300].decode(errors='replace')}" if decoder.noise else ""),
            )
        now = time.monotonic()
        if heartbeat is not None and t_hello is not None and run.result is None:
            if heard is None:
                if not pending:
                    heard = now  # the payload is sent: from now on the runner must show it is alive
            elif now - looped > 1.0:
                heard += now - looped  # this thread was starved (a loaded controller): not the runner's silence
            elif now - heard > heartbeat.timeout:
                run.runner_stderr = bytes(stderr)
                raise _Abort("unresponsive", f"no sign of life from the runner for {now - heard:.0f} s "
                             f"(heartbeat timeout {heartbeat.timeout:g} s): host frozen or network cut")
            if not stop_kind and not pending and now >= beat_at and chan.send_ready():
                beat_at = now + heartbeat.interval
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    chan.send(HEARTBEAT)
        looped = now
        if drain_deadline is not None and now > drain_deadline:
            run.runner_stderr = bytes(stderr)
            if stop_kind:
                run.error_kind, run.error = stop_kind, _stop_message(stop_kind)
            return False
        if run.result is None:
            if t_hello is None:
                if cancel.is_set():
                    raise _Abort("cancelled", "cancelled while the runner was starting")
                if now > setup_deadline:
                    raise _Abort("setup-timeout", f"the runner did not start within the set-up limit{_stderr_note(stderr)}")
            elif stop_deadline is None:
                if cancel.is_set():
                    stop_kind = "cancelled"
                elif exec_deadline is not None and now > exec_deadline:
                    stop_kind = "watchdog-timeout"
                if stop_kind:
                    _close_stdin(chan)
                    pending = memoryview(b"")
                    stop_deadline = now + cancel_grace_s
            elif now > stop_deadline:
                run.runner_stderr = bytes(stderr)
                raise _Abort(stop_kind, _stop_message(stop_kind) + f"; the runner did not answer within {cancel_grace_s:g} s")
        transport = chan.get_transport()
        if (transport is None or not transport.is_active()) and not chan.recv_ready():
            run.runner_stderr = bytes(stderr)
            raise _Abort("disconnected", "connection lost" + _stderr_note(stderr))
        if not progressed:
            select.select([chan], [], [], 0.005 if pending else 0.05)


def _close_stdin(chan: paramiko.Channel) -> None:
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.shutdown_write()


def _stop_message(kind: str) -> str:
    return "cancelled by the controller" if kind == "cancelled" else "the controller-side watchdog expired"


def _stderr_note(stderr: bytes | bytearray) -> str:
    text = bytes(stderr).decode("utf-8", "replace").strip()
    return f"; stderr: {text[-500:]}" if text else ""


def _exit_status(chan: paramiko.Channel, wait_s: float) -> int | None:
    deadline = time.monotonic() + wait_s
    while not chan.exit_status_ready():
        if time.monotonic() > deadline or chan.closed and not chan.exit_status_ready():
            return None
        time.sleep(0.002)
    return chan.recv_exit_status()


def _install(transport: paramiko.Transport, runner: RunnerArtifact, run: HostRun, deadline: float) -> None:
    """Upload the runner into the host's cache (second exec). Raises _Abort on any failure."""
    import hashlib

    data = runner.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != runner.sha256:
        raise _Abort("runner-install-failed", f"local runner {runner.path} does not match its digest {runner.sha256}")
    chan = _open_exec(transport, install_command(runner.sha256), run, deadline)
    out, err = bytearray(), bytearray()
    try:
        chan.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            chan.sendall(data)
            run.runner_bytes_sent += len(data)
            chan.shutdown_write()
        except OSError:
            pass  # the command failed early; its stderr says why
        while True:
            if time.monotonic() > deadline:
                raise _Abort("runner-install-failed", "runner upload did not finish within the set-up limit")
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                continue
            if chan.recv_ready():
                out += chan.recv(65536)
                continue
            if chan.eof_received or chan.closed:
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                break
            select.select([chan], [], [], 0.05)
        status = _exit_status(chan, max(1.0, deadline - time.monotonic()))
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise _Abort("runner-install-failed", f"runner upload failed: {e}") from e
    finally:
        chan.close()
    if status != 0 or INSTALLED.encode() not in out:
        raise _Abort(
            "runner-install-failed",
            f"runner install exited with {status}{_stderr_note(err)}",
        )
    run.runner_installed = True


@dataclass(frozen=True)
class Probe:
    """What ``probe_host`` saw: the host's python3 (None: none on PATH) and whether our runner is cached."""

    python: tuple[int, int, int] | None
    runner_cached: bool | None


def probe_host(conn: fabric.Connection, runner_sha256: str, timeout_s: float = 30.0) -> Probe:
    """One exec that runs no script and writes nothing: ``python3 --version`` and a look at the
    runner cache, as the bootstrap would look (``runner_cache.PROBE``). Raises ``RuntimeError``
    with the reason when the command fails or answers nothing we understand."""
    transport = conn.transport
    if transport is None or not transport.is_active():
        raise RuntimeError("connection is not open")
    deadline = time.monotonic() + timeout_s
    try:
        chan = transport.open_session(timeout=timeout_s)
        chan.settimeout(max(0.1, deadline - time.monotonic()))
        chan.exec_command(probe_command(runner_sha256))
        chan.shutdown_write()
        out = b""
        while len(out) < 65536:
            data = chan.recv(4096)
            if not data:
                break
            out += data
        chan.close()
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise RuntimeError(f"the probe command failed: {e or type(e).__name__}") from e
    text = out.decode("utf-8", "replace")
    if NO_PYTHON in text:
        return Probe(None, None)
    m = PROBE_RE.search(text)
    if m is None:
        raise RuntimeError(f"the probe command printed nothing we know: {text.strip()[:200]!r}")
    return Probe((int(m[1]), int(m[2]), int(m[3])), m[4] == "cached")
