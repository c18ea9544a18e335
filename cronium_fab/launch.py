"""The ``cronium-fab`` entry point: hand the command to a running worker, else run it here.

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

import array
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from typing import Any

PROTOCOL = 1
HEADER = struct.Struct("!I")
MAX_REQUEST = 4 * 1024 * 1024
READY_TIMEOUT = 2.0      # connect + a fork saying it is ready: milliseconds when the worker is alive
REQUEST_TIMEOUT = 5.0    # the fork reading our request and answering


def data_dir() -> str:
    """cronium-fab's data directory (``CRONIUM_FAB_DATA_DIR``, else ``$XDG_DATA_HOME/cronium-fab``)."""
    explicit = os.environ.get("CRONIUM_FAB_DATA_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "cronium-fab")


def socket_path() -> str:
    """Where the worker listens: ``CRONIUM_FAB_WORKER_SOCKET``, else ``<data dir>/worker.sock``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("CRONIUM_FAB_WORKER_SOCKET")
                                              or os.path.join(data_dir(), "worker.sock")))


def code_fingerprint() -> str:
    """Identifies the code a process runs: the interpreter, the package's module files (by content)
    and the installed libraries (the site-packages directories change whenever pip installs,
    upgrades or removes anything there).

    A worker started before an upgrade (or an edit of a checkout) must not serve the new command
    line with the old code; the client then runs the command itself.
    """
    import hashlib

    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    digest.update(f"{os.path.realpath(sys.executable)}\n{sys.version}\n".encode())
    for entry in sys.path:
        if os.path.basename(entry) in ("site-packages", "dist-packages"):
            with contextlib.suppress(OSError):
                digest.update(f"{entry}:{os.stat(entry).st_mtime_ns}\n".encode())
    files = []
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False) and e.name != "__pycache__":
                    stack.append(e.path)
                elif e.name.endswith(".py") and not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                    files.append(e.path)   # (editors' lock files such as .#cli.py are dangling symlinks)
    for path in sorted(files):
        with open(path, "rb") as f:
            digest.update(f"{os.path.relpath(path, root)}\n".encode() + f.read())
    return digest.hexdigest()


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def send_frame(sock: socket.socket, doc: dict[str, object], fds: list[int] | None = None) -> None:
    body = json.dumps(doc).encode()
    data = HEADER.pack(len(body)) + body
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


def send_frame_line(sock: socket.socket, doc: dict[str, object]) -> None:
    sock.sendall(json.dumps(doc).encode() + b"\n")


def read_line(sock: socket.socket, buf: bytearray) -> dict[str, object]:
    """The next JSON line from ``sock`` ({} at EOF); bytes after it stay in ``buf``."""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return {}
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    doc = json.loads(line)
    return doc if isinstance(doc, dict) else {}


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def catch_stop_signals(handler: Any) -> dict[signal.Signals, Any]:
    """Install ``handler`` for SIGINT, SIGTERM and SIGHUP, except those our caller made us ignore
    (`nohup`, `&` in a script): they stay ignored. Returns what to give back to ``restore_signals``."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}


def restore_signals(previous: dict[signal.Signals, Any]) -> None:
    for sig, prev in previous.items():
        signal.signal(sig, prev)


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


def die_of(signum: int) -> None:
    """End this process by ``signum``, as if it had arrived with its default action."""
    if signum == signal.SIGINT and signal.getsignal(signum) is signal.default_int_handler:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


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
    return 6   # EXIT_INTERNAL


STARTUP_FINGERPRINT: str | None = None


def main() -> None:
    global STARTUP_FINGERPRINT
    if "worker" in sys.argv[1:]:   # `cronium-fab [flags] worker` itself always runs here
        # The code this process is about to import: what changes on disk from now on is "other code".
        STARTUP_FINGERPRINT = code_fingerprint()
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
