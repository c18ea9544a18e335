"""`cronium-fab serve`: real worker processes sharing a real database's job queue, real sshd hosts.

Scripts leave marker lines in a directory the test reads (the hosts are local), so "ran exactly
once" is counted where the script ran, not in our own rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from cronium_fab.db.models import Job
from cronium_fab.errors import ConfigError
from cronium_fab.jobqueue import enqueue
from cronium_fab.testing.procs import procs_with, wait_until
from tests.run.conftest import Fleet

pytestmark = pytest.mark.ssh

TERMINAL = ("completed", "failed", "cancelled")
# several workers share PostgreSQL (SQLite takes one worker: test_sqlite_takes_one_worker)
ON_POSTGRESQL = pytest.mark.parametrize("db_url", ["postgresql", "cronium"], indirect=True)


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def workers(fleet: Fleet, tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGCONT)
            w.proc.kill()
        w.proc.wait(30)


def start(fleet: Fleet, workers: list[Serve], tmp_path: Path, name: str, *args: str, **env: str) -> Serve:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cronium_fab", "serve", "--worker-id", name, "--poll", "0.2", *args],
        env=dict(fleet.env(), CRONIUM_FAB_WORKER="off", **env), stdout=subprocess.DEVNULL,
        stderr=log.open("wb"), cwd=tmp_path)
    w = Serve(proc, log)
    workers.append(w)
    assert wait_until(lambda: "serving" in w.text() or proc.poll() is not None, 30), w.text()
    assert proc.poll() is None, w.text()
    return w


def marks(d: Path) -> list[str]:
    return sorted(p.read_text().strip() for p in d.glob("*.mark")) if d.exists() else []


def job(fleet: Fleet, job_id: str) -> Job:
    with fleet.db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None
        return row


def all_done(fleet: Fleet, ids: list[str]) -> bool:
    return all(job(fleet, j).status in TERMINAL for j in ids)


def set_retries(fleet: Fleet, ev: int, retries: int) -> None:
    with fleet.db.engine.begin() as conn:
        conn.execute(text("UPDATE events SET retries = :r WHERE id = :e"), {"r": retries, "e": ev})


MARK = 'echo "$CRONIUM_JOB_ID $CRONIUM_SERVER_NAME" > "{d}/$CRONIUM_EXECUTION_ID.mark"'


@ON_POSTGRESQL
def test_three_workers_run_every_job_exactly_once(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    d = tmp_path / "marks"
    d.mkdir()
    ev = fleet.event(hosts, MARK.format(d=d))
    ids = [enqueue(fleet.db, ev)[0] for _ in range(15)]
    for n in ("w1", "w2", "w3"):
        start(fleet, workers, tmp_path, n, "--jobs", "2")
    assert wait_until(lambda: all_done(fleet, ids), 180)
    assert {job(fleet, j).status for j in ids} == {"completed"}
    assert sorted(marks(d)) == sorted(f"{j} {h.name}" for j in ids for h in hosts)   # once per job and host
    by = {job(fleet, j).orchestrator_id for j in ids}
    assert by <= {"w1", "w2", "w3"} and all(job(fleet, j).attempts == 1 for j in ids)


LEASE = {"CRONIUM_FAB_REQUEUE_MARGIN": "1"}


def first_attempt_hangs(fleet: Fleet, ssh_hosts, workers: list[Serve], tmp_path: Path):  # type: ignore[no-untyped-def]
    """Worker "wa" (2 s lease) runs a job whose first attempt hangs (until its 3 s timeout) and
    whose second marks at once; returns once the first attempt runs."""
    (host,) = ssh_hosts(1)
    d = tmp_path / "marks"
    d.mkdir()
    script = f'if mkdir "{d}/first" 2>/dev/null; then sleep 30; fi; ' + MARK.format(d=d)
    ev = fleet.event([host], script, timeout_value=3)
    a = start(fleet, workers, tmp_path, "wa", "--lease", "2", **LEASE)
    job_id = enqueue(fleet.db, ev)[0]
    assert wait_until(lambda: (d / "first").exists() and job(fleet, job_id).status == "running", 60)
    return host, d, job_id, a


@ON_POSTGRESQL
def test_killed_worker_s_job_is_finished_by_another_once(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host, d, job_id, a = first_attempt_hangs(fleet, ssh_hosts, workers, tmp_path)
    a.proc.kill()                                   # SIGKILL mid-job
    start(fleet, workers, tmp_path, "wb", "--lease", "2", **LEASE)
    assert wait_until(lambda: all_done(fleet, [job_id]), 90)
    row = job(fleet, job_id)
    assert (row.status, row.orchestrator_id, row.attempts) == ("completed", "wb", 2)
    assert marks(d) == [f"{job_id} {host.name}"]
    assert [a["status"] for a in row.metadata_["attempts"]] == ["LOST", "SUCCESS"]
    with fleet.db.engine.connect() as conn:
        first = conn.execute(text("SELECT status, error FROM executions ORDER BY created_at")).first()
        log = conn.execute(text("SELECT status, output FROM logs")).one()
    assert first is not None and first.status == "failed" and "worker wa lost" in first.error
    assert log.status == "SUCCESS" and "worker wa lost" in log.output


HEARTBEAT = {"CRONIUM_FAB_HEARTBEAT": "0.5", "CRONIUM_FAB_HEARTBEAT_TIMEOUT": "2"}


@ON_POSTGRESQL
def test_frozen_worker_s_scripts_stop_and_the_job_runs_once_soon(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A worker frozen (SIGSTOP) while its scripts run: the runners stop them when its heartbeat
    stops, the job is re-queued soon after its lease (not after the event's 120 s timeout) and
    finished by another worker; the scripts mark at their END, so a script that survived the
    freeze would leave a second mark. Back (SIGCONT), the frozen worker records nothing."""
    hosts = ssh_hosts(2)
    d = tmp_path / "marks"
    d.mkdir()
    marker = f"cfab-frozen-{os.getpid()}-{id(tmp_path)}"
    ev = fleet.event(hosts, f'echo started; bash -c \'exec -a "{marker}" sleep 8\'; ' + MARK.format(d=d),
                     timeout_value=120)
    a = start(fleet, workers, tmp_path, "wa", "--lease", "2", **LEASE, **HEARTBEAT)
    job_id = enqueue(fleet.db, ev)[0]
    assert wait_until(lambda: len(procs_with(marker)) == 2, 60)
    a.proc.send_signal(signal.SIGSTOP)              # frozen mid-script, past its lease
    assert wait_until(lambda: procs_with(marker) == [], 30), "the frozen worker's scripts outlived its silence"
    b = start(fleet, workers, tmp_path, "wb", "--lease", "2", **LEASE)   # its run must not be cut off: defaults
    assert wait_until(lambda: all_done(fleet, [job_id]), 90), (   # the old rule waited 120 s + grace
        job(fleet, job_id).status, job(fleet, job_id).scheduled_for, b.text()[-3000:])
    a.proc.send_signal(signal.SIGCONT)              # back: it must stop, not record
    assert wait_until(lambda: "lost its lease" in a.text() or "lease lost" in a.text(), 20), a.text()
    row = job(fleet, job_id)
    assert (row.status, row.orchestrator_id, row.attempts) == ("completed", "wb", 2)
    assert marks(d) == sorted(f"{job_id} {h.name}" for h in hosts)   # once per host: attempt 2's
    assert [a["status"] for a in row.metadata_["attempts"]] == ["LOST", "SUCCESS"]
    with fleet.db.engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM logs")).scalar_one() == "SUCCESS"
        states = sorted(r.status for r in conn.execute(text("SELECT status FROM executions")))
    assert states == ["completed", "completed", "failed", "failed"]   # the lost attempt's rows, closed once
    for h in hosts:
        assert list(h.tmp_dir.glob("cronium-run-*")) == [], "a work dir was left on the host"


def test_cancel_in_cronium_stops_the_remote_script(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    marker = f"cfab-cancel-{os.getpid()}-{id(tmp_path)}"
    ev = fleet.event(hosts, f'echo started; exec -a "{marker}" sleep 120', timeout_value=300)
    start(fleet, workers, tmp_path, "w1")
    job_id = enqueue(fleet.db, ev)[0]
    assert wait_until(lambda: len(procs_with(marker)) == 2, 60)
    with fleet.db.engine.begin() as conn:          # as Cronium's UI writes a cancel
        conn.execute(text("UPDATE jobs SET status = 'cancelled', completed_at = CURRENT_TIMESTAMP WHERE id = :j"),
                     {"j": job_id})
    assert wait_until(lambda: procs_with(marker) == [], 5), "the remote scripts outlived the cancel"
    assert wait_until(lambda: _exec_states(fleet) == ["cancelled", "cancelled"], 30)
    with fleet.db.engine.connect() as conn:
        errors = [r.error for r in conn.execute(text("SELECT error FROM executions"))]
    assert all("cancelled in Cronium" in (e or "") for e in errors), errors
    assert job(fleet, job_id).status == "cancelled"


def _exec_states(fleet: Fleet) -> list[str]:
    with fleet.db.engine.connect() as conn:
        return sorted(r.status for r in conn.execute(text("SELECT status FROM executions")))


def test_retries_rerun_only_the_failed_host(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = ssh_hosts(2)
    d = tmp_path / "marks"
    d.mkdir()
    # host "flaky" fails its first run only
    script = (MARK.format(d=d) + f'; if [ "$CRONIUM_SERVER_NAME" = flaky ] && mkdir "{d}/failed-once" 2>/dev/null; '
              'then echo "disk not ready" >&2; exit 3; fi')
    ev = fleet.event([a, b], script, names=["steady", "flaky"])
    set_retries(fleet, ev, 2)
    start(fleet, workers, tmp_path, "w1")
    job_id = enqueue(fleet.db, ev)[0]
    assert wait_until(lambda: all_done(fleet, [job_id]), 90)
    row = job(fleet, job_id)
    assert (row.status, row.attempts) == ("completed", 2)
    assert [x.split()[1] for x in marks(d)].count("steady") == 1 and [x.split()[1] for x in marks(d)].count("flaky") == 2
    assert [(h["attempt"], h["status"], h["failed_hosts"]) for h in row.result["attempts"]] == [
        (1, "PARTIAL", ["flaky"]), (2, "SUCCESS", [])]
    with fleet.db.engine.connect() as conn:
        log = conn.execute(text("SELECT status, output, retries FROM logs")).one()
    assert log.status == "SUCCESS" and log.retries == 1 and "attempt 1 of 3: PARTIAL" in log.output


def test_priority_then_age_and_scheduled_for(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    d = tmp_path / "marks"
    d.mkdir()
    ev = fleet.event([host], f'date +%s.%N > "{d}/$CRONIUM_JOB_ID.at"')
    from datetime import timedelta

    from cronium_fab.db.models import utcnow

    low = enqueue(fleet.db, ev, priority=0)[0]
    normal = enqueue(fleet.db, ev)[0]
    high = enqueue(fleet.db, ev, priority=3)[0]
    later = enqueue(fleet.db, ev, priority=3, at=utcnow() + timedelta(seconds=6))[0]
    start(fleet, workers, tmp_path, "w1")
    assert wait_until(lambda: all_done(fleet, [low, normal, high, later]), 90)
    at = {j: float((d / f"{j}.at").read_text()) for j in (low, normal, high, later)}
    assert sorted((low, normal, high), key=at.__getitem__) == [high, normal, low]
    # `later` outranks them all, yet waits for its time (on a loaded machine the three may take longer
    # than its head start: then it may run among them, never before it is due)
    assert job(fleet, later).started_at >= job(fleet, later).scheduled_for   # type: ignore[operator]


def test_sigterm_drains_the_running_job_and_leaves_the_rest(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo started; sleep 2; echo finished")
    w = start(fleet, workers, tmp_path, "w1")
    first = enqueue(fleet.db, ev)[0]
    assert wait_until(lambda: job(fleet, first).status == "running", 60)
    second = enqueue(fleet.db, ev)[0]
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(60) == 0, w.text()
    assert job(fleet, first).status == "completed"
    row = job(fleet, second)
    assert (row.status, row.orchestrator_id) == ("queued", None)
    assert "draining" in w.text() and "stopped" in w.text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_takes_one_worker(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo hello")
    start(fleet, workers, tmp_path, "w1")
    job_id = enqueue(fleet.db, ev)[0]
    assert wait_until(lambda: all_done(fleet, [job_id]), 60)
    assert job(fleet, job_id).status == "completed"
    second = subprocess.run([sys.executable, "-m", "cronium_fab", "serve", "--worker-id", "w2"],
                            env=dict(fleet.env(), CRONIUM_FAB_WORKER="off"), capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert second.returncode == 2 and "PostgreSQL" in second.stderr and "one worker" in second.stderr


def test_other_job_types_and_local_events_are_never_claimed(fleet: Fleet, ssh_hosts, workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo remote")
    local = fleet.event([host], "echo local")
    with fleet.db.engine.begin() as conn:
        conn.execute(text("UPDATE events SET run_location = 'LOCAL' WHERE id = :e"), {"e": local})
        cast = "jsonb" if fleet.db.dialect == "postgresql" else "text"
        for jid, etype, e, payload in (   # as Cronium's app writes them
                ("job_httprequest1", "HTTP_REQUEST", ev, '{"input": {}, "httpRequest": {"method": "GET"}}'),
                ("job_toolaction01", "TOOL_ACTION", ev, '{"input": {}, "toolAction": {"toolType": "slack"}}'),
                ("job_localscript1", "SCRIPT", local, '{"input": {}, "script": {"type": "BASH", "content": "echo"}, '
                                                      '"target": {"containerImage": "cronium/bash:latest"}}')):
            conn.execute(text(f"INSERT INTO jobs (id, event_id, user_id, type, payload) "
                              f"VALUES (:j, :e, 'u1', :t, CAST(:p AS {cast}))"), {"j": jid, "e": e, "t": etype, "p": payload})
    with pytest.raises(ConfigError, match="runs LOCAL"):
        enqueue(fleet.db, local)
    remote_job = enqueue(fleet.db, ev)[0]
    start(fleet, workers, tmp_path, "w1")
    assert wait_until(lambda: all_done(fleet, [remote_job]), 60)
    for jid in ("job_httprequest1", "job_toolaction01", "job_localscript1"):
        row = job(fleet, jid)
        assert (row.status, row.orchestrator_id) == ("queued", None), jid


def test_enqueue_and_jobs_commands(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo hi")
    env = dict(fleet.env(), CRONIUM_FAB_WORKER="off")
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "enqueue", "--event", str(ev), "--input", '{"n": 1}',
                          "--priority", "2", "--at", "+60", "--json"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    row = job(fleet, doc["job_id"])
    assert (row.status, row.priority, row.payload["input"], row.payload["executionLogId"]) == ("queued", 2, {"n": 1},
                                                                                               doc["log_id"])
    assert row.metadata_ == {"eventName": "ev", "triggeredBy": "manual", "logId": doc["log_id"]}
    listed = subprocess.run([sys.executable, "-m", "cronium_fab", "jobs", "--json"], env=env, capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert [j["id"] for j in json.loads(listed.stdout)] == [doc["job_id"]]
    bad = subprocess.run([sys.executable, "-m", "cronium_fab", "enqueue", "--event", str(ev), "--at", "soonish"],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "ISO time" in bad.stderr
