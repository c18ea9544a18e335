"""A controller killed mid-run (SIGKILL, no chance to record the end): its remote scripts stop, and
the next cronium-fab process that opens the database closes its rows as "controller lost"; a run
whose controller is alive is never touched."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from cronium_fab.testing.procs import procs_with, wait_until
from tests.run.conftest import Fleet

pytestmark = pytest.mark.ssh


def _states(fleet: Fleet) -> tuple[list[str], list[str], list[str]]:
    with fleet.db.engine.connect() as conn:
        return tuple(sorted(r[0] for r in conn.execute(text(f"SELECT status FROM {t}")))  # type: ignore[return-value]
                     for t in ("jobs", "logs", "executions"))


def _long_run(fleet: Fleet, ssh_hosts, tmp_path: Path, marker: str) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    ev = fleet.event(ssh_hosts(2), f'echo started; exec -a "{marker}" sleep 60', timeout_value=120)
    proc = subprocess.Popen([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(ev)], cwd=tmp_path,
                            env=dict(fleet.env(), CRONIUM_FAB_WORKER="off"), stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: len(procs_with(marker)) == 2, 60)
    return proc


def _cli(fleet: Fleet, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cronium_fab", *args], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(fleet.env(), CRONIUM_FAB_WORKER="off"), timeout=120)


def test_killed_controller_rows_are_closed_by_the_next_process(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = f"cfab-lost-{id(tmp_path)}"
    proc = _long_run(fleet, ssh_hosts, tmp_path, marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert wait_until(lambda: procs_with(marker) == [], 10), "the remote scripts outlived their controller"
    assert _states(fleet) == (["running"], ["RUNNING"], ["running", "running"])
    out = _cli(fleet, tmp_path, "recover")
    assert out.returncode == 0 and "closed 1 run(s)" in out.stderr, out.stderr
    assert _states(fleet) == (["failed"], ["FAILURE"], ["failed", "failed"])
    with fleet.db.engine.connect() as conn:
        errors = [r[0] for r in conn.execute(text("SELECT error FROM executions"))]
        errors += [r[0] for r in conn.execute(text("SELECT last_error FROM jobs"))]
    assert all(e and e.startswith("controller lost: cronium-fab (pid") for e in errors), errors
    assert "closed 0 run(s)" in _cli(fleet, tmp_path, "recover").stderr   # nothing else is touched


def test_any_run_event_closes_them_but_never_a_live_run(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = f"cfab-live-{id(tmp_path)}"
    live = _long_run(fleet, ssh_hosts, tmp_path, marker)
    try:
        assert "closed 0 run(s)" in _cli(fleet, tmp_path, "recover").stderr
        (host,) = ssh_hosts(1)
        quick = fleet.event([host], "echo quick")
        assert _cli(fleet, tmp_path, "run-event", "--id", str(quick)).returncode == 0
        with fleet.db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'running'")).scalar() == 1
        live.send_signal(signal.SIGKILL)
        live.wait(30)
        assert _cli(fleet, tmp_path, "run-event", "--id", str(quick)).returncode == 0
        with fleet.db.engine.connect() as conn:
            assert sorted(r[0] for r in conn.execute(text("SELECT status FROM jobs"))) == ["completed", "completed",
                                                                                            "failed"]
    finally:
        if live.poll() is None:
            live.kill()
            live.wait(30)
