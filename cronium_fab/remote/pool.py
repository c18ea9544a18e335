"""SSH connections kept open between the runs of one long-lived process (``cronium-fab serve``).

Opening an SSH connection is most of what a short run costs on both ends: key exchange, user
authentication, and on the server a new privilege-separated session process (measured on
loopback: ~22 ms of host CPU and ~5 ms of controller CPU for a connection and one ``true``,
against ~4 ms and ~1 ms for another command on an open connection). Cronium runs the same
events on the same servers again and again, so ``serve`` keeps each host's connection after a
clean run and the next run on that host opens only a new session channel on it. OpenSSH's
``ControlPersist`` does the same for the ``ssh`` command.

What makes reuse safe:

- **The key** of a kept connection is everything that chose and authenticated it: address,
  port, user, the credential (key text, password, passphrase; key files by path, size and
  modification time), the ``~/.ssh/config`` entry that applied, and the SSH settings (host key
  policy, known_hosts files, timeouts), as an HMAC under a random per-process key (the index
  holds no digest of a password that could be tried offline; the connection objects themselves
  hold their credentials as long as they are open, as any open connection does). A server whose
  credential changed in the database gets a new connection; the old one times out idle. The
  agent's socket (``SSH_AUTH_SOCK``) and ``HOME`` are part of the key, not the agent's keys: an
  agent key removed from the agent keeps working on a kept connection until it closes.
- **The host key is checked again** when a connection is taken: the key the server proved on
  that connection must still be recorded in known_hosts (an operator who removed or replaced it
  gets a fresh connection, which verifies as usual). A key accepted ``accept-once`` is never
  recorded, so such a connection is never reused.
- **A round trip before use**: the taker sends a global request and waits (at most
  ``check_timeout`` s) for the server's answer; a connection the server or the network dropped
  is closed and a new one opened, so a stale connection never fails a run.
- **Only clean runs give a connection back** (the caller's choice: a result came back, no
  liveness verdict, not cancelled; a connection whose remote forward could not be set up or
  cancelled is marked ``reusable = False``); anything else closes it. Connections through a jump
  host are never kept (the jump host's own connection would need the same checks).
- **Bounded**: idle connections are closed after ``idle_s``, every connection after ``max_age_s``
  from its opening (a revoked key stops working within that bound), at most ``max_idle`` are kept
  (each is one socket and one Paramiko thread here, one sshd session on its host), and
  ``close()`` (serve's stop) closes them all.

Two kinds of process keep connections: ``serve`` (one process, all its jobs in threads) and a
``cronium-fab worker``'s run process (``keep_in_this_process``). A Paramiko transport does not
survive a fork, so the worker itself holds none: a fork that ran a command and holds kept
connections stays, and the worker hands it the next command (docs/WORKER.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..settings import KEEP_CONNECTIONS
from .connection import HostTarget, SSHSettings, _ssh_config
from .deadlines import closes_on_hang
from .known_hosts import host_entry_name
from .tunnel import global_request_lock

log = logging.getLogger(__name__)

IDLE_S = KEEP_CONNECTIONS   # an idle connection is closed after this long
MAX_AGE_S = 900.0   # no connection is reused after this long from its opening
MAX_IDLE = 1024     # idle connections kept at most (the oldest go first); see max_idle_for_fds
CHECK_TIMEOUT_S = 5.0
# Paramiko's transport thread wakes up every 0.1 s to look at its state (its socket's timeout):
# ~0.3 ms of CPU per second per connection (measured: 100 idle connections, 30 ms/s). An idle kept
# connection needs no such haste: 1 s there (3.9 ms/s for 100), Paramiko's 0.1 s again when taken.
IDLE_POLL_S = 1.0
BUSY_POLL_S = 0.1


_KEY_SECRET = secrets.token_bytes(32)   # this process's: pool keys mean nothing outside it


def open_files_limit() -> int | None:
    """This process's soft limit of open files (None: unlimited), after raising it to the hard
    one, as servers holding many connections do."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * MAX_IDLE)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return None if soft == resource.RLIM_INFINITY else soft


def max_idle_for_fds() -> int:
    """``MAX_IDLE``, or half the open files this process may have if that is less (each kept
    connection holds a socket; the runs and the database need the rest)."""
    soft = open_files_limit()
    return MAX_IDLE if soft is None else max(1, min(MAX_IDLE, soft // 2))


FDS_PER_HOST = 6     # a host in flight: its socket, its session channel's pipe, a helper call's channel and socket
FDS_RESERVED = 64    # the database, the logs, the runner and payload files, the interpreter's own


def hosts_at_once_for_fds(parallel: int) -> int:
    """``parallel``, or as many hosts at once as the open files limit allows if that is fewer
    (past it, hosts would fail with "Too many open files")."""
    soft = open_files_limit()
    return parallel if soft is None else max(1, min(parallel, (soft - FDS_RESERVED) // FDS_PER_HOST))


_this_process: ConnectionPool | None = None


def keep_in_this_process(idle_s: float) -> ConnectionPool:
    """From now on this process keeps connections between its commands (a worker's run process,
    which serves one command after another): the pool ``process_pool`` returns."""
    global _this_process
    if _this_process is None:
        _this_process = ConnectionPool(idle_s=idle_s, max_idle=max_idle_for_fds())
    return _this_process


def process_pool() -> ConnectionPool | None:
    """The connections this process keeps between its commands, if it does (``keep_in_this_process``)."""
    return _this_process


def pool_key(target: HostTarget, settings: SSHSettings) -> str:
    """What a connection may be reused for: the same destination, credential, ``~/.ssh/config``
    entry and SSH settings. An HMAC under a per-process random key, so the pool's index holds
    nothing from which a password could be recovered."""
    files: list[tuple[str, int | None, int | None]] = []
    for f in target.key_files:
        try:
            st = os.stat(os.path.expanduser(f))
            files.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            files.append((f, None, None))
    entry = sorted(_ssh_config(settings).lookup(target.host).items()) if target.use_ssh_config else None
    h = hmac.new(_KEY_SECRET, digestmod=hashlib.sha256)
    # the agent and HOME (whose ~/.ssh/id_* Paramiko may try) are part of what authenticated it:
    # a worker's run process serves callers whose environments may differ
    agent = (os.environ.get("SSH_AUTH_SOCK"), os.environ.get("HOME"))
    for part in (target.host, target.port, target.user, target.use_ssh_config, target.private_key,
                 target.password, target.key_passphrase, files, entry, repr(settings), agent):
        h.update(repr(part).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class _Kept:
    conn: Any                 # fabric.Connection
    opened: float             # time.monotonic() when it was opened
    idle_since: float = field(default_factory=time.monotonic)


class ConnectionPool:
    """Idle connections by ``pool_key``; thread-safe. ``take`` a connection for a run, ``give`` it
    back after a clean run (or close it yourself), ``sweep`` now and then, ``close`` at the end."""

    def __init__(self, *, idle_s: float = IDLE_S, max_age_s: float = MAX_AGE_S, max_idle: int = MAX_IDLE,
                 check_timeout: float = CHECK_TIMEOUT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s, self.max_age_s, self.max_idle = idle_s, max_age_s, max_idle
        self.check_timeout = check_timeout
        self.clock = clock
        self._idle: dict[str, list[_Kept]] = {}
        self._opened: dict[int, float] = {}   # id(conn) -> when opened, for connections out on a run
        self._lock = threading.Lock()
        self._closed = False
        self.reused = 0        # counters, for the log and the tests
        self.dropped = 0       # taken but found dead, moved or expired

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def opened(self, conn: Any) -> None:
        """Note a connection the caller just opened (its age counts from now)."""
        with self._lock:
            self._opened[id(conn)] = self.clock()

    def take(self, key: str, settings: SSHSettings) -> Any | None:
        """A live, still-trusted idle connection for ``key`` (the most recently used), or None.
        One that does not answer in time means its host does not: the others kept for it go too
        (so a frozen host costs one ``check_timeout``, not one per kept connection)."""
        while True:
            with self._lock:
                kept = self._idle.get(key)
                if not kept:
                    return None
                k = kept.pop()
                if not kept:
                    del self._idle[key]
            now = self.clock()
            fresh = now - k.idle_since <= self.idle_s and now - k.opened <= self.max_age_s
            verdict = self._usable(k.conn, settings) if fresh else "expired"
            if verdict != "ok":
                gone = [k]
                with self._lock:
                    self.dropped += 1
                    if verdict == "silent":
                        gone += self._idle.pop(key, [])
                        self.dropped += len(gone) - 1
                for g in gone:
                    _close(g.conn)
                continue
            with self._lock:
                self._opened[id(k.conn)] = k.opened
                self.reused += 1
            return k.conn

    def give(self, key: str, conn: Any) -> None:
        """Keep ``conn`` for the next run on ``key``, or close it (pool closed, full, too old, dead)."""
        now = self.clock()
        with self._lock:
            opened = self._opened.pop(id(conn), now)
            transport = conn.transport
            keep = (not self._closed and now - opened < self.max_age_s and getattr(conn, "reusable", True)
                    and not getattr(conn, "gateway", None) and transport is not None and transport.is_active())
            evicted: list[_Kept] = []
            if keep:
                _poll_every(conn, IDLE_POLL_S)
                self._idle.setdefault(key, []).append(_Kept(conn, opened, now))
                evicted = self._evict_over_cap()
        if not keep:
            _close(conn)
        for k in evicted:
            _close(k.conn)

    def discard(self, conn: Any) -> None:
        """Close a connection that must not be reused."""
        with self._lock:
            self._opened.pop(id(conn), None)
        _close(conn)

    def sweep(self) -> int:
        """Close idle connections past their idle time or age, or whose server went away."""
        now = self.clock()
        gone: list[_Kept] = []
        with self._lock:
            for key in list(self._idle):
                keep = []
                for k in self._idle[key]:
                    t = k.conn.transport
                    if (now - k.idle_since > self.idle_s or now - k.opened > self.max_age_s
                            or t is None or not t.is_active()):
                        gone.append(k)
                    else:
                        keep.append(k)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        for k in gone:
            _close(k.conn)
        return len(gone)

    def close(self) -> int:
        """Close every idle connection (how many); connections given back later are closed too."""
        with self._lock:
            self._closed = True
            gone = [k for v in self._idle.values() for k in v]
            self._idle.clear()
        for k in gone:
            _close(k.conn)
        return len(gone)

    # -- internals ------------------------------------------------------------------------------

    def _evict_over_cap(self) -> list[_Kept]:
        """(under the lock) The oldest idle connections beyond ``max_idle``."""
        total = sum(len(v) for v in self._idle.values())
        if total <= self.max_idle:
            return []
        ordered = sorted(((k.idle_since, key, k) for key, v in self._idle.items() for k in v),
                         key=lambda x: x[0])
        out = []
        for _, key, k in ordered[:total - self.max_idle]:
            self._idle[key].remove(k)
            if not self._idle[key]:
                del self._idle[key]
            out.append(k)
        return out

    def _usable(self, conn: Any, settings: SSHSettings) -> str:
        """"ok", or why not: "closed", "host-key" (no longer in known_hosts), "silent" (no answer)."""
        transport = conn.transport
        if transport is None or not transport.is_active():
            return "closed"
        _poll_every(conn, BUSY_POLL_S)
        if not _host_key_still_known(conn, settings):
            log.info("host %s: its host key is no longer the one in known_hosts; not reusing the connection",
                     conn.host)
            return "host-key"
        return "ok" if _answers(conn, self.check_timeout) else "silent"


def _host_key_still_known(conn: Any, settings: SSHSettings) -> bool:
    try:
        key = conn.transport.get_remote_server_key()
        known = settings.store().lookup(host_entry_name(conn.host, conn.port))
    except Exception:   # noqa: BLE001 - anything odd: do not reuse
        return False
    recorded = known.get(key.get_name())
    return recorded is not None and recorded.asbytes() == key.asbytes()


def _answers(conn: Any, timeout: float) -> bool:
    """One round trip: a global request the server must answer (OpenSSH answers an unknown one
    with a failure), bounded by ``timeout`` s (remote/deadlines.py)."""
    transport = conn.transport
    try:
        # had it fired, the connection is closed when the block ends: never hand out one closing
        with closes_on_hang(conn, timeout), global_request_lock(transport):
            transport.global_request("keepalive@openssh.com", wait=True)
    except Exception:   # noqa: BLE001 - a dead connection
        return False
    return transport.is_active()


def _poll_every(conn: Any, seconds: float) -> None:
    settimeout = getattr(getattr(conn.transport, "sock", None), "settimeout", None)
    if settimeout is not None:
        with contextlib.suppress(Exception):   # a closed socket, a proxy command: leave it
            settimeout(seconds)


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:   # noqa: BLE001 - closing a broken connection
        log.debug("closing a pooled connection failed", exc_info=True)
