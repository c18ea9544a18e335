"""Fleet run control on real sshd hosts, on every database flavour: batches (start times taken on
the hosts), the failure budget (skipped hosts, STOPPED), unreachable hosts counted apart, connect
retries against a host that resets the first connection, a job's payload.fleet, --output-dir."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from cronium_fab.db.models import Execution, Job, Log
from cronium_fab.execute import RunRequest, run_event
from cronium_fab.records import new_job_id
from cronium_fab.results import RunResult
from cronium_fab.testing.factories import add_event, add_server
from cronium_fab.testing.hosts import DevHost
from tests.run.conftest import Fleet, trust
from tests.tcpproxy import ResetProxy

pytestmark = pytest.mark.ssh

NAMES = [f"f{i:02}" for i in range(1, 13)]


def _run(fleet: Fleet, event_id: int, **kw: object) -> RunResult:
    settings = fleet.settings.with_(connect_retry_delay=0.05)
    return run_event(settings, RunRequest(event_id=event_id, **kw), out=None)  # type: ignore[arg-type]


def _fails_on(names: list[str], mark: str) -> str:
    """A script that leaves a marker in the host's home, prints its start and end time (taken on
    the host) and fails on the hosts named."""
    pattern = "|".join(names) or "none-of-them"
    return (f'touch "$HOME/{mark}-$CRONIUM_SERVER_NAME"; echo "start $(date +%s.%N)"; sleep 0.2; '
            f'echo "end $(date +%s.%N)"; case "$CRONIUM_SERVER_NAME" in {pattern}) exit 3;; esac; exit 0')


def _times(stdout: str) -> tuple[float, float]:
    values = dict(line.split() for line in stdout.splitlines())
    return float(values["start"]), float(values["end"])


def _ran(host: DevHost, mark: str, name: str) -> bool:
    return (host.home_dir / f"{mark}-{name}").exists()


def _refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_batches_start_one_after_another(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(12)
    mark = uuid.uuid4().hex[:8]
    ev = fleet.event(hosts, _fails_on([], mark), names=NAMES)
    result = _run(fleet, ev, batch="1,25%,100%")
    assert result.status == "SUCCESS" and result.batches == 3, [h.error for h in result.hosts]
    assert [h.batch for h in result.hosts] == [1, 2, 2, 2] + [3] * 8       # a canary, 25% of 12, the rest
    spans: dict[int, list[tuple[float, float]]] = {}
    for h in result.hosts:
        spans.setdefault(h.batch, []).append(_times(h.stdout))
    for b in (1, 2):   # every host of the next batch started after every host of this one ended
        assert max(end for _, end in spans[b]) <= min(start for start, _ in spans[b + 1]), spans
    with fleet.db.session() as s:
        rows = s.scalars(select(Execution)).all()
        assert sorted(e.metadata_["batch"] for e in rows) == [1, 2, 2, 2] + [3] * 8
        assert {e.execution_metadata["host_status"] for e in rows} == {"success"}
        job = s.scalars(select(Job)).one()
        assert job.payload["fleet"] == {"batch": [1, "25%", "100%"]}


def test_budget_stops_new_starts_and_the_rest_are_skipped(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(12)
    mark = uuid.uuid4().hex[:8]
    ev = fleet.event(hosts, _fails_on(["f03", "f04", "f09"], mark), names=NAMES)
    result = _run(fleet, ev, batch="2", max_failures="1")
    states = [h.status for h in result.hosts]
    assert states == ["success"] * 2 + ["failure"] * 2 + ["skipped"] * 8, [h.error for h in result.hosts]
    assert result.status == "STOPPED" and result.exit_code == 7
    reason = "2 hosts failed, more than --max-failures 1 allows"
    assert result.stopped == reason
    assert {h.error for h in result.hosts[4:]} == {f"not started: {reason}"}
    assert result.to_dict()["counts"] == {"failure": 2, "skipped": 8, "success": 2}
    for host, name in zip(hosts, NAMES, strict=True):   # a skipped host never ran anything
        assert _ran(host, mark, name) == (name in NAMES[:4]), name
    with fleet.db.session() as s:
        rows = {e.server_name: e for e in s.scalars(select(Execution))}
        assert [rows[n].status for n in NAMES] == ["completed"] * 2 + ["failed"] * 2 + ["skipped"] * 8
        skipped = rows["f12"]
        assert skipped.started_at is None and skipped.completed_at is not None and skipped.error == f"not started: {reason}"
        assert skipped.execution_metadata["host_status"] == "skipped"
        log = s.scalars(select(Log)).one()
        assert log.status == "FAILURE" and log.successful is False
        assert (log.error or "").startswith(f"stopped: {reason}; f03: ")
        assert "8 skipped (never started): f05, f06" in (log.error or "")
        job = s.scalars(select(Job)).one()
        assert job.status == "failed" and job.result["status"] == "STOPPED" and job.result["stopped"] == reason
        assert job.payload["fleet"] == {"batch": [2], "maxFailures": 1}


def test_fail_fast_one_at_a_time_and_unreachable_hosts_count_apart(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(4)
    mark = uuid.uuid4().hex[:8]
    gone = [add_server(fleet.db, f"gone{i}", address="127.0.0.1", port=_refused_port(), username=hosts[0].user,
                       ssh_key=hosts[0].private_key_text) for i in range(3)]
    live = [fleet.add(h, n) for h, n in zip(hosts, ["a1", "a2", "a3", "a4"], strict=True)]
    ev = add_event(fleet.db, content=_fails_on(["a2"], mark), servers=gone + live)
    # three unreachable hosts first: they do not touch the script failure budget (--fail-fast)
    result = _run(fleet, ev, fail_fast=True, parallel=1, connect_retries=0)
    assert [h.status for h in result.hosts] == ["unreachable"] * 3 + ["success", "failure", "skipped", "skipped"]
    assert result.status == "STOPPED"
    assert result.stopped == "1 host failed, more than --fail-fast (--max-failures 0) allows"
    assert [h.connect_attempts for h in result.hosts] == [1, 1, 1, 1, 1, 0, 0]
    # the unreachable budget is its own: more than 1 unreachable host stops the run
    result = _run(fleet, ev, max_unreachable="1", max_failures="5", parallel=1, connect_retries=0)
    assert [h.status for h in result.hosts] == ["unreachable"] * 2 + ["skipped"] * 5
    assert result.stopped == "2 hosts were unreachable, more than --max-unreachable 1 allows"
    # no budget for unreachable hosts: they never stop a run
    result = _run(fleet, ev, max_failures="1", parallel=2, connect_retries=0)
    assert [h.status for h in result.hosts] == ["unreachable"] * 3 + ["success", "failure", "success", "success"]
    assert result.status == "PARTIAL" and result.stopped is None


def test_connect_retry_succeeds_against_a_host_that_resets_the_first_connection(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    with ResetProxy((host.address, host.port), reset_first=1) as proxy:
        trust(fleet.settings, host, proxy.address, proxy.port)
        sid = add_server(fleet.db, "flaky", address=proxy.address, port=proxy.port, username=host.user,
                         ssh_key=host.private_key_text)
        ev = add_event(fleet.db, content="echo through", servers=[sid])
        result = _run(fleet, ev)
        h = result.hosts[0]
        assert result.status == "SUCCESS", h.error
        assert h.stdout == "through\n" and h.connect_attempts == 2 and proxy.accepted == 2
    with fleet.db.session() as s:
        assert s.scalars(select(Execution)).one().execution_metadata["connect_attempts"] == 2


def test_connect_retries_are_bounded_and_never_retry_auth_or_host_key_failures(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    from cronium_fab.testing.hosts import generate_keypair

    (host,) = ssh_hosts(1)
    with ResetProxy((host.address, host.port), reset_first=-1) as always, \
            ResetProxy((host.address, host.port), reset_first=0) as wrong_key, \
            ResetProxy((host.address, host.port), reset_first=0) as other_key:
        trust(fleet.settings, host, wrong_key.address, wrong_key.port)
        trust(fleet.settings, host, always.address, always.port)
        fleet.settings.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(fleet.settings.known_hosts, "a") as f:    # a different key recorded for this one
            f.write(f"[{other_key.address}]:{other_key.port} {generate_keypair()[1]}\n")
        ids = [add_server(fleet.db, "resets", address=always.address, port=always.port, username=host.user,
                          ssh_key=host.private_key_text),
               add_server(fleet.db, "refuses-us", address=wrong_key.address, port=wrong_key.port,
                          username=host.user, ssh_key=generate_keypair()[0]),
               add_server(fleet.db, "changed", address=other_key.address, port=other_key.port, username=host.user,
                          ssh_key=host.private_key_text)]
        ev = add_event(fleet.db, content="echo never", servers=ids)
        result = _run(fleet, ev, connect_retries=2)
        resets, refused, changed = result.hosts
        assert resets.status == "unreachable" and resets.error_kind == "connection-reset"
        assert resets.connect_attempts == 3 and always.accepted == 3 and "(after 3 attempts)" in (resets.error or "")
        assert refused.error_kind == "auth-refused" and refused.connect_attempts == 1 and wrong_key.accepted == 1
        assert changed.error_kind == "host-key-changed" and changed.connect_attempts == 1 and other_key.accepted == 1


def test_a_jobs_payload_fleet_controls_the_run(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(3)
    mark = uuid.uuid4().hex[:8]
    ev = fleet.event(hosts, _fails_on(["j1"], mark), names=["j1", "j2", "j3"])
    job_id = new_job_id()
    with fleet.db.session() as s:
        s.add(Job(id=job_id, event_id=ev, user_id="u1", type="SCRIPT", status="claimed",
                  payload={"input": {}, "fleet": {"batch": [1, "100%"], "failFast": True}}))
    result = _run(fleet, ev, job_id=job_id)
    assert [h.status for h in result.hosts] == ["failure", "skipped", "skipped"]
    assert result.status == "STOPPED" and result.batches == 2
    assert not _ran(hosts[1], mark, "j2")
    # a field of the run itself wins over the job's
    job2 = new_job_id()
    with fleet.db.session() as s:
        s.add(Job(id=job2, event_id=ev, user_id="u1", type="SCRIPT", status="claimed",
                  payload={"input": {}, "fleet": {"batch": [1, "100%"], "failFast": True}}))
    result = _run(fleet, ev, job_id=job2, max_failures="1")
    assert [h.status for h in result.hosts] == ["failure", "success", "success"] and result.status == "PARTIAL"


def test_output_dir_keeps_each_hosts_full_output(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, 'head -c 5000 /dev/zero | tr "\\0" x; echo; echo "err of $CRONIUM_SERVER_NAME" >&2',
                     names=["o1", "o1"])    # the same name twice: two files all the same
    out = tmp_path / "outs" / "run1"
    result = _run(fleet, ev, output_dir=str(out), output_cap=1000)
    assert result.status == "SUCCESS"
    assert "truncated" in result.hosts[0].stdout               # the record keeps the last 1000 bytes...
    assert sorted(p.name for p in out.iterdir()) == ["o1-2.stderr", "o1-2.stdout", "o1.stderr", "o1.stdout"]
    assert (out / "o1.stdout").read_text() == "x" * 5000 + "\n"   # ... the file all of it
    assert (out / "o1.stderr").read_text() == "err of o1\n"
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "o1.stdout").stat().st_mode & 0o777 == 0o600


def test_bad_control_input_is_refused_and_writes_no_row(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo never")
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    job_id = new_job_id()
    with fleet.db.session() as s:
        s.add(Job(id=job_id, event_id=ev, user_id="u1", type="SCRIPT", status="claimed",
                  payload={"input": {}, "fleet": {"maxFailures": "some"}}))
    cases = [
        (["--batch", "0"], "--batch (each batch size) needs a whole number of hosts"),
        (["--max-failures", "110%"], "--max-failures needs"),
        (["--fail-fast", "--max-failures", "2"], "--fail-fast means a max-failures of 0"),
        (["--output-dir", str(a_file)], "exists and is not a directory"),
        (["--job", job_id], f"job {job_id}: payload.fleet.maxFailures needs"),
    ]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(ev), "--json", *args],
                             env=dict(fleet.env(), CRONIUM_FAB_WORKER="off"), capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        doc = json.loads(out.stdout)
        assert doc["status"] == "ERROR" and message in doc["error"], (args, doc)
    with fleet.db.session() as s:
        assert s.scalars(select(Log)).all() == [] and s.scalars(select(Execution)).all() == []
        assert [j.id for j in s.scalars(select(Job))] == [job_id]     # only the job the test made, untouched
        assert s.get(Job, job_id).status == "claimed"  # type: ignore[union-attr]
