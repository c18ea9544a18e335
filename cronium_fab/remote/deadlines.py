"""Bounding blocking SSH calls: one timer thread for the whole process.

Paramiko waits for the answer to a global request (a port forward, a keepalive round trip) as
long as the transport lives, and keepalives do not end a frozen peer's connection. So every such
call runs under ``closes_on_hang(conn, seconds)``: past ``seconds`` the connection is closed, which
ends the wait (the call then fails as on a dead connection). A ``threading.Timer`` per call did the
same at the cost of a thread started and joined per call, three per host and run in API mode
(measured: a tenth of ``serve``'s own CPU at 300 hosts); here one daemon thread serves them all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_PENDING, _FIRING, _DONE = 0, 1, 2


class _Watch:
    __slots__ = ("action", "state", "done")

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.state = _PENDING
        self.done: threading.Event | None = None   # made when it fires: who leaves waits on it


class Deadlines:
    """Actions to take at a deadline unless their guarded call ended first; see ``guard``."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, seconds: float, action: Callable[[], object]) -> Iterator[None]:
        """Run ``action`` (in the timer thread) if the block is still running after ``seconds``.
        On leaving the block the action is either never run or has completed: a connection the
        guard closed is closed by then, never later (it may be given to another run next)."""
        watch = _Watch(action)
        item = (time.monotonic() + seconds, next(self._seq), watch)
        with self._cv:
            heapq.heappush(self._heap, item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="cronium-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0] is item:
                self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                if watch.state == _PENDING:
                    watch.state = _DONE
                    if item in self._heap:   # not after a fork inside the block: the child's heap is new
                        self._heap.remove(item)
                        heapq.heapify(self._heap)
                done = watch.done
            if done is not None:
                done.wait()

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if not self._heap:
                        self._cv.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        watch = heapq.heappop(self._heap)[2]
                        watch.state = _FIRING
                        watch.done = threading.Event()
                        break
                    self._cv.wait(wait)
            try:
                watch.action()
            except Exception:   # noqa: BLE001 - closing a broken connection
                log.debug("a deadline's action failed", exc_info=True)
            finally:
                with self._cv:
                    watch.state = _DONE
                watch.done.set()


_DEADLINES = Deadlines()
# A forked child (the worker's runs) starts with no timer thread and a lock nobody holds.
os.register_at_fork(after_in_child=_DEADLINES._reset)


def closes_on_hang(conn: Any, seconds: float) -> Any:
    """``with closes_on_hang(conn, s):`` closes ``conn`` if the block is still running after ``s``."""
    return _DEADLINES.guard(seconds, conn.close)
