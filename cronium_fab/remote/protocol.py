"""Controller side of the controller⇄runner wire format (docs/PROTOCOL.md, protocol 2).

``encode_input_head`` builds what precedes the payload on the runner's stdin; ``OutputDecoder``
turns the bytes of the bootstrap channel's stdout, in whatever pieces they arrive, into events:
one ``Bootstrap`` marker (the runner is missing, python3 is missing or too old) or the runner's
``Record``s (H, O, E, K, R).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL = 2
INPUT_MAGIC = b"CRONIUM-RUNNER-INPUT"
OUTPUT_MAGIC = b"CRNR"
RUNNER_MISS = "CRONIUM-RUNNER-MISS"
NO_PYTHON = "CRONIUM-NO-PYTHON"
PYTHON_TOO_OLD = "CRONIUM-PYTHON-TOO-OLD"
MARKERS = (RUNNER_MISS, NO_PYTHON, PYTHON_TOO_OLD)
RECORD_KINDS = frozenset(b"HOEKR")
HEARTBEAT = b"."  # any byte after the payload is a sign of life (PROTOCOL.md §2)
MAX_STREAM_RECORD = 64 * 1024  # O/E records carry at most 64 KiB (PROTOCOL.md §3)
MAX_JSON_RECORD = 64 << 20  # H/R: generous; only a corrupt stream gets near it
MAX_PREAMBLE_NOISE = 64 * 1024  # what a chatty login shell may print before our first byte


class ProtocolError(Exception):
    """The runner's output does not follow the wire format."""


def encode_input_head(header: dict[str, Any]) -> bytes:
    """The preamble line and the JSON header; the payload bytes follow them on stdin."""
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%s %d %d\n" % (INPUT_MAGIC, PROTOCOL, len(body)) + body


def encode_input(header: dict[str, Any], payload: bytes) -> bytes:
    """Preamble + header + payload, with ``protocol``/``payload_size``/``payload_sha256`` filled in."""
    import hashlib

    header = {**header, "protocol": PROTOCOL, "payload_size": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return encode_input_head(header) + payload


@dataclass(frozen=True)
class Bootstrap:
    """A bootstrap marker line: ``marker`` is one of ``MARKERS``; ``detail`` e.g. the old version."""

    marker: str
    detail: str = ""


@dataclass(frozen=True)
class Record:
    """One runner record. ``ts`` is set for O/E (the runner's unix time); ``json`` for H/R."""

    kind: str  # "H", "O", "E", "K" (keepalive, empty) or "R"
    data: bytes
    ts: float | None = None
    json: dict[str, Any] | None = None


Event = Bootstrap | Record


class OutputDecoder:
    """Incremental decoder of the bootstrap channel's stdout.

    Before the first event it skips lines a login shell may print (``noise``, kept for error
    messages), then expects a marker line or ``CRNR``; after ``CRNR``, framed records. Bytes after
    the ``R`` record are ignored (``trailing`` counts them).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.started = False  # CRNR seen
        self.marker: Bootstrap | None = None
        self.finished = False  # R seen
        self.noise = b""
        self.trailing = 0

    def feed(self, data: bytes) -> list[Event]:
        if self.finished or self.marker is not None:
            self.trailing += len(data)
            return []
        self._buf += data
        events: list[Event] = []
        if not self.started:
            head = self._start()
            if head is not None:
                events.append(head)
            if not self.started:
                return events
        while not self.finished:
            rec = self._next_record()
            if rec is None:
                break
            events.append(rec)
        if self.finished and self._buf:
            self.trailing += len(self._buf)
            self._buf.clear()
        return events

    def _start(self) -> Bootstrap | None:
        while True:
            if self._buf[:4] == OUTPUT_MAGIC:
                del self._buf[:4]
                self.started = True
                return None
            if len(self._buf) < 4 and OUTPUT_MAGIC.startswith(bytes(self._buf)):
                return None  # maybe the start of CRNR
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_PREAMBLE_NOISE:
                    raise ProtocolError(f"no runner output, got {bytes(self._buf[:200])!r}...")
                # A marker line may still be arriving; CRNR never follows other bytes on a line.
                return None
            line = bytes(self._buf[:nl]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buf[: nl + 1]
            for marker in MARKERS:
                if line == marker or line.startswith(marker + " "):
                    self.marker = Bootstrap(marker, line[len(marker):].strip())
                    self.trailing += len(self._buf)
                    self._buf.clear()
                    return self.marker
            self.noise += line.encode() + b"\n"
            if len(self.noise) > MAX_PREAMBLE_NOISE:
                raise ProtocolError(f"no runner output, got {self.noise[:200]!r}...")

    def _next_record(self) -> Record | None:
        if len(self._buf) < 5:
            return None
        kind = self._buf[0]
        if kind not in RECORD_KINDS:
            raise ProtocolError(f"unknown record kind {bytes([kind])!r}")
        (length,) = struct.unpack_from(">I", self._buf, 1)
        limit = MAX_STREAM_RECORD + 8 if kind in b"OE" else 0 if kind == ord("K") else MAX_JSON_RECORD
        if length > limit:
            raise ProtocolError(f"record {chr(kind)} of {length} bytes exceeds {limit}")
        if len(self._buf) < 5 + length:
            return None
        body = bytes(self._buf[5 : 5 + length])
        del self._buf[: 5 + length]
        k = chr(kind)
        if k == "K":
            return Record(k, body)
        if k in "OE":
            if length < 8:
                raise ProtocolError(f"record {k} too short for its timestamp")
            (ts,) = struct.unpack_from(">d", body)
            return Record(k, body[8:], ts=ts)
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"record {k} is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ProtocolError(f"record {k} is not a JSON object")
        if k == "H" and (obj.get("magic") != "CRNR"):
            raise ProtocolError("hello record without magic CRNR")
        if k == "R":
            self.finished = True
        return Record(k, body, json=obj)
