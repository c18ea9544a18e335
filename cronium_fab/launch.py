"""The ``cronium-fab`` entry point, the worker's client: hand the command to a running worker,
else run it here (standard library only until it imports ``cli``).

Starting Python and importing SQLAlchemy, Fabric and Paramiko costs about half a second, which is
most of a one-host run. A ``cronium-fab worker`` keeps those imports loaded; this module (standard
library only, cheap to import) connects to the worker's Unix socket, checks that the worker runs as
our user and the same code, and passes it our stdin/stdout/stderr, argv, environment, working
directory and umask. The worker forks a process that runs the command exactly as we would, writing
straight to our file descriptors. We forward SIGINT/SIGTERM/SIGHUP to it and exit with its exit
status. When our end of the socket closes (we were killed), the run is cancelled as on SIGTERM.

Without a worker (no socket, nobody listening, other code, ``CRONIUM_FAB_WORKER=off``), the command
runs in this process, as before. See docs/WORKER.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from .errors import EXIT_INTERNAL
from .paths import socket_path
from .signals import STOP_SIGNALS, catch_stop_signals, die_of, restore_signals
from .wire import (
    PROTOCOL,
    READY_TIMEOUT,
    REQUEST_TIMEOUT,
    code_fingerprint,
    note_startup_fingerprint,
    peer_creds,
    read_line,
    send_frame,
    send_frame_line,
)


class _Signals:
    """Our SIGINT/SIGTERM/SIGHUP while a worker runs the command: queued until its run process is
    known, then forwarded to it."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.sock: socket.socket | None = None
        self.previous = catch_stop_signals(self._on_signal)
        # Signals our caller made us ignore stay ignored, here and in the worker's fork.
        self.ignored = [int(sig) for sig in STOP_SIGNALS if sig not in self.previous]

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                send_frame_line(self.sock, {"signal": signum})

    def forward_to(self, sock: socket.socket) -> None:
        mask = set(self.previous)
        signal.pthread_sigmask(signal.SIG_BLOCK, mask)    # none may slip between the queue and the socket
        try:
            for signum in self.received:
                with contextlib.suppress(OSError):
                    send_frame_line(sock, {"signal": signum})
            self.sock = sock
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)

    def restore(self) -> None:
        """Back to normal handling; a signal that came in meanwhile is delivered to us now."""
        restore_signals(self.previous)
        if self.received:
            die_of(self.received[-1])


def _worker_session(signals: _Signals) -> tuple[socket.socket, bytearray] | None:
    """A connection to a worker that has agreed to run our command, or None (then we run it)."""
    if os.environ.get("CRONIUM_FAB_WORKER", "").lower() in ("off", "0", "no", "false"):
        return None
    path = socket_path()
    if not hasattr(socket, "SO_PEERCRED") or not os.path.exists(path):
        return None
    for fd in (0, 1, 2):      # a closed one would be taken by our socket and handed over as stdio
        try:
            os.fstat(fd)
        except OSError:
            return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    buf = bytearray()
    cwd = -1
    try:
        sock.settimeout(READY_TIMEOUT)
        sock.connect(path)
        if peer_creds(sock)[1] != os.getuid():   # never hand our environment to another user's process
            raise OSError("the worker socket belongs to another user")
        # Wait until a fork of the worker answers before handing over any file descriptor: fds
        # in flight to a stuck worker would keep our caller's pipes open after we ran it here.
        try:
            hello = read_line(sock, buf)
        except TimeoutError:
            print(f"cronium-fab: the worker at {path} did not answer within {READY_TIMEOUT:g} s (stopped? "
                  "overloaded?); running the command in this process", file=sys.stderr)
            raise
        if hello.get("protocol") != PROTOCOL:
            raise ValueError("not a cronium-fab worker of this version")
        sock.settimeout(REQUEST_TIMEOUT)
        umask = os.umask(0o077)
        os.umask(umask)
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # our directory, even if renamed
        send_frame(sock, {"protocol": PROTOCOL, "fingerprint": code_fingerprint(), "argv": sys.argv,
                          "env": dict(os.environ), "umask": umask, "ignored_signals": signals.ignored},
                   fds=[0, 1, 2, cwd])
        reply = read_line(sock, buf)
        if "pid" in reply:
            if signals.received:   # interrupted before the start: nothing runs, we end by the signal
                raise OSError("interrupted")
            # Only now may it start: had we given up waiting (timeout), it sees EOF and never runs,
            # so a command can never run twice (there and here).
            send_frame_line(sock, {"go": True})
    except (OSError, ValueError):
        sock.close()
        return None
    finally:
        if cwd >= 0:
            os.close(cwd)
    if "pid" not in reply:
        if reply.get("fallback"):
            print(f"cronium-fab: {reply['fallback']}; running the command in this process", file=sys.stderr)
        sock.close()
        return None
    sock.settimeout(None)
    signals.forward_to(sock)
    return sock, buf


NOT_RUN = -1


def _follow(sock: socket.socket, buf: bytearray, signals: _Signals) -> int:
    """Wait for the exit status of the worker's run process (our signals are forwarded to it);
    ``NOT_RUN`` when it gave up on us before starting (then we run the command)."""
    while True:
        try:
            doc = read_line(sock, buf)
        except (OSError, ValueError):
            break
        if not doc:
            break
        if doc.get("notrun"):
            return NOT_RUN
        if isinstance(doc.get("signal"), int):     # it died of a signal: so do we
            die_of(int(doc["signal"]))  # type: ignore[call-overload]
        if "exit" in doc:
            return int(doc["exit"])  # type: ignore[call-overload]
    if signals.received:   # it died of the signal we passed on, as this process would have
        die_of(signals.received[-1])
        return 128 + signals.received[-1]
    print("cronium-fab: error: the worker's run process ended without an exit status "
          "(killed?); check the worker's log", file=sys.stderr)
    return EXIT_INTERNAL


def main() -> None:
    if "worker" in sys.argv[1:]:   # `cronium-fab [flags] worker` itself always runs here
        # The code this process is about to import: what changes on disk from now on is "other code".
        note_startup_fingerprint()
    else:
        signals = _Signals()
        session = _worker_session(signals)
        if session is not None:
            code = _follow(*session, signals)
            session[0].close()
            if code != NOT_RUN:
                sys.exit(code)
        signals.restore()
    from .cli import main as run_here

    run_here()
