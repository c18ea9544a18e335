"""Host key store: our own known_hosts file (written) plus ~/.ssh/known_hosts (read only).

Entries use OpenSSH's format and naming (``host`` for port 22, ``[host]:port`` otherwise), so
``ssh-keygen -F '[h]:p' -f FILE`` works on our file and lines can be copied between the two.
Appends are serialized with a thread lock and an ``fcntl`` lock, so concurrent ``accept-new``
first contacts (threads or processes) never interleave lines.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import paramiko

_lock = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_entry_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class KnownHostsStore:
    """Our writable known_hosts file plus read-only extra files (``~/.ssh/known_hosts``)."""

    def __init__(self, path: Path, extra: Sequence[Path] = ()) -> None:
        self.path = Path(path).expanduser()
        self.extra = [Path(p).expanduser() for p in extra]
        self._cache: dict[Path, tuple[tuple[int, int], paramiko.HostKeys]] = {}
        self._cache_lock = threading.Lock()

    def _load(self, path: Path) -> paramiko.HostKeys | None:
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            cached = self._cache.get(path)
            if cached and cached[0] == stamp:
                return cached[1]
        hk = paramiko.HostKeys()
        with contextlib.suppress(OSError, paramiko.SSHException):
            hk.load(str(path))
        with self._cache_lock:
            self._cache[path] = (stamp, hk)
        return hk

    def lookup(self, name: str) -> dict[str, paramiko.PKey]:
        """Every known key for the known_hosts name (``host`` or ``[host]:port``), by key type."""
        found: dict[str, paramiko.PKey] = {}
        for path in [self.path, *self.extra]:
            hk = self._load(path)
            if hk is None:
                continue
            entry = hk.lookup(name)
            if entry:
                for key_type, key in entry.items():
                    found.setdefault(key_type, key)
        return found

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    def add(self, name: str, key: paramiko.PKey) -> None:
        """Append ``name key`` to our file (created 0600) unless an identical entry exists."""
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        with self._locked():
            existing = self._read_lines()
            if line in existing:
                return
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(self.path, 0o600)

    def replace(self, name: str, key: paramiko.PKey) -> None:
        """Drop every entry of ``name`` from our file and record ``key`` instead."""
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        with self._locked():
            kept = [ln for ln in self._read_lines() if not _entry_matches(ln, name)]
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.writelines([*kept, line])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path) as f:
                return f.readlines()
        except FileNotFoundError:
            return []


def _entry_matches(line: str, name: str) -> bool:
    fields = line.split()
    if not fields or line.startswith("#"):
        return False
    hosts = fields[0]
    if hosts.startswith("|1|"):
        return any(paramiko.HostKeys.hash_host(name, h) == h for h in hosts.split(","))
    return name in hosts.split(",")
