"""Liveness between controller and runner, both ways (PROTOCOL.md §2 ``heartbeat``): a frozen
controller's scripts stop on their hosts; a frozen host ends `unreachable` seconds after it froze;
a healthy quiet run is never cut off."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from cronium_fab.db.models import Execution
from cronium_fab.execute import RunRequest, run_event
from cronium_fab.testing.procs import procs_with, session_processes, wait_until
from tests.run.conftest import Fleet

pytestmark = pytest.mark.ssh

FAST = {"CRONIUM_FAB_HEARTBEAT": "0.5", "CRONIUM_FAB_HEARTBEAT_TIMEOUT": "2"}


@pytest.mark.timeout(120)
def test_frozen_host_ends_unreachable_soon_and_the_others_succeed(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 14: a host whose sshd session is SIGSTOPped mid-run (TCP still up), event timeout 10 s,
    default heartbeat: the run ends with that host `unreachable` well before the old 55 s
    (10 + 5 kill grace + 30 watchdog margin + 10 cancel grace), saying how long it was silent."""
    frozen_host = ssh_hosts(1, exclusive=True)[0]
    hosts = [*ssh_hosts(2), frozen_host]
    d = tmp_path / "started"
    d.mkdir()
    ev = fleet.event(hosts, f'touch "{d}/$CRONIUM_SERVER_NAME"; sleep 4; echo done', timeout_value=10)
    frozen: list[int] = []

    def freeze() -> None:
        if wait_until(lambda: (d / frozen_host.name).exists(), 60):
            for pid in session_processes(frozen_host):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)

    t = threading.Thread(target=freeze)
    t.start()
    try:
        t0 = time.monotonic()
        result = run_event(fleet.settings, RunRequest(event_id=ev), out=io.StringIO())
        took = time.monotonic() - t0
        t.join()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert frozen, "no session process was frozen"
    by = {h.name: h for h in result.hosts}
    h = by[frozen_host.name]
    assert (h.status, h.error_kind) == ("unreachable", "unresponsive"), (h.status, h.error)
    assert h.error and h.error.startswith("no sign of life from the runner for ") and "host frozen" in h.error
    assert all(by[x.name].status == "success" and "done" in by[x.name].stdout for x in hosts[:2])
    assert took < 40, took       # heartbeat timeout 10 s after the freeze, plus set-up; was 55 s
    with fleet.db.session() as s:
        errors = [e.error or "" for e in s.scalars(select(Execution))]
    assert sum("no sign of life from the runner" in e for e in errors) == 1, errors


@pytest.mark.timeout(120)
def test_frozen_controller_s_scripts_stop_and_nothing_is_recorded_twice(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A `run-event` process SIGSTOPped while its scripts run: the runners stop the scripts and
    remove their work dirs once its heartbeat stops; back (SIGCONT), it records each host once,
    cancelled, with the silence as the reason."""
    hosts = ssh_hosts(2)
    marker = f"cfab-frozen-ctl-{os.getpid()}-{id(tmp_path)}"
    ev = fleet.event(hosts, f'echo started; exec -a "{marker}" sleep 60', timeout_value=120)
    proc = subprocess.Popen([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(ev)], cwd=tmp_path,
                            env=dict(fleet.env(), CRONIUM_FAB_WORKER="off", **FAST), stderr=subprocess.PIPE,
                            text=True)
    try:
        assert wait_until(lambda: len(procs_with(marker)) == 2, 60)
        proc.send_signal(signal.SIGSTOP)
        assert wait_until(lambda: procs_with(marker) == [], 30), "the scripts outlived their frozen controller"
        assert wait_until(lambda: not [p for h in hosts for p in h.tmp_dir.glob("cronium-run-*")], 10), "work dir left"
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    with fleet.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT status, error FROM executions")).all()
        jobs = conn.execute(text("SELECT status FROM jobs")).scalars().all()
        logs = conn.execute(text("SELECT status FROM logs")).scalars().all()
    assert [r.status for r in rows] == ["cancelled", "cancelled"], (rows, err)
    assert all("controller silent for" in (r.error or "") for r in rows), rows
    assert len(jobs) == 1 and len(logs) == 1 and jobs[0] != "running", (jobs, logs)


@pytest.mark.timeout(120)
def test_a_long_quiet_healthy_run_is_not_cut_off(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    """A script quiet for over two heartbeat timeouts (the runner's K records and our heartbeats
    keep both sides sure of each other) ends normally. Not shorter than 1 s / 5 s: on a loaded
    machine a stall of a second or two must not cut off a healthy run."""
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, "sleep 12; echo done", timeout_value=60)
    result = run_event(fleet.settings.with_(heartbeat_interval=1.0, heartbeat_timeout=5.0), RunRequest(event_id=ev),
                       out=io.StringIO())
    assert result.status == "SUCCESS", [(h.status, h.error) for h in result.hosts]
    assert all(h.stdout == "done\n" for h in result.hosts)
