"""Framing of PROTOCOL.md: the stdin preamble/header/payload and the stdout records."""
import os
import select
import struct
import time

from . import PROTOCOL, RunnerError, jsonc
from .lite import sha256

MAGIC_IN = b"CRONIUM-RUNNER-INPUT"
MAX_HEADER = 16 << 20
MAX_PAYLOAD = 256 << 20
CHUNK = 64 * 1024


def _read_exact(fd, n, what):
    parts = []
    while n > 0:
        data = os.read(fd, min(n, 1 << 20))
        if not data:
            raise RunnerError("cancelled", "stdin closed while reading the %s" % what)
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def read_input(fd):
    """Read preamble, header and payload from ``fd``; return ``(header, payload_bytes)``.

    The payload's sha256 is checked against the header before anyone opens it.
    """
    line = b""
    while not line.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c:
            raise RunnerError("protocol" if line else "cancelled", "stdin closed before the input preamble")
        line += c
        if len(line) > 200:
            raise RunnerError("protocol", "input preamble too long (not a cronium controller?)")
    parts = line.decode("ascii", "replace").split()
    if len(parts) != 3 or parts[0].encode() != MAGIC_IN or not parts[2].isdigit():
        raise RunnerError("protocol", "bad input preamble %r" % line[:60])
    if parts[1] != str(PROTOCOL):
        raise RunnerError("protocol", "protocol mismatch: controller speaks %s, runner speaks %d"
                          % (parts[1], PROTOCOL))
    size = int(parts[2])
    if size > MAX_HEADER:
        raise RunnerError("protocol", "header too large (%d bytes)" % size)
    try:
        header = jsonc.loads(_read_exact(fd, size, "header").decode("utf-8"))
    except ValueError as e:
        raise RunnerError("protocol", "header is not JSON: %s" % e)
    if not isinstance(header, dict):
        raise RunnerError("protocol", "header is not a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise RunnerError("protocol", "protocol mismatch: header says %r, runner speaks %d"
                          % (header.get("protocol"), PROTOCOL))
    psize = header.get("payload_size")
    want = header.get("payload_sha256")
    if not isinstance(psize, int) or psize < 0 or psize > MAX_PAYLOAD:
        raise RunnerError("protocol", "bad payload_size %r" % (psize,))
    if not isinstance(want, str):
        raise RunnerError("protocol", "payload_sha256 missing from header")
    payload = _read_exact(fd, psize, "payload")
    got = sha256(payload).hexdigest()
    if got != want.lower():
        raise RunnerError("digest", "payload sha256 mismatch: expected %s, got %s" % (want, got))
    return header, payload


def record(kind, body):
    return kind + struct.pack(">I", len(body)) + body


def json_record(kind, obj):
    return record(kind, jsonc.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


KEEPALIVE = b"K\0\0\0\0"   # an empty K record: "the runner is alive" (header ``heartbeat``)


def heartbeat(header):
    """The header's ``heartbeat`` as ``(interval, timeout)`` seconds, or None when not asked for."""
    hb = header.get("heartbeat")
    if hb is None:
        return None
    try:
        interval, timeout = float(hb["interval"]), float(hb["timeout"])
    except (TypeError, KeyError, ValueError):
        raise RunnerError("protocol", "header heartbeat must be {\"interval\": S, \"timeout\": S}")
    if not 0 < interval < timeout:
        raise RunnerError("protocol", "header heartbeat needs 0 < interval < timeout")
    return interval, timeout


def stream_records(kind, ts, data):
    """Split script output into O/E records of at most CHUNK bytes (timestamp included)."""
    stamp = struct.pack(">d", ts)
    step = CHUNK - 8
    return b"".join(record(kind, stamp + data[i:i + step]) for i in range(0, len(data), step))


class Hearing:
    """When the controller was last heard on ``fd`` (its heartbeat, PROTOCOL.md §2): shared by the
    script's loop and the stdout writer, which both read the heartbeat bytes. The clock starts when
    the input (header and payload) has been read."""

    def __init__(self, fd, timeout):
        self.fd, self.timeout = fd, timeout
        self.heard = time.monotonic()
        self.closed = False

    def listen(self):
        """Read what is waiting on ``fd`` (call it when readable): bytes are a heartbeat, EOF closes."""
        try:
            data = os.read(self.fd, CHUNK)
        except OSError:
            data = b""
        if data:
            self.heard = time.monotonic()
        else:
            self.closed = True
        return data

    def silent(self, now):
        return self.closed or now - self.heard > self.timeout


class FrameWriter:
    """Writes records to an fd; remembers a broken pipe instead of raising twice.

    With ``stall_s`` (a non-blocking fd), a write that makes no progress for that long counts as
    broken: a frozen controller stops reading, and a runner blocked on a full pipe would notice
    nothing (nor the silence on stdin). With ``hearing`` too, a slow reader is not a frozen one: while
    the write waits, the controller's heartbeat is read, and stdout is broken only once it is stalled
    and the controller silent (or its stdin closed) for ``stall_s``. ``last`` is when a write last
    went through (monotonic)."""

    def __init__(self, fd):
        self.fd = fd
        self.broken = False
        self.stall_s = None
        self.hearing = None
        self.last = time.monotonic()

    def _wait(self):
        """Wait until the fd takes more; raise OSError when it is stalled as described above."""
        if self.stall_s is None:
            raise OSError("stdout would block")
        h = self.hearing
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if now - start >= self.stall_s and (h is None or h.silent(now)):
                raise OSError("stdout made no progress for %s s" % self.stall_s)
            watch = [h.fd] if h is not None and not h.closed else []
            wait = max(start + self.stall_s - now, 0.0)
            if h is not None and not h.closed:
                wait = max(wait, h.heard + h.timeout - now) + 0.01
            readable, writable, _ = select.select(watch, [self.fd], [], min(wait, 1.0))
            if writable:
                return
            if readable:
                h.listen()

    def write(self, data):
        if self.broken:
            return False
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    self._wait()
                    continue
                view = view[n:]
                self.last = time.monotonic()
        except OSError:
            self.broken = True
            return False
        return True
