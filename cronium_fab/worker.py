"""``cronium-fab worker``: keeps the controller loaded and runs each ``cronium-fab`` command in a fork.

A command line pays about half a second for importing SQLAlchemy, Fabric and Paramiko before it
does anything; for a one-host run that is most of the time. The worker imports everything once and
listens on a Unix socket (``paths.socket_path()``, in the private data directory). For each
connection from ``cronium-fab`` (see ``launch.py``) it checks that the client is our user and runs
the same code, then forks: the child takes the client's stdin/stdout/stderr, argv, environment,
working directory and umask, and runs the command exactly as the client would have, in its own
session. The client forwards its signals; if the client goes away, the child cancels the run as on
SIGTERM. The worker itself never opens a database or SSH connection (the children do, after the
fork).

Kept connections: a Paramiko transport does not survive a fork, so a fork that ran a command
cleanly and holds SSH connections kept for the next run (``remote/pool.py``) stays, its stdio, directory and
environment dropped, and tells the worker it is free; the worker hands it the next client's
socket (``SCM_RIGHTS``) instead of forking, for up to ``keep_s`` idle seconds. One command at a
time per process; each command still gets its caller's stdio, directory, umask, environment and
argv, and its own database connection.

Stop it with SIGTERM or SIGINT: it stops accepting at once; runs in progress finish (they belong to
their clients). See docs/WORKER.md.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import importlib
import io
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import setproctitle

from .errors import EXIT_CANCELLED, EXIT_INTERNAL, ConfigError
from .paths import socket_path
from .remote.pool import keep_in_this_process, process_pool
from .signals import STOP_SIGNALS, catch_stop_signals, restore_signals
from .wire import (
    PROTOCOL,
    REQUEST_TIMEOUT,
    code_fingerprint,
    peer_creds,
    read_line,
    receive_request,
    send_frame_line,
)

CODE_CHECK_INTERVAL = 2.0   # seconds between looks at the code on disk (upgrade -> restart)
KEPT_IDLE_MAX = 8           # run processes waiting with kept connections at most (the oldest go first)
KEPT_MAX_AGE = 900.0        # no run process takes a new command after this long from its fork


@dataclass(frozen=True)
class ServedProgram:
    """What the worker serves, handed in by the program (the worker knows no command line):
    ``main`` runs one command from ``sys.argv`` in a fork; ``commands`` are its command names (the
    only word of argv the log shows); ``preload`` is imported once, before serving; new code on
    disk is restarted into only when ``import_check`` imports cleanly."""

    main: Callable[[], None]
    commands: frozenset[str]
    preload: tuple[str, ...] = ()
    import_check: tuple[str, ...] = ()
    # idle seconds a run process that holds kept SSH connections waits for another command (0: one
    # fork per command, no connection outlives its command)
    keep_s: float = 0.0


@dataclass
class _Kept:
    """A run process that may take another command: its end of our control socket pair."""
    ctl: socket.socket
    born: float
    idle_since: float | None = None    # None: running a command
    buf: bytes = b""


class Worker:
    def __init__(self, path: str, program: ServedProgram, fingerprint: str, log: IO[str] | None = None) -> None:
        self.path = path
        self.program = program
        self.log_file = log or sys.stderr
        # the code this process runs, taken before the imports by the entry point
        self.fingerprint = fingerprint
        self.children: set[int] = set()
        self.kept: dict[int, _Kept] = {}   # run processes that may serve again, by pid
        self.commands = program.commands
        self.stopping = False
        self._lock_fd = -1
        self._listener: socket.socket | None = None
        self._ctl: socket.socket | None = None   # in a run process: our end of the worker's control socket

    def log(self, message: str) -> None:
        if self._ctl is not None:   # a run process that may be kept: the worker writes its log lines
            with contextlib.suppress(OSError):
                self._ctl.sendall(b"l " + message.replace("\n", " ").encode("utf-8", "backslashreplace") + b"\n")
            return
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
        if st.st_uid != os.getuid():
            raise ConfigError(f"the worker socket must be in a directory you own, not {parent}: set "
                              "CRONIUM_FAB_WORKER_SOCKET to a path in a private directory of yours "
                              "(e.g. ~/.cache/cronium-fab/worker.sock)")
        if st.st_mode & 0o022:
            raise ConfigError(f"{parent} is writable by others, so they could replace the worker socket: put it "
                              "in a private directory, e.g. `mkdir -m 700 ~/.cache/cronium-fab` and "
                              "CRONIUM_FAB_WORKER_SOCKET=~/.cache/cronium-fab/worker.sock (for the worker and "
                              "its clients)")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket; move it away")
        self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = ""
            with contextlib.suppress(OSError, ValueError):
                other = os.pread(self._lock_fd, 32, 0).decode().strip()
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise ConfigError(f"another cronium-fab worker already serves {self.path}"
                              + (f" (pid {other})" if other else "")) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        with contextlib.suppress(FileNotFoundError):   # we hold the lock: a socket there is a dead worker's
            os.unlink(self.path)
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
        for pid in list(self.kept):   # kept run processes end (busy ones after their command)
            self._retire(pid)

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> int:
        for name in self.program.preload:
            importlib.import_module(name)
        _ensure_std_fds()
        self.bind()
        assert self._listener is not None

        def stop(signum: int, _frame: Any) -> None:
            self.stopping = True

        previous = catch_stop_signals(stop)   # `nohup cronium-fab worker &` survives logout
        if os.environ.get("CRONIUM_FAB_WORKER_SOCKET") or self.path != socket_path():
            how = f"CRONIUM_FAB_WORKER_SOCKET={self.path}"
        else:
            how = f"the same CRONIUM_FAB_DATA_DIR, or CRONIUM_FAB_WORKER_SOCKET={self.path}"
        self.log(f"listening on {self.path} (clients find it with {how})")
        restart = False
        watch, next_check = CodeWatch(self.fingerprint), time.monotonic() + CODE_CHECK_INTERVAL
        try:
            while not self.stopping:
                # poll, not select: one socket per run process, and select stops at fd 1024
                poller = select.poll()
                poller.register(self._listener, select.POLLIN)
                ctls = {k.ctl.fileno(): pid for pid, k in self.kept.items()}
                for fd in ctls:
                    poller.register(fd, select.POLLIN)
                try:
                    events = poller.poll(500)
                except InterruptedError:
                    events = []
                for fd, _ in events:
                    if fd in ctls and ctls[fd] in self.kept:
                        self._from_kept(ctls[fd])
                ready = [e for e in events if e[0] == self._listener.fileno()]
                self._retire_idle()
                self._reap()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CODE_CHECK_INTERVAL
                    try:
                        on_disk: str | None = code_fingerprint()
                    except OSError:        # a file vanished mid-upgrade: still changing
                        on_disk = None
                    verdict = watch.look(on_disk, lambda: _imports_cleanly(self.program.import_check))
                    if verdict == "restart":
                        restart = True
                        break
                    if verdict == "unusable":
                        self.log("the code on disk changed but does not import; still serving the code "
                                 "loaded at start (clients run in-process meanwhile)")
                if ready and not self.stopping:
                    try:
                        conn, _ = self._listener.accept()
                    except OSError as exc:      # e.g. out of file descriptors: keep serving
                        self.log(f"accept failed: {exc}")
                        time.sleep(0.1)
                        continue
                    self._handle(conn)
        finally:
            restore_signals(previous)
            self.close()
            self._reap()
        if restart and not self.stopping:
            self.log(f"the code on disk changed: restarting to load it ({len(self.children)} run(s) go on)")
            try:
                os.execv(sys.executable, sys.orig_argv)
            except OSError as exc:
                self.log(f"could not restart ({exc}); stopped")
                return 1
        self.log(f"stopped; {len(self.children)} run(s) still finishing on their own")
        return 0

    def _reap(self) -> None:
        while True:    # also runs started before a restart (exec) of this worker: not in self.children
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid in self.kept:
                self._retire(pid)
            if pid in self.children:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                self.log(f"run {pid} ended: " + (f"exit {code}" if code >= 0 else f"killed by signal {-code}"))

    # -- run processes kept with their connections ----------------------------------------------

    def _from_kept(self, pid: int) -> None:
        """A run process wrote: a log line (``l TEXT``), that it is free for another command
        (``i CONNECTIONS EXIT``), or it ended (EOF)."""
        k = self.kept[pid]
        try:
            data = k.ctl.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._retire(pid)
            return
        k.buf += data
        while b"\n" in k.buf:
            line, _, k.buf = k.buf.partition(b"\n")
            word, _, rest = line.decode("utf-8", "backslashreplace").partition(" ")
            if word == "l":
                self.log(rest)
            elif word == "i":
                held, _, code = rest.partition(" ")
                k.idle_since = time.monotonic()
                self.log(f"process {pid} waits for the next command with {held} kept connection(s) "
                         f"(its command: exit {code})")

    def _retire(self, pid: int) -> None:
        """Closing its control socket ends an idle run process (a busy one, after its command)."""
        k = self.kept.pop(pid, None)
        if k is not None:
            k.ctl.close()

    def _idle(self) -> list[tuple[float, int]]:
        """(idle since, pid) of the run processes waiting for a command, the longest waiting first."""
        return sorted((k.idle_since, pid) for pid, k in self.kept.items() if k.idle_since is not None)

    def _retire_idle(self) -> None:
        now = time.monotonic()
        idle = self._idle()
        for n, (since, pid) in enumerate(idle):
            if (now - since > self.program.keep_s or now - self.kept[pid].born > KEPT_MAX_AGE
                    or n < len(idle) - KEPT_IDLE_MAX):
                self._retire(pid)

    def _hand_to_kept(self, conn: socket.socket) -> bool:
        """Give the client to the run process that became free last, if any is."""
        while True:
            idle = self._idle()
            if not idle:
                return False
            pid = idle[-1][1]
            k = self.kept[pid]
            try:
                socket.send_fds(k.ctl, [b"c"], [conn.fileno()])
            except OSError:       # it just ended
                self._retire(pid)
                continue
            k.idle_since = None
            return True

    # -- one client ---------------------------------------------------------------------------

    def _handle(self, conn: socket.socket) -> None:
        """Check who is calling, then hand it to a free kept run process, or fork at once: the
        child talks to the client, so a slow or stuck client never holds up the others."""
        try:
            uid = peer_creds(conn)[1]
            if uid != os.getuid():
                self.log(f"refused a connection from uid {uid}")
                return
            if self._hand_to_kept(conn):
                return
            ours, theirs = socket.socketpair() if self.program.keep_s > 0 else (None, None)
            pid = os.fork()
            if pid == 0:
                code = EXIT_INTERNAL
                try:
                    if ours is not None:
                        ours.close()
                    code = self._child(conn, theirs)
                finally:
                    os._exit(code)
            self.children.add(pid)
            if ours is not None and theirs is not None:
                theirs.close()
                self.kept[pid] = _Kept(ours, time.monotonic())
        except Exception as exc:   # one bad connection must never end the worker
            self.log(f"could not serve a connection: {exc}")
        finally:
            conn.close()

    def _child(self, conn: socket.socket, ctl: socket.socket | None) -> int:
        """In the fork: serve the client; then, while we hold kept connections and the worker
        wants us, tell it we are free and serve the client it hands us next."""
        assert self._listener is not None
        self._listener.close()       # a worker restarted while we run must be able to listen and lock
        os.close(self._lock_fd)
        for k in self.kept.values():  # the other run processes' sockets: they must see the worker alone
            k.ctl.close()
        self.kept.clear()
        self._ctl = ctl     # our log lines go to the worker, which writes them (fd 2 becomes the client's)
        if ctl is not None:
            keep_in_this_process(self.program.keep_s)
        code = EXIT_INTERNAL
        try:
            code, again = self._one_client(conn)
            while again and ctl is not None:
                held = _holds_connections()
                setproctitle.setproctitle(f"cronium-fab (keeps {held} connection(s) for the next command; "
                                          f"worker {os.getppid()})")
                try:
                    ctl.sendall(f"i {held} {code}\n".encode())
                    gc.collect()    # what the command left to the collector (database engines hold files, sockets)
                    _, fds, _, _ = socket.recv_fds(ctl, 16, 1, socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    break
                if not fds:     # the worker retired us (idle too long, stopped, restarted)
                    break
                conn = socket.socket(fileno=fds[0])
                code, again = self._one_client(conn)
        finally:
            pool = process_pool()
            if pool is not None:
                pool.close()
            atexit._run_exitfuncs()
        return code

    def _one_client(self, conn: socket.socket) -> tuple[int, bool]:
        """Read the request; unless it is for other code, become the client's command. Returns its
        exit status and whether this process may serve another."""
        try:
            return self._request(conn)
        finally:
            conn.close()

    def _request(self, conn: socket.socket) -> tuple[int, bool]:
        pool = process_pool()
        if pool is not None:
            pool.sweep()    # what expired while we waited (or ran a long command) goes now
        held = _holds_connections()
        kept = held > 0
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            send_frame_line(conn, {"protocol": PROTOCOL, "ready": os.getpid()})
            doc, fds = receive_request(conn)
        except (OSError, ValueError) as exc:
            self.log(f"no command from a client (it gave up waiting, or sent a bad request): {exc}")
            return 0, kept
        try:
            if doc.get("protocol") != PROTOCOL or doc.get("fingerprint") != self.fingerprint:
                self.log("refused a command: the client runs other code than this worker (upgraded? "
                         "the worker restarts itself once the new code is in place)")
                send_frame_line(conn, {"fallback": f"the worker at {self.path} runs other code than this "
                                                          "command (after an upgrade it restarts itself within "
                                                          "seconds)"})
                return 0, kept
            argv = [str(a) for a in doc["argv"]]
            command = next((a for a in argv[1:] if a in self.commands), "-")   # never arguments: they may be secret
            try:
                send_frame_line(conn, {"pid": os.getpid()})
                go = read_line(conn, bytearray()).get("go") is True
            except TimeoutError:    # the client stalled: tell it we never started, so it runs it itself
                with contextlib.suppress(OSError):
                    send_frame_line(conn, {"notrun": True})
                go = False
            except (OSError, ValueError):
                go = False
            if not go:
                self.log(f"run {os.getpid()}: {command}: the client gave up before the start; not run")
                return 0, kept
            self.log(f"run {os.getpid()}: {command}"
                     + (f" (this process keeps {held} connection(s) from earlier commands)" if held else ""))
            return _run_command(conn, fds, doc, argv, command, self.program.main, keep=self.program.keep_s > 0)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


class CodeWatch:
    """When to restart into new code on disk (pip upgrade, edited checkout): once it differs from
    the loaded code, has stayed the same for two looks in a row (an upgrade may be half-way), and
    imports. Code that does not import is not tried again until it changes."""

    def __init__(self, loaded: str) -> None:
        self.loaded = loaded
        self.changed_to = ""
        self.unusable = ""

    def look(self, on_disk: str | None, imports: Callable[[], bool]) -> str:
        """``on_disk``: the fingerprint now (None: unreadable, still changing). Returns
        ``"same"``, ``"wait"``, ``"restart"`` or ``"unusable"``."""
        if on_disk is None or on_disk != self.changed_to:
            self.changed_to = "" if on_disk in (None, self.loaded, self.unusable) else on_disk
            return "same" if on_disk in (self.loaded, self.unusable) else "wait"
        if imports():
            return "restart"
        self.unusable, self.changed_to = on_disk, ""
        return "unusable"


def _imports_cleanly(modules: tuple[str, ...]) -> bool:
    """Whether new code on disk can start: restarting into a syntax error would end the worker."""
    import subprocess

    try:
        return subprocess.run([sys.executable, "-c", "import " + ", ".join(modules or ("cronium_fab.worker",))],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


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


def _holds_connections() -> int:
    pool = process_pool()
    return len(pool) if pool is not None else 0


def _run_command(conn: socket.socket, fds: list[int], doc: dict[str, Any], argv: list[str], command: str,
                 main: Callable[[], None], *, keep: bool = False) -> tuple[int, bool]:
    """Become the client's command: its stdio, directory, umask, environment and argv; run it;
    report how it ended. Returns the exit status and whether this process may serve another
    command (``keep``, it ended cleanly and holds kept connections): then the client's stdio,
    directory and environment are already let go."""
    # In ps and pgrep -f: the command (never its arguments, which may carry input data).
    setproctitle.setproctitle(f"cronium-fab {command} (served by worker {os.getppid()})")
    with contextlib.suppress(PermissionError):   # a kept run process already leads its own session
        os.setsid()    # the worker's terminal signals are not ours; our client forwards its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for signum in doc.get("ignored_signals") or []:     # what the caller ignores, we ignore
        if signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.fchdir(fds[3])
    for fd in fds:
        os.close(fd)
    fds.clear()
    os.umask(int(doc["umask"]))
    _take_environment({str(k): str(v) for k, v in doc["env"].items()})
    sys.argv = argv
    _reopen_stdio()
    finished = threading.Event()
    conn.settimeout(None)
    watch = threading.Thread(target=_watch_client, args=(conn, finished), name="client-watch", daemon=True)
    watch.start()
    code: int = EXIT_INTERNAL
    died_of: int | None = None
    clean = False
    try:
        main()
        code, clean = 0, True
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        clean = code not in (EXIT_INTERNAL, EXIT_CANCELLED)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        died_of = int(signal.SIGINT)   # as Python does: an uncaught KeyboardInterrupt ends us by SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1                       # as Python exits on an uncaught exception
    finally:
        finished.set()
    again = keep and clean and _holds_connections() > 0
    if not again:
        atexit._run_exitfuncs()        # as at a normal exit (it also stops Paramiko's threads)
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as exc:   # e.g. the reader of our stdout is gone: as Python, exit 120
        print(f"Exception ignored flushing sys.stdout: {exc!r}", file=sys.stderr)
        code, again = 120, False
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        again = False                  # unwritten text must never reach the next caller's stderr
    if again:
        _let_go_of_the_caller()        # before the exit status: the caller's pipes close with its client
    with contextlib.suppress(OSError):
        send_frame_line(conn, {"signal": died_of} if died_of else {"exit": code})
    if again:
        # wakes the watcher blocked on the socket (a close alone would not), so that it ends before
        # the next client's socket can get the same descriptor number
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        watch.join(5)
        again = not watch.is_alive()
    return code, again


def _let_go_of_the_caller() -> None:
    """What a run process keeps of its caller after the command, let go: stdio (so its pipes see
    EOF; sys.std* become /dev/null streams, so nothing buffered for this caller can reach the next)
    and working directory (so it can be removed or unmounted). The environment stays until the
    next command (``_take_environment``): this process holds that caller's connections anyway."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for name in ("stdin", "stdout", "stderr"):
        with contextlib.suppress(OSError, ValueError):
            getattr(sys, name).flush()   # to /dev/null now
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    for name in ("stdin", "stdout", "stderr"):
        setattr(sys, f"__{name}__", getattr(sys, name))
    os.chdir("/")


def _take_environment(env: dict[str, str]) -> None:
    """``os.environ`` becomes ``env``, touching only what differs: in a kept run process other
    threads (Paramiko's) run, and setenv beside a getenv elsewhere is not safe in C; the same
    caller's same environment (Cronium calling again) changes nothing."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _reopen_stdio() -> None:
    """New sys.std* on fds 0-2, set up as Python sets them up for a process started with the
    client's environment: UTF-8 (or ``PYTHONIOENCODING``), stdout line-buffered on a terminal and
    block-buffered otherwise, everything unbuffered with ``PYTHONUNBUFFERED``."""
    encoding, _, errors = (os.environ.get("PYTHONIOENCODING") or "").partition(":")
    encoding = encoding or "utf-8"
    ctype = os.environ.get("LC_ALL") or os.environ.get("LC_CTYPE") or os.environ.get("LANG") or "C"
    if not errors and (ctype in ("C", "POSIX") or ctype.startswith("C.")):
        errors = "surrogateescape"     # as Python does in the C/POSIX locale (PEP 538/540)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def writer(fd: int, errors_default: str, line: bool) -> io.TextIOWrapper:
        raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding=encoding, errors=errors or errors_default,
                                line_buffering=line and not unbuffered, write_through=unbuffered)

    sys.stdin = open(0, encoding=encoding, errors=errors or "strict", closefd=False)  # noqa: SIM115
    sys.stdout = writer(1, "strict", os.isatty(1))
    sys.stderr = writer(2, "backslashreplace", True)
    for name in ("stdin", "stdout", "stderr"):   # code that writes to sys.__stderr__ reaches the client too
        setattr(sys, f"__{name}__", getattr(sys, name))


def _watch_client(conn: socket.socket, finished: threading.Event) -> None:
    """Signals the client forwards become ours; the client gone before the end is SIGTERM."""
    buf = bytearray()
    allowed = {int(sig) for sig in STOP_SIGNALS}
    while True:
        try:
            doc = read_line(conn, buf)
        except (OSError, ValueError):
            doc = {}
        if not doc:
            if not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
            return
        sig = doc.get("signal")
        if isinstance(sig, int) and sig in allowed and not finished.is_set():
            os.kill(os.getpid(), sig)


def serve(path: str | None, program: ServedProgram, *, fingerprint: str) -> int:
    """Serve ``program`` on the socket ``path`` (default ``paths.socket_path()``) until stopped."""
    worker = Worker(os.path.abspath(os.path.expanduser(path)) if path else socket_path(), program, fingerprint)
    try:
        return worker.serve()
    finally:
        worker.close()
