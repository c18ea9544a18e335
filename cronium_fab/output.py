"""Output of a run while it happens: each host's lines as they come, prefixed by its name, and
the bounded buffers that keep what a host printed (the last ``cap`` bytes)."""

from __future__ import annotations

import threading
from typing import IO


class LivePrinter:
    """Whole lines per host, prefixed with the server name, never interleaved mid-line."""

    def __init__(self, out: IO[str] | None, names: list[str]) -> None:
        self.out = out
        self.width = max((len(n) for n in names), default=4)
        self._lock = threading.Lock()
        self._partial: dict[tuple[str, str], bytes] = {}

    def feed(self, host: str, stream: str, data: bytes) -> None:
        if self.out is None:
            return
        key = (host, stream)
        buf = self._partial.get(key, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[key] = rest
        if len(rest) > 65536:  # a huge line without newline: show it in pieces
            lines.append(rest)
            self._partial[key] = b""
        if lines:
            self._emit(host, stream, lines)

    def flush(self, host: str) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((host, stream), b"")
            if rest:
                self._emit(host, stream, [rest])

    def _emit(self, host: str, stream: str, lines: list[bytes]) -> None:
        mark = "|" if stream == "stdout" else "!"
        text = "".join(
            f"{host:<{self.width}} {mark} {line.decode('utf-8', 'replace')}\n" for line in lines
        )
        with self._lock:
            assert self.out is not None
            self.out.write(text)
            self.out.flush()

    def message(self, text: str) -> None:
        if self.out is None:
            return
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()


class CappedBuffer:
    """Keeps the last ``cap`` bytes of a stream and counts what was dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.cap:
            cut = len(self.data) - self.cap
            del self.data[:cut]
            self.dropped += cut

    def text(self) -> str:
        body = bytes(self.data).decode("utf-8", "replace")
        return f"[... {self.dropped} bytes truncated ...]\n{body}" if self.dropped else body
