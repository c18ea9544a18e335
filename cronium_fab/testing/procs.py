"""Looking at this machine's processes (the test hosts are on it): leftovers and argv leaks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from .hosts import DevHost, process_trees


def cmdlines() -> Iterator[tuple[int, bytes]]:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    yield int(entry), f.read()
            except OSError:
                pass


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` seconds passed; returns its last truth."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def procs_with(marker: str) -> list[int]:
    """Pids whose argv contains ``marker``."""
    return [pid for pid, cmd in cmdlines() if marker.encode() in cmd]


@contextmanager
def watch_argv(*needles: str) -> Iterator[list[str]]:
    """While the block runs, record every argv (of any process) that contains one of ``needles``."""
    seen: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set():
            for pid, cmd in cmdlines():
                if any(n.encode() in cmd for n in needles):
                    seen.append(f"pid {pid}: {cmd[:200].decode(errors='replace')}")
            time.sleep(0.02)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join()


def session_processes(host: DevHost) -> list[int]:
    """The per-connection sshd processes of a local test host (below its listener; not the runner
    nor the script). SIGSTOPped, the host neither answers nor closes the connection: a frozen host."""
    assert host.pid, f"{host.name} is not running"
    out = []
    for pid in process_trees([host.pid]):
        if pid == host.pid:
            continue
        with suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().strip().startswith("sshd"):   # sshd, or sshd-session (OpenSSH >= 9.8)
                out.append(pid)
    return out
