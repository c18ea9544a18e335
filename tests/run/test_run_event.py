"""run-event end to end: real sshd hosts, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cronium_fab.db.models import Event, Execution, Job, Log, RunnerDeployment, UserVariable
from cronium_fab.execute import RunRequest, run_event
from cronium_fab.records import new_job_id
from cronium_fab.testing.procs import procs_with, watch_argv
from tests.run.conftest import ROOT, Fleet, assert_ctrl_c_cancels

pytestmark = pytest.mark.ssh


def _run(fleet: Fleet, event_id: int, **kw: object):  # type: ignore[no-untyped-def]
    return run_event(fleet.settings, RunRequest(event_id=event_id, **kw), out=None)  # type: ignore[arg-type]


def test_cold_then_warm_run_sends_runner_once(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    for h in hosts:
        h.clear_runner_cache()
    ev = fleet.event(hosts, 'echo "hi from $CRONIUM_SERVER_NAME"')
    cold = _run(fleet, ev)
    assert cold.status == "SUCCESS"
    assert [h.runner_cached for h in cold.hosts] == [False, False]
    warm = _run(fleet, ev)
    assert [h.runner_cached for h in warm.hosts] == [True, True]
    assert [h.stdout for h in warm.hosts] == [f"hi from {h.name}\n" for h in hosts]
    with fleet.db.session() as s:
        deps = s.scalars(select(RunnerDeployment)).all()
        assert len(deps) == 2 and {d.status for d in deps} == {"active"}
        assert all(d.last_used is not None for d in deps)


def test_tampered_cached_runner_is_replaced(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo ok")
    _run(fleet, ev)
    cached = next(host.runner_cache_dir.glob("runner-*.pyz"))
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x01
    cached.write_bytes(bytes(data))
    result = _run(fleet, ev)
    assert result.status == "SUCCESS" and result.hosts[0].runner_cached is False
    import hashlib

    assert hashlib.sha256(cached.read_bytes()).hexdigest() in cached.name


def test_one_host_down_gives_partial(fleet: Fleet, ssh_hosts, ssh_pool) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(3, exclusive=True)
    ev = fleet.event(hosts, "echo up")
    ssh_pool.kill(hosts[1])
    result = _run(fleet, ev)
    assert result.status == "PARTIAL" and result.exit_code == 3
    assert [h.status for h in result.hosts] == ["success", "unreachable", "success"]
    assert "refused" in (result.hosts[1].error or "")
    with fleet.db.session() as s:
        rows = {e.server_name: e for e in s.scalars(select(Execution))}
        assert rows[hosts[1].name].status == "failed" and rows[hosts[0].name].status == "completed"
        log = s.scalars(select(Log)).one()
        assert log.status == "PARTIAL" and log.successful is False


def test_auth_refused(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    from cronium_fab.testing.hosts import generate_keypair

    (host,) = ssh_hosts(1)
    wrong_key, _ = generate_keypair()
    sid = fleet.add(host, ssh_key=wrong_key)
    from cronium_fab.testing.factories import add_event

    ev = add_event(fleet.db, servers=[sid])
    result = _run(fleet, ev)
    assert result.status == "FAILURE" and result.hosts[0].status == "unreachable"
    assert result.hosts[0].error_kind == "auth-refused"


def test_changed_host_key_is_refused(fleet: Fleet, ssh_hosts, ssh_pool) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1, exclusive=True)
    ev = fleet.event([host], "echo should-not-run")
    ssh_pool.regenerate_host_key(host)
    result = _run(fleet, ev)
    h = result.hosts[0]
    assert h.status == "unreachable" and h.error_kind == "host-key-changed"
    assert "SHA256:" in (h.error or "") and h.stdout == ""


def test_python3_missing_is_a_clear_reason(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1, python3="")
    ev = fleet.event([host], "echo x")
    h = _run(fleet, ev).hosts[0]
    assert h.status == "failure" and h.error_kind == "python-missing"
    assert "python3" in (h.error or "")


def test_exit_codes_pass_through_per_host(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    script = 'if [ "$CRONIUM_SERVER_NAME" = "first" ]; then exit 42; fi; exit 0'
    ev = fleet.event(hosts, script, names=["first", "second"])
    result = _run(fleet, ev)
    assert [(h.name, h.status, h.exit_code) for h in result.hosts] == [("first", "failure", 42), ("second", "success", 0)]
    assert result.status == "PARTIAL"
    with fleet.db.session() as s:
        assert {e.server_name: e.exit_code for e in s.scalars(select(Execution))} == {"first": 42, "second": 0}


def test_timeout_kills_the_remote_tree(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    marker = f"cfab-timeout-{os.getpid()}-{time.monotonic_ns()}"
    script = f'(exec -a "{marker}" sleep 300) & setsid sh -c \'trap "" TERM; exec -a "{marker}" sleep 301\' & wait'
    ev = fleet.event([host], script, timeout_value=2)
    result = _run(fleet, ev)
    assert result.status == "TIMEOUT" and result.exit_code == 4
    assert result.hosts[0].status == "timeout"
    deadline = time.monotonic() + 10
    while procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs_with(marker) == []


def test_variables_set_on_hosts_are_stored(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    script = (
        "import json\n"
        "n = cronium.getVariable('counter') or 0\n"
        "cronium.setVariable('seen_' + cronium.event()['serverName'], {'n': n, 'ok': True})\n"
        "cronium.output({'n': n})\n"
    )
    ev = fleet.event(hosts, script, type="PYTHON", names=["va", "vb"])
    with fleet.db.session() as s:
        s.add(UserVariable(user_id="u1", key="counter", value="7"))
    result = _run(fleet, ev)
    assert result.status == "SUCCESS", [h.error or h.stderr for h in result.hosts]
    assert [h.output for h in result.hosts] == [{"n": 7}, {"n": 7}]
    with fleet.db.session() as s:
        stored = {v.key: v.value for v in s.scalars(select(UserVariable))}
        event = s.get(Event, ev)
        assert event is not None and event.execution_count == 1 and event.success_count == 1
    assert json.loads(stored["seen_va"]) == {"n": 7, "ok": True} and "seen_vb" in stored


def test_job_option_updates_cronium_job_and_log(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "print(cronium.input())\ncronium.output(cronium.input())", type="PYTHON")
    job_id = new_job_id()
    with fleet.db.session() as s:
        s.add(Job(id=job_id, event_id=ev, user_id="u1", type="SCRIPT", status="claimed",
                  payload={"input": {"answer": 42}, "script": {"type": "PYTHON"}}))
        s.flush()
        log = Log(event_id=ev, job_id=job_id, status="PENDING", user_id="u1")
        s.add(log)
        s.flush()
        s.get(Job, job_id).payload = {"input": {"answer": 42}, "executionLogId": log.id}  # type: ignore[union-attr]
        log_id = log.id
    result = _run(fleet, ev, job_id=job_id)
    assert result.job_id == job_id and result.log_id == log_id
    assert result.hosts[0].output == {"answer": 42}
    with fleet.db.session() as s:
        job = s.get(Job, job_id)
        log = s.get(Log, log_id)
        assert job is not None and job.status == "completed" and job.result["status"] == "SUCCESS"
        assert log is not None and log.status == "SUCCESS" and "answer" in (log.output or "")
        assert s.scalars(select(Log)).all() == [log]
        assert s.scalars(select(Execution)).one().job_id == job_id


def test_secrets_never_in_remote_argv_json_or_logs(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    secret = f"s3cr3t-{time.monotonic_ns()}"
    ev = fleet.event([host], 'test "$API_TOKEN" = "${API_TOKEN}" && sleep 1.5 && echo done',
                     env={"API_TOKEN": secret})
    with watch_argv(secret, "OPENSSH PRIVATE KEY") as seen:
        result = _run(fleet, ev)
    assert result.status == "SUCCESS" and result.hosts[0].stdout == "done\n"
    assert seen == []
    assert secret not in json.dumps(result.to_dict())
    with fleet.db.session() as s:
        for row in s.scalars(select(Log)):
            assert secret not in (row.output or "") and secret not in (row.error or "")
        for e in s.scalars(select(Execution)):
            assert secret not in json.dumps([e.output, e.error, e.execution_metadata, e.metadata_])


def test_cli_json_and_exit_status(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo out; echo err >&2; exit 3")
    out = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(ev), "--json"],
                         env=fleet.env(), capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    h = doc["hosts"][0]
    assert doc["status"] == "FAILURE" and h["exit_code"] == 3 and h["stdout"] == "out\n" and h["stderr"] == "err\n"
    for key in ("server_id", "name", "host", "status", "output", "variables", "condition", "helper_mode",
                "runner_cached", "duration_ms", "error"):
        assert key in h
    assert f"{host.name} | out" in out.stderr and "HOST" in out.stderr


def test_fab_dash_h_runs_once_across_hosts_in_parallel(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    script = "import time\nstart = time.time()\ntime.sleep(1.0)\ncronium.output({'start': start, 'end': time.time()})"
    ev = fleet.event(hosts, script, type="PYTHON")
    out = subprocess.run([str(Path(sys.executable).parent / "fab"), "-H", ",".join(h.name for h in hosts),
                          "run-event", "--id", str(ev), "--json"],
                         env=fleet.env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(docs) == 1, "run-event must run once for all -H hosts, not once per host"
    spans = [(h["output"]["start"], h["output"]["end"]) for h in docs[0]["hosts"]]
    assert len(spans) == 2
    assert max(s for s, _ in spans) < min(e for _, e in spans), "both hosts must start before either ends"


def test_ctrl_c_cancels_remote_script_and_records_cancelled(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    assert_ctrl_c_cancels(fleet, host, [sys.executable, "-m", "cronium_fab"], dict(fleet.env(), CRONIUM_FAB_WORKER="off"),
                          tmp_path)


def test_tampered_local_runner_is_refused_before_anything_is_written(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from cronium_fab.signing import SignatureInvalid

    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo never")
    bad = tmp_path / "dist" / "cronium-runner.pyz"
    bad.parent.mkdir()
    shutil.copy(fleet.settings.runner_path, bad)
    shutil.copy(str(fleet.settings.runner_path) + ".sig", str(bad) + ".sig")
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(SignatureInvalid, match="cronium-runner.pyz"):
        run_event(fleet.settings.with_(runner_path=bad), RunRequest(event_id=ev), out=None)
    with fleet.db.session() as s:
        assert s.scalars(select(Job)).all() == [] and s.scalars(select(Execution)).all() == []


def test_nul_bytes_and_long_variable_keys_never_lose_the_record(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    long_key = "k" * 300
    script = (f"printf 'a\\0b\\n'; cronium_set_variable {long_key} v; cronium_set_variable ok yes; "
              "echo '{\"s\": \"x\\u0000y\"}' | cronium.output")
    ev = fleet.event([host], script)
    result = _run(fleet, ev)
    h = result.hosts[0]
    assert result.status == "SUCCESS" and h.stdout.startswith("a") and h.output == {"s": "x\x00y"}
    with fleet.db.session() as s:
        row = s.scalars(select(Execution)).one()
        assert row.status == "completed" and "\x00" not in (row.output or "")
        assert row.execution_metadata["refused_variables"]
        assert s.scalars(select(UserVariable.value).where(UserVariable.key == "ok")).one() == "yes"
        assert s.scalars(select(Log)).one().status == "SUCCESS"


def test_the_same_server_named_twice_runs_once(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    sid = fleet.add(host, "twice")
    from cronium_fab.testing.factories import add_event

    ev = add_event(fleet.db, content="echo once", servers=[sid])
    result = _run(fleet, ev, hosts=["twice", host.address, "twice"])
    assert [h.name for h in result.hosts] == ["twice"] and result.status == "SUCCESS"


def test_runner_in_a_loose_cache_dir_is_not_trusted(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo ok")
    _run(fleet, ev)
    host.runner_cache_dir.chmod(0o777)  # anyone could swap the runner after the digest check
    result = _run(fleet, ev)
    assert result.status == "SUCCESS" and result.hosts[0].runner_cached is False
    assert host.runner_cache_dir.stat().st_mode & 0o777 == 0o700


def test_rows_show_running_hosts_and_hosts_waiting_their_turn(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    """With --parallel 2 and 3 hosts, during the run: 2 rows `running`, 1 `queued`; then all completed."""
    import threading

    hosts = ssh_hosts(3)
    ev = fleet.event(hosts, "sleep 2")
    done = threading.Event()
    results = []
    t = threading.Thread(target=lambda: (results.append(_run(fleet, ev, parallel=2)), done.set()))
    t.start()
    seen: set[tuple[str, ...]] = set()
    while not done.is_set():
        with fleet.db.session() as s:
            seen.add(tuple(sorted(e.status for e in s.scalars(select(Execution)))))
        time.sleep(0.05)
    t.join(60)
    assert results and results[0].status == "SUCCESS"
    assert ("queued", "running", "running") in seen, seen
    with fleet.db.session() as s:
        rows = s.scalars(select(Execution)).all()
        assert [e.status for e in rows] == ["completed"] * 3
        assert all(e.started_at is not None and e.setup_started_at is not None for e in rows)


def test_a_flood_is_capped_once_with_one_marker(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo last-line")
    result = _run(fleet, ev, output_cap=1024 * 1024)
    out = result.hosts[0].stdout
    assert result.status == "SUCCESS"
    assert out.count("dropped by output_cap") == 1 and "bytes truncated" not in out
    assert out.startswith("x") and out.rstrip().endswith("last-line")
    assert len(out.encode()) < 1024 * 1024 + 200
