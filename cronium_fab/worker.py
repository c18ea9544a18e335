"""``cronium-fab worker``: keeps the controller loaded and runs each ``cronium-fab`` command in a fork.

A command line pays about half a second for importing SQLAlchemy, Fabric and Paramiko before it
does anything; for a one-host run that is most of the time. The worker imports everything once and
listens on a Unix socket (``launch.socket_path()``, in the private data directory). For each
connection from ``cronium-fab`` (see ``launch.py``) it checks that the client is our user and runs
the same code, then forks: the child takes the client's stdin/stdout/stderr, argv, environment,
working directory and umask, and runs the command exactly as the client would have, in its own
session. The client forwards its signals; if the client goes away, the child cancels the run as on
SIGTERM. The worker itself never opens a database or SSH connection (the children do, after the
fork), so nothing is shared between runs.

Stop it with SIGTERM or SIGINT: it stops accepting at once; runs in progress finish (they belong to
their clients). See docs/WORKER.md.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import fcntl
import importlib
import io
import json
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from typing import IO, Any

from . import launch
from .errors import ConfigError

# Everything a command may import, so that a fork finds it loaded.
PRELOAD = (
    "cronium_fab.cli",
    "cronium_fab.execute",
    "cronium_fab.payloads",
    "cronium_fab.registry",
    "cronium_fab.db.queries",
    "cronium_fab.remote.known_hosts",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql.psycopg",
    "psycopg",
)
EXIT_INTERNAL = 6
REQUEST_TIMEOUT = 5.0


class Worker:
    def __init__(self, path: str, log: IO[str] | None = None) -> None:
        self.path = path
        self.log_file = log or sys.stderr
        self.fingerprint = ""
        self.children: dict[int, str] = {}
        self.stopping = False
        self._lock_fd = -1
        self._listener: socket.socket | None = None

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} cronium-fab worker[{os.getpid()}]: {message}", file=self.log_file, flush=True)

    # -- set-up -------------------------------------------------------------------------------

    def bind(self) -> None:
        if not hasattr(socket, "SO_PEERCRED"):
            raise ConfigError("the worker needs Unix sockets with peer credentials (Linux)")
        if len(os.fsencode(self.path)) > 107:
            raise ConfigError(f"the worker socket path is too long for a Unix socket ({self.path}); "
                              "set CRONIUM_FAB_WORKER_SOCKET to a shorter path")
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.stat(parent)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ConfigError(f"{parent} must be owned by you and not writable by others "
                              f"(chmod 700 {parent}): the worker socket lives there")
        self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise ConfigError(f"another cronium-fab worker already serves {self.path}") from None
        try:   # we hold the lock: whatever is there is left over from a worker that died
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket; move it away")
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(64)
        self._listener = sock

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> int:
        for name in PRELOAD:
            importlib.import_module(name)
        self.fingerprint = launch.code_fingerprint()
        _ensure_std_fds()
        self.bind()
        assert self._listener is not None

        def stop(signum: int, _frame: Any) -> None:
            self.stopping = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        self.log(f"listening on {self.path}")
        try:
            while not self.stopping:
                try:
                    ready, _, _ = select.select([self._listener], [], [], 0.5)
                except InterruptedError:
                    ready = []
                self._reap()
                if ready and not self.stopping:
                    conn, _ = self._listener.accept()
                    self._handle(conn)
        finally:
            for sig, prev in previous.items():
                signal.signal(sig, prev)
            self.close()
            self._reap()
        self.log(f"stopped; {len(self.children)} run(s) still finishing on their own")
        return 0

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            what = self.children.pop(pid, "?")
            self.log(f"run {pid} ({what}) ended: exit {os.waitstatus_to_exitcode(status)}")

    def _handle(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            uid = launch.peer_uid(conn)
            if uid != os.getuid():
                self.log(f"refused a connection from uid {uid}")
                return
            doc, fds = _receive_request(conn)
            if doc.get("protocol") != launch.PROTOCOL or doc.get("fingerprint") != self.fingerprint:
                launch.send_frame_line(conn, {"fallback": f"the worker at {self.path} runs other code than this "
                                                          "command (restart it after an upgrade)"})
                return
            argv = [str(a) for a in doc["argv"]]
            pid = os.fork()
            if pid == 0:
                code = EXIT_INTERNAL
                try:
                    code = _child(conn, fds, doc)
                finally:
                    os._exit(code)
            what = " ".join(argv[1:3])
            self.children[pid] = what
            self.log(f"run {pid}: {what}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log(f"bad request: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


def _ensure_std_fds() -> None:
    """fds 0-2 open, so that fds received from clients never land on them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    size = launch.HEADER.size
    data, anc, _flags, _addr = conn.recvmsg(size, socket.CMSG_SPACE(3 * array.array("i").itemsize))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    try:
        while len(data) < size:
            more = conn.recv(size - len(data))
            if not more:
                raise ValueError("connection closed in the request header")
            data += more
        (length,) = launch.HEADER.unpack(data)
        if length > launch.MAX_REQUEST:
            raise ValueError(f"request of {length} bytes is too large")
        body = b""
        while len(body) < length:
            more = conn.recv(length - len(body))
            if not more:
                raise ValueError("connection closed in the request")
            body += more
        doc = json.loads(body)
        if len(fds) != 3 or not isinstance(doc, dict):
            raise ValueError("a request carries a JSON object and exactly 3 file descriptors")
        return doc, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _child(conn: socket.socket, fds: list[int], doc: dict[str, Any]) -> int:
    """In the fork: become the client's command, run it, report its exit status."""
    os.setsid()    # the worker's terminal signals are not ours; our client forwards its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    fds.clear()
    os.umask(int(doc["umask"]))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in doc["env"].items()})
    sys.argv = [str(a) for a in doc["argv"]]
    _reopen_stdio()
    finished = threading.Event()
    conn.settimeout(None)
    launch.send_frame_line(conn, {"pid": os.getpid()})
    threading.Thread(target=_watch_client, args=(conn, finished), name="client-watch", daemon=True).start()
    code = EXIT_INTERNAL
    try:
        os.chdir(str(doc["cwd"]))
        from .cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except OSError as exc:
        print(f"cronium-fab: error: {exc}", file=sys.stderr)
        code = EXIT_INTERNAL
    except BaseException:
        traceback.print_exc()
        code = EXIT_INTERNAL
    finally:
        finished.set()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with contextlib.suppress(OSError):
        launch.send_frame_line(conn, {"exit": code})
    return code


def _reopen_stdio() -> None:
    """New sys.std* on fds 0-2, buffered as Python would for the client's files."""
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8",  # noqa: SIM115
                                  line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), encoding="utf-8",  # noqa: SIM115
                                  errors="backslashreplace", line_buffering=True)
    for name in ("stdin", "stdout", "stderr"):   # code that writes to sys.__stderr__ reaches the client too
        setattr(sys, f"__{name}__", getattr(sys, name))


def _watch_client(conn: socket.socket, finished: threading.Event) -> None:
    """Signals the client forwards become ours; the client gone before the end is SIGTERM."""
    buf = bytearray()
    allowed = {int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGHUP)}
    while True:
        try:
            doc = launch.read_line(conn, buf)
        except (OSError, ValueError):
            doc = {}
        if not doc:
            if not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
            return
        sig = doc.get("signal")
        if isinstance(sig, int) and sig in allowed and not finished.is_set():
            os.kill(os.getpid(), sig)


def serve(path: str | None = None) -> int:
    worker = Worker(path or launch.socket_path())
    try:
        return worker.serve()
    finally:
        worker.close()
