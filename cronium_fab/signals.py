"""SIGINT/SIGTERM/SIGHUP handling shared by the client, the worker and a run (standard library only)."""

from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def catch_stop_signals(handler: Any) -> dict[signal.Signals, Any]:
    """Install ``handler`` for SIGINT, SIGTERM and SIGHUP, except those our caller made us ignore
    (`nohup`, `&` in a script): they stay ignored. Returns what to give back to ``restore_signals``."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}


def restore_signals(previous: dict[signal.Signals, Any]) -> None:
    for sig, prev in previous.items():
        signal.signal(sig, prev)


def die_of(signum: int) -> None:
    """End this process by ``signum``, as if it had arrived with its default action."""
    if signum == signal.SIGINT and signal.getsignal(signum) is signal.default_int_handler:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
