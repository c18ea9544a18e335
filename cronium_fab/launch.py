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

PROTOCOL = 1
HEADER = struct.Struct("!I")
MAX_REQUEST = 4 * 1024 * 1024


def data_dir() -> str:
    """cronium-fab's data directory (``CRONIUM_FAB_DATA_DIR``, else ``$XDG_DATA_HOME/cronium-fab``)."""
    explicit = os.environ.get("CRONIUM_FAB_DATA_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "cronium-fab")


def socket_path() -> str:
    """Where the worker listens: ``CRONIUM_FAB_WORKER_SOCKET``, else ``<data dir>/worker.sock``."""
    return os.path.expanduser(os.environ.get("CRONIUM_FAB_WORKER_SOCKET") or os.path.join(data_dir(), "worker.sock"))


def code_fingerprint() -> str:
    """Identifies the code a process runs: the interpreter and every module file of the package.

    A worker started before an upgrade (or an edit of a checkout) must not serve the new command
    line with the old code; the client then runs the command itself.
    """
    root = os.path.dirname(os.path.abspath(__file__))
    parts = [sys.executable, sys.version]
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False) and e.name != "__pycache__":
                    stack.append(e.path)
                elif e.name.endswith(".py"):
                    st = e.stat()
                    parts.append(f"{os.path.relpath(e.path, root)}:{st.st_mtime_ns}:{st.st_size}")
    parts[2:] = sorted(parts[2:])
    return "\n".join(parts)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


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


def _worker_session() -> tuple[socket.socket, bytearray] | None:
    """A connection to a worker we may use, or None (then we run the command ourselves)."""
    if os.environ.get("CRONIUM_FAB_WORKER", "").lower() in ("off", "0", "no", "false"):
        return None
    path = socket_path()
    if not hasattr(socket, "SO_PEERCRED") or not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    buf = bytearray()
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        if peer_uid(sock) != os.getuid():   # never hand our environment to another user's process
            raise OSError("the worker socket belongs to another user")
        umask = os.umask(0o077)
        os.umask(umask)
        send_frame(sock, {"protocol": PROTOCOL, "fingerprint": code_fingerprint(), "argv": sys.argv,
                          "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}, fds=[0, 1, 2])
        reply = read_line(sock, buf)
    except (OSError, ValueError):
        sock.close()
        return None
    if "pid" not in reply:
        if reply.get("fallback"):
            print(f"cronium-fab: {reply['fallback']}; running the command in this process", file=sys.stderr)
        sock.close()
        return None
    sock.settimeout(None)
    return sock, buf


def _follow(sock: socket.socket, buf: bytearray) -> int:
    """Forward our signals to the worker's run process and wait for its exit status."""

    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        with contextlib.suppress(OSError):
            send_frame_line(sock, {"signal": signum})

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            doc = read_line(sock, buf)
        except (OSError, ValueError):
            break
        if not doc:
            break
        if "exit" in doc:
            return int(doc["exit"])  # type: ignore[call-overload]
    if forwarded:   # it died of the signal we passed on, as this process would have
        return 128 + forwarded[-1]
    print("cronium-fab: error: the worker's run process ended without an exit status "
          "(killed?); check the worker's log", file=sys.stderr)
    return 6   # EXIT_INTERNAL


def main() -> None:
    if sys.argv[1:2] != ["worker"]:
        session = _worker_session()
        if session is not None:
            sys.exit(_follow(*session))
    from .cli import main as run_here

    run_here()
