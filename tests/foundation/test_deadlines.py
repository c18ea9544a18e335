"""The one timer thread that bounds blocking SSH calls (remote/deadlines.py)."""

from __future__ import annotations

import os
import threading
import time

from cronium_fab.remote.deadlines import Deadlines


def test_a_block_that_overruns_gets_its_action_and_leaves_only_after_it_completed() -> None:
    d = Deadlines()
    done = threading.Event()

    def slow_close() -> None:
        time.sleep(0.2)
        done.set()

    blocked = threading.Event()
    with d.guard(0.05, lambda: (blocked.set(), slow_close())):
        assert blocked.wait(5)   # the action runs while the block is still inside
    assert done.is_set()         # and leaving the block waited for it to finish
    assert len(d) == 0


def test_a_block_that_ends_in_time_never_sees_its_action() -> None:
    d = Deadlines()
    fired: list[int] = []
    for i in range(50):
        with d.guard(0.2, lambda i=i: fired.append(i)):
            pass
    assert len(d) == 0
    time.sleep(0.4)
    assert fired == []


def test_only_the_guards_that_overrun_fire_each_at_its_own_deadline() -> None:
    d = Deadlines()
    fired: dict[str, float] = {}
    t0 = time.monotonic()

    def hold(name: str, limit: float, hold_for: float) -> None:
        with d.guard(limit, lambda: fired.setdefault(name, time.monotonic() - t0)):
            time.sleep(hold_for)

    threads = [threading.Thread(target=hold, args=a) for a in
               (("late", 0.3, 0.6), ("early", 0.1, 0.6), ("in-time", 0.5, 0.05), ("never", 5.0, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(fired) == {"early", "late"}
    assert 0.1 <= fired["early"] < fired["late"] and fired["late"] >= 0.3
    assert len(d) == 0


def test_a_failing_action_does_not_stop_the_timer() -> None:
    d = Deadlines()

    def boom() -> None:
        raise OSError("closing a broken connection")

    with d.guard(0.01, boom):
        time.sleep(0.1)
    fired = threading.Event()
    with d.guard(0.01, fired.set):
        assert fired.wait(5)


def test_a_forked_child_gets_its_own_timer() -> None:
    from cronium_fab.remote import deadlines

    with deadlines._DEADLINES.guard(30, lambda: None):   # the parent's timer thread runs, its lock in use
        pid = os.fork()
        if pid == 0:   # pragma: no cover - the child
            code = 1
            try:
                ok = threading.Event()
                with deadlines._DEADLINES.guard(0.01, ok.set):
                    code = 0 if ok.wait(5) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_block_entered_before_a_fork_ends_cleanly_in_the_child() -> None:
    from cronium_fab.remote import deadlines

    block = deadlines._DEADLINES.guard(30, lambda: None)
    block.__enter__()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child leaves the block its parent entered
        code = 1
        try:
            block.__exit__(None, None, None)
            code = 0
        finally:
            os._exit(code)
    block.__exit__(None, None, None)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(deadlines._DEADLINES) == 0
