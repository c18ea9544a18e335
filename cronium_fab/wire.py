"""The worker's wire protocol, both ends (standard library only: the client imports it before
anything heavy). See docs/WORKER.md.

A client connects to the worker's Unix socket and waits for a line ``{"protocol", "ready"}`` from
the fork that serves it; it then sends one frame (a 4-byte length, a JSON object with argv,
environment, umask, ignored signals and the code fingerprint) with its stdin, stdout, stderr and
working directory as SCM_RIGHTS file descriptors. Everything after that is JSON lines: the fork's
``{"pid"}`` (or ``{"fallback"}``), the client's ``{"go"}``, forwarded ``{"signal"}``s, and the
fork's ``{"exit"}``, ``{"signal"}`` or ``{"notrun"}``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
import sys
from typing import Any

PROTOCOL = 1
HEADER = struct.Struct("!I")
MAX_REQUEST = 4 * 1024 * 1024
READY_TIMEOUT = 2.0      # connect + a fork saying it is ready: milliseconds when the worker is alive
REQUEST_TIMEOUT = 5.0    # the fork reading our request and answering


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


_startup_fingerprint: str | None = None


def note_startup_fingerprint() -> None:
    """Take the fingerprint of the code this process is about to import (the entry point calls
    this first): a file that changes while we import it must count as new code, never as ours."""
    global _startup_fingerprint
    _startup_fingerprint = code_fingerprint()


def startup_fingerprint() -> str:
    """The fingerprint noted at start-up, else the code on disk now."""
    return _startup_fingerprint or code_fingerprint()


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


def recv_exact(conn: socket.socket, n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise ValueError(f"connection closed in the {what}")
        data += more
    return data


def receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The client's request: a JSON object and its stdin, stdout, stderr and working directory."""
    size = HEADER.size
    data, anc, _flags, _addr = conn.recvmsg(size, socket.CMSG_SPACE(4 * array.array("i").itemsize))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    try:
        data += recv_exact(conn, size - len(data), "request header")
        (length,) = HEADER.unpack(data)
        if length > MAX_REQUEST:
            raise ValueError(f"request of {length} bytes is too large")
        body = recv_exact(conn, length, "request")
        try:
            doc = json.loads(body)
        except RecursionError:
            raise ValueError("request nested too deeply") from None
        if len(fds) != 4 or not isinstance(doc, dict):
            raise ValueError("a request carries a JSON object and exactly 4 file descriptors")
        return doc, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
