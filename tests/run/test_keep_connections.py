"""Connections kept between runs (``serve``'s ``ConnectionPool``): real sshd hosts, real databases.

Whether two runs shared a connection is read on the host, not from our own flags: every script
prints the pid of its runner's parent, which is the sshd process of the SSH connection (OpenSSH
forks one per connection and runs every session's command as its child)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paramiko
import pytest

from cronium_fab.execute import Cancel, RunRequest, RunResult, run_event
from cronium_fab.jobqueue import enqueue
from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name
from cronium_fab.remote.pool import ConnectionPool
from cronium_fab.testing.procs import session_processes, wait_until
from tests.run.conftest import CONN, Fleet, alive

pytestmark = pytest.mark.ssh

ON_SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def conn_pid(result: RunResult, i: int = 0) -> int:
    m = re.search(r"conn=(\d+)", result.hosts[i].stdout)
    assert m, result.hosts[i]
    return int(m.group(1))


def run(fleet: Fleet, ev: int, pool: ConnectionPool | None, **kw: object) -> RunResult:
    return run_event(fleet.settings, RunRequest(event_id=ev, **kw), out=None, connections=pool)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["bundled", "api"])
def test_the_next_run_on_a_host_reuses_its_connection(fleet: Fleet, ssh_hosts, mode: str) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, CONN, timeout_value=30)
    pool = ConnectionPool()
    try:
        first = run(fleet, ev, pool, helper_mode=mode)
        assert first.status == "SUCCESS", first.hosts
        assert [h.connection_reused for h in first.hosts] == [False, False]
        assert {h.helper_mode for h in first.hosts} == {mode}
        assert len(pool) == 2
        second = run(fleet, ev, pool, helper_mode=mode)
        assert second.status == "SUCCESS", second.hosts
        assert [h.connection_reused for h in second.hosts] == [True, True]
        assert [conn_pid(second, i) for i in (0, 1)] == [conn_pid(first, i) for i in (0, 1)]
        assert pool.reused == 2 and pool.dropped == 0
    finally:
        pool.close()
    for i in (0, 1):   # closing the pool ends the hosts' sessions
        assert wait_until(lambda i=i: not alive(conn_pid(first, i)), 10)


def test_api_helpers_work_on_a_reused_connection(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    """Each run's remote forward is cancelled at its end; the next run's forward and token work."""
    (host,) = ssh_hosts(1)
    script = ("import cronium, os, subprocess\n"
              "print(open('/proc/%d/stat' % os.getppid()).read().split()[3])\n"
              "n = (cronium.getVariable('n') or 0) + 1\n"
              "cronium.setVariable('n', n)\n"
              "cronium.output({'n': n})\n")
    ev = fleet.event([host], script, type="PYTHON", timeout_value=30)
    pool = ConnectionPool()
    try:
        got = [run(fleet, ev, pool, helper_mode="api") for _ in range(3)]
    finally:
        pool.close()
    assert [r.status for r in got] == ["SUCCESS"] * 3, [r.hosts for r in got]
    assert [r.hosts[0].helper_mode for r in got] == ["api"] * 3
    assert [r.hosts[0].output for r in got] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [r.hosts[0].connection_reused for r in got] == [False, True, True]
    assert len({r.hosts[0].stdout.split()[0] for r in got}) == 1


@ON_SQLITE
def test_a_dropped_connection_is_replaced_not_failed(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN, timeout_value=30)
    pool = ConnectionPool()
    try:
        first = run(fleet, ev, pool)
        os.kill(conn_pid(first), signal.SIGTERM)   # the host ends the idle connection
        assert wait_until(lambda: not alive(conn_pid(first)), 10)
        second = run(fleet, ev, pool)
        assert second.status == "SUCCESS", second.hosts
        assert not second.hosts[0].connection_reused and second.hosts[0].connect_attempts == 1
        assert conn_pid(second) != conn_pid(first)
        third = run(fleet, ev, pool)
        assert third.hosts[0].connection_reused and conn_pid(third) == conn_pid(second)
    finally:
        pool.close()


@ON_SQLITE
def test_a_silent_peer_costs_the_check_timeout_then_a_new_connection(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    """A kept connection whose sshd is frozen (SIGSTOP): the round trip before use times out, the
    connection is closed, a new one is opened and the run succeeds."""
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN, timeout_value=30)
    pool = ConnectionPool(check_timeout=1.0)
    try:
        first = run(fleet, ev, pool)
        frozen = conn_pid(first)
        os.kill(frozen, signal.SIGSTOP)
        try:
            second = run(fleet, ev, pool)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert second.status == "SUCCESS", second.hosts
        assert not second.hosts[0].connection_reused and conn_pid(second) != frozen
        assert pool.dropped == 1
    finally:
        pool.close()


@ON_SQLITE
def test_a_host_key_no_longer_in_known_hosts_is_not_trusted_again(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN, timeout_value=30)
    pool = ConnectionPool()
    try:
        first = run(fleet, ev, pool)
        assert first.status == "SUCCESS"
        other = paramiko.Ed25519Key.from_private_key(io.StringIO(host.add_client_key()))
        KnownHostsStore(fleet.settings.known_hosts).replace(host_entry_name(host.address, host.port), other)
        second = run(fleet, ev, pool)
        assert second.status != "SUCCESS"
        assert second.hosts[0].error_kind == "host-key-changed" and not second.hosts[0].connection_reused
        assert len(pool) == 0
        assert wait_until(lambda: not alive(conn_pid(first)), 10)   # closed, not kept
    finally:
        pool.close()


@ON_SQLITE
def test_a_changed_credential_gets_its_own_connection(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN, timeout_value=30)
    pool = ConnectionPool()
    try:
        first = run(fleet, ev, pool)
        with fleet.db.engine.begin() as c:   # the server's key is rotated in Cronium
            c.execute(text("UPDATE servers SET ssh_key = :k"), {"k": host.add_client_key()})
        second = run(fleet, ev, pool)
        assert second.status == "SUCCESS", second.hosts
        assert not second.hosts[0].connection_reused and conn_pid(second) != conn_pid(first)
    finally:
        pool.close()


@ON_SQLITE
def test_a_failed_script_keeps_the_connection_a_cancelled_run_does_not(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    fails = fleet.event([host], CONN + "; exit 3", timeout_value=30)
    pool = ConnectionPool()
    try:
        first = run(fleet, fails, pool)
        assert first.hosts[0].status == "failure" and first.hosts[0].exit_code == 3
        assert len(pool) == 1
        slow = fleet.event([host], CONN + "; sleep 30", timeout_value=60)
        cancel = Cancel()
        threading.Timer(2.0, cancel.stop, args=("test cancels",)).start()
        second = run_event(fleet.settings, RunRequest(event_id=slow), out=None, cancel=cancel, connections=pool)
        assert second.hosts[0].status == "cancelled" and second.hosts[0].connection_reused
        assert len(pool) == 0
        assert wait_until(lambda: not alive(conn_pid(first)), 10)   # closed, not kept
    finally:
        pool.close()


@ON_SQLITE
def test_idle_connections_are_closed_after_their_time(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN, timeout_value=30)
    pool = ConnectionPool(idle_s=0.5)
    try:
        first = run(fleet, ev, pool)
        assert len(pool) == 1 and alive(conn_pid(first))
        assert wait_until(lambda: pool.sweep() == 1 or len(pool) == 0, 5)
        assert len(pool) == 0
        assert wait_until(lambda: not alive(conn_pid(first)), 10)
        second = run(fleet, ev, pool)
        assert not second.hosts[0].connection_reused
    finally:
        pool.close()


def test_serve_reuses_connections_across_jobs_and_closes_them_on_stop(
        fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cronium_fab.db.models import Execution, Job

    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN, timeout_value=30)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "cronium_fab", "serve", "--worker-id", "keep", "--poll", "0.2"],
                            env=dict(fleet.env(), CRONIUM_FAB_WORKER="off", CRONIUM_FAB_HELPER_MODE="bundled"),
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"), cwd=tmp_path)
    try:
        assert wait_until(lambda: "serving" in log.read_text(), 30), log.read_text()
        assert "idle connections kept 300 s" in log.read_text()
        stdout = []
        for _ in range(2):
            job_id = enqueue(fleet.db, ev)[0]

            def done(job_id: str = job_id) -> bool:
                with fleet.db.session() as s:
                    row = s.get(Job, job_id)
                    return row is not None and row.status in ("completed", "failed")
            assert wait_until(done, 60), log.read_text()
            with fleet.db.session() as s:
                ex = s.query(Execution).filter(Execution.job_id == job_id).one()
                stdout.append((ex.output or "", (ex.execution_metadata or {}).get("connection_reused")))
        pids = [int(re.search(r"conn=(\d+)", out).group(1)) for out, _ in stdout]  # type: ignore[union-attr]
        assert [reused for _, reused in stdout] == [False, True]
        assert pids[0] == pids[1] and alive(pids[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    assert "closed 1 kept connection(s)" in log.read_text()   # by the pool, not by the exit
    assert wait_until(lambda: not alive(pids[0]), 10)


@ON_SQLITE
@pytest.mark.timeout(120)
def test_a_host_frozen_during_a_run_on_a_kept_connection_loses_it(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The liveness verdict (no sign of life from the runner) closes the kept connection; once the
    host thaws, the next run connects afresh and succeeds."""
    (host,) = ssh_hosts(1, exclusive=True)
    settings = fleet.settings.with_(heartbeat_interval=0.5, heartbeat_timeout=2.0)
    d = tmp_path / "started"
    d.mkdir()
    ev = fleet.event([host], CONN + f'; touch "{d}/go"; sleep 3', timeout_value=30)
    pool = ConnectionPool()
    frozen: list[int] = []

    def freeze() -> None:
        if wait_until(lambda: (d / "go").exists(), 60):
            for pid in session_processes(host):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
    try:
        first = run_event(settings, RunRequest(event_id=ev), out=None, connections=pool)
        assert first.status == "SUCCESS" and len(pool) == 1
        (d / "go").unlink()
        t = threading.Thread(target=freeze)
        t.start()
        try:
            second = run_event(settings, RunRequest(event_id=ev), out=None, connections=pool)
            t.join()
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert frozen and second.hosts[0].connection_reused
        assert (second.hosts[0].status, second.hosts[0].error_kind) == ("unreachable", "unresponsive")
        assert len(pool) == 0
        third = run_event(settings, RunRequest(event_id=ev), out=None, connections=pool)
        assert third.status == "SUCCESS" and not third.hosts[0].connection_reused
        assert conn_pid(third) != conn_pid(first)
    finally:
        pool.close()
