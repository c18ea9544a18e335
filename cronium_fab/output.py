"""Output of a run while it happens: each host's lines as they come, prefixed by its name (on a
terminal, with a status line kept at the bottom), the bounded buffers that keep what a host
printed (the last ``cap`` bytes), and ``--output-dir``'s files (all of it)."""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError


class LivePrinter:
    """Whole lines per host, prefixed with the server name, never interleaved mid-line. Plain
    text (a pipe, a log file): the host start/end notes are for ``TerminalView``'s status line.

    The hosts' threads never wait on ``out``: lines go through a bounded queue to one writer
    thread. A reader that stops reading (a paused pager, Ctrl-S, a caller that drains our stderr
    only at the end) must not stall the runs: their heartbeats and records go on, and lines that
    do not fit are counted and said (every byte is in the records: ``cronium-fab show``)."""

    QUEUE_LINES = 10_000

    def __init__(self, out: IO[str] | None, names: list[str]) -> None:
        self.out = out
        self.width = max((len(n) for n in names), default=4)
        self._lock = threading.Lock()
        self._partial: dict[tuple[str, str], bytes] = {}
        self._queue: queue.Queue[str | None] = queue.Queue(self.QUEUE_LINES)
        self._writer: threading.Thread | None = None
        self._closed = False
        self._dropped = 0

    def host_started(self, host: str) -> None:
        """``host`` began (connecting)."""

    def host_finished(self, host: str, status: str) -> None:
        """``host`` ended in ``status`` (or never started: ``skipped``, ``cancelled``)."""

    def close(self) -> None:
        """The run is over (before its summary is printed): what is queued is written, then
        writes are direct again."""
        with self._lock:
            self._closed = True
            writer = self._writer
        if writer is not None:
            self._queue.put(None)
            writer.join()
        self._say_dropped()

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
        self._write(text)

    def message(self, text: str) -> None:
        if self.out is None:
            return
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        with self._lock:
            if self._closed:
                direct = True
            else:
                direct = False
                if self._writer is None:
                    self._writer = threading.Thread(target=self._drain, name="live-output", daemon=True)
                    self._writer.start()
                try:
                    self._queue.put_nowait(text)
                except queue.Full:
                    self._dropped += text.count("\n") or 1
        if direct:
            self._put(text)

    def _drain(self) -> None:
        while (text := self._queue.get()) is not None:
            self._say_dropped()
            self._put(text)

    def _say_dropped(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._put(f"[cronium-fab: {dropped} lines of live output not shown: this output was not read fast "
                      "enough; every line is in the run's records (cronium-fab show LOG_ID)]\n")

    def _put(self, text: str) -> None:
        """Write to ``out`` (the writer thread, or after ``close``)."""
        assert self.out is not None
        self.out.write(text)
        self.out.flush()


class Progress:
    """The counts of the status line: done (succeeded), running, failed, left (not started yet)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.running = self.done = self.failed = self.skipped = 0
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            self.running += 1

    def finished(self, status: str, *, was_running: bool) -> None:
        with self._lock:
            self.running -= was_running
            if status == "success":
                self.done += 1
            elif status in ("skipped", "cancelled") and not was_running:
                self.skipped += 1
            else:
                self.failed += 1

    def line(self) -> str:
        with self._lock:
            left = self.total - self.done - self.failed - self.skipped - self.running
            elapsed = int(time.monotonic() - self.t0)
            parts = [f"done {self.done}/{self.total}", f"running {self.running}", f"failed {self.failed}",
                     f"left {left}"] + ([f"skipped {self.skipped}"] if self.skipped else [])
        return " · ".join(parts) + f" · {elapsed // 60}:{elapsed % 60:02d}"


class TerminalView(LivePrinter):
    """``LivePrinter`` on a terminal: host lines scroll while a status line (done / running /
    failed / left, elapsed) stays at the bottom, drawn by rich's ``Live`` (cursor moves, erasing
    and redrawing are rich's, not escape codes of ours). Only for a terminal: the caller decides
    (never a pipe, never under ``--json``)."""

    def __init__(self, out: IO[str], names: list[str]) -> None:
        super().__init__(out, names)
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._text = Text
        self.progress = Progress(len(names))
        self._running: set[str] = set()
        self.console = Console(file=out, force_terminal=True, highlight=False, markup=False, emoji=False)
        view = self

        class StatusLine:
            def __rich__(self) -> Any:
                return Text(view.progress.line(), style="bold")

        self._live = Live(StatusLine(), console=self.console, refresh_per_second=4, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)  # drawn at once, not first after a refresh period

    def host_started(self, host: str) -> None:
        with self._lock:
            self._running.add(host)
        self.progress.started()

    def host_finished(self, host: str, status: str) -> None:
        with self._lock:
            was_running = host in self._running
            self._running.discard(host)
        self.progress.finished(status, was_running=was_running)

    def _put(self, text: str) -> None:
        # printed through the console, it lands above the status line
        self.console.print(self._text(text.removesuffix("\n")), soft_wrap=True)

    def close(self) -> None:
        super().close()
        if self._live.is_started:
            self._live.stop()


def prepare_output_dir(path: str | os.PathLike[str]) -> Path:
    """``--output-dir``: created (0700: outputs may hold secrets) if missing; it must be a
    directory we can write. Raises ConfigError saying what to do."""
    d = Path(path).expanduser()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--output-dir {str(path)!r} exists and is not a directory: name a directory") from None
    except OSError as exc:
        raise ConfigError(f"--output-dir {str(path)!r} cannot be created: {exc.strerror or exc}") from None
    if not d.is_dir():
        raise ConfigError(f"--output-dir {str(path)!r} is not a directory: name a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {str(path)!r} is not writable by this user: pick another directory")
    return d


_UNSAFE = re.compile(r"[^A-Za-z0-9._@:+=,-]")


def output_file_stems(names: list[str]) -> list[str]:
    """A file name per host (``NAME.stdout``/``NAME.stderr``): the server name with anything
    but ``[A-Za-z0-9._@:+=,-]`` as ``_``, no leading dot, and ``-2``, ``-3`` for repeated names."""
    stems: list[str] = []
    seen: set[str] = set()
    for name in names:
        base = _UNSAFE.sub("_", name).lstrip(".") or "host"
        stem, n = base, 1
        while stem in seen:
            n += 1
            stem = f"{base}-{n}"
        seen.add(stem)
        stems.append(stem)
    return stems


class HostFiles:
    """One host's ``.stdout`` and ``.stderr`` files (0600), written as the records arrive."""

    def __init__(self, directory: Path, stem: str) -> None:
        self.files: dict[str, IO[bytes]] = {}
        for kind in ("stdout", "stderr"):
            fd = os.open(directory / f"{stem}.{kind}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self.files[kind] = os.fdopen(fd, "wb")

    def write(self, kind: str, data: bytes) -> None:
        self.files[kind].write(data)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


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
