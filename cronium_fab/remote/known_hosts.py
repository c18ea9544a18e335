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
import hmac
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

_lock = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_entry_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _Indexed:
    """One known_hosts file's keys by host name. Paramiko's ``HostKeys`` compares a name with every
    entry on each lookup (HMACing it against every hashed one) and every line with all before it
    on load, so a fleet run cost O(hosts x entries): 0.3 ms a lookup at 1,000 entries, 1.6 s of CPU
    to look up each of 3,000 hosts once. Here plain names come from a dict; hashed entries are tried
    one by one, once per name, and the answer is kept (the file is read again when it changes)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._entries: list[HostKeyEntry] = []
        self._names: dict[str, list[int]] = {}
        self._hashed: list[int] = []
        for lineno, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entry = HostKeyEntry.from_line(line, lineno)
            except (paramiko.SSHException, InvalidHostKey, ValueError):
                continue   # a key type Paramiko does not know, a broken key: skipped, as OpenSSH does
            if entry is None or entry.key is None:
                continue
            pos = len(self._entries)
            self._entries.append(entry)
            for h in entry.hostnames:
                self._names.setdefault(h, []).append(pos)
            if any(h.startswith("|1|") for h in entry.hostnames):
                self._hashed.append(pos)
        self._found: dict[str, dict[str, paramiko.PKey]] = {}

    def _hashed_match(self, name: str, entry: HostKeyEntry) -> bool:
        return any(h.startswith("|1|") and hmac.compare_digest(paramiko.HostKeys.hash_host(name, h), h)
                   for h in entry.hostnames)

    def lookup(self, name: str) -> dict[str, paramiko.PKey]:
        """Every key for ``name`` by key type, the first entry of a type winning (Paramiko's rule)."""
        found = self._found.get(name)
        if found is None:
            positions = set(self._names.get(name, ()))
            if not name.startswith("|1|"):
                positions.update(p for p in self._hashed if self._hashed_match(name, self._entries[p]))
            found = {}
            for pos in sorted(positions):
                key = self._entries[pos].key
                found.setdefault(key.get_name(), key)
            self._found[name] = found
        return dict(found)


class KnownHostsStore:
    """Our writable known_hosts file plus read-only extra files (``~/.ssh/known_hosts``)."""

    def __init__(self, path: Path, extra: Sequence[Path] = ()) -> None:
        self.path = Path(path).expanduser()
        self.extra = [Path(p).expanduser() for p in extra]
        self._cache: dict[Path, tuple[tuple[int, int], _Indexed]] = {}
        self._cache_lock = threading.Lock()

    def _load(self, path: Path) -> _Indexed | None:
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            cached = self._cache.get(path)
            if cached and cached[0] == stamp:
                return cached[1]
        try:   # a line that is not UTF-8 fails to parse and is skipped, as a malformed one is
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                indexed = _Indexed(f)
        except OSError:
            indexed = _Indexed(())
        with self._cache_lock:
            self._cache[path] = (stamp, indexed)
        return indexed

    def lookup(self, name: str) -> dict[str, paramiko.PKey]:
        """Every known key for the known_hosts name (``host`` or ``[host]:port``), by key type."""
        found: dict[str, paramiko.PKey] = {}
        for path in [self.path, *self.extra]:
            indexed = self._load(path)
            if indexed is None:
                continue
            for key_type, key in indexed.lookup(name).items():
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
