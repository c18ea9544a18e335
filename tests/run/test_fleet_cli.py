"""The fleet commands as a person and a program use them, on real sshd hosts and every database
flavour: rerun touches exactly the hosts that did not succeed, runs/show (text and --json), the
live status line under a real pseudo-terminal and plain lines on a pipe, --plan runs nothing."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select

from cronium_fab.db.models import Execution, Job, Log, RunnerPayload
from cronium_fab.execute import NothingToRerun, RunRequest, rerun_request, run_event
from tests.run.conftest import ROOT, Fleet

pytestmark = pytest.mark.ssh


def cli(fleet: Fleet, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cronium_fab", *args], env=dict(fleet.env(), CRONIUM_FAB_WORKER="off"),
                          capture_output=True, text=True, cwd=cwd, timeout=180)


def _flaky_script(mark: str) -> str:
    """Counts its runs in the host's home; fails while the host has a `broken` file."""
    return (f'echo run >> "$HOME/{mark}-runs"; if [ -e "$HOME/{mark}-broken" ]; then echo "broken here" >&2; '
            f'exit 4; fi; echo "all good"')


def _runs_on(host, mark: str) -> int:  # type: ignore[no-untyped-def]
    path = host.home_dir / f"{mark}-runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _rows(fleet: Fleet) -> tuple[int, int, int]:
    with fleet.db.session() as s:
        return tuple(s.scalar(sql_select(func.count()).select_from(t)) or 0 for t in (Job, Log, Execution))  # type: ignore[return-value]


def test_rerun_touches_exactly_the_hosts_that_did_not_succeed(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(12)
    mark = uuid.uuid4().hex[:8]
    names = [f"r{i:02}" for i in range(1, 13)]
    ev = fleet.event(hosts, _flaky_script(mark), names=names)
    broken = {2, 6, 10}
    for i in broken:
        (hosts[i].home_dir / f"{mark}-broken").write_text("")
    first = run_event(fleet.settings, RunRequest(event_id=ev, input={"n": 1}), out=None)
    assert first.status == "PARTIAL"
    failed = [names[i] for i in sorted(broken)]
    assert [h.name for h in first.hosts if h.status != "success"] == failed
    assert cli(fleet, "rerun", str(first.log_id), "--only", "unreachable").returncode == 2   # none unreachable
    for i in broken:
        (hosts[i].home_dir / f"{mark}-broken").unlink()
    before = _rows(fleet)
    out = cli(fleet, "rerun", str(first.log_id), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [h["name"] for h in doc["hosts"]] == failed and doc["status"] == "SUCCESS"
    assert doc["rerun_of"] == first.log_id
    assert [_runs_on(h, mark) for h in hosts] == [2 if i in broken else 1 for i in range(12)]
    assert _rows(fleet) == (before[0] + 1, before[1] + 1, before[2] + 3)
    with fleet.db.session() as s:
        job = s.get(Job, doc["job_id"])
        assert job is not None and job.metadata_["rerunOf"] == first.log_id
        assert job.payload["input"] == {"n": 1}                     # the rerun ran with that run's input
    # nothing left to rerun: a clear error, no row
    with pytest.raises(NothingToRerun, match=f"run {doc['log_id']} has no host that ended"):
        run_event(fleet.settings, rerun_request(fleet.db, doc["log_id"]), out=None)
    assert _rows(fleet) == (before[0] + 1, before[1] + 1, before[2] + 3)


def test_rerun_only_failed_or_unreachable(fleet: Fleet, ssh_hosts, ssh_pool) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(3, exclusive=True)
    mark = uuid.uuid4().hex[:8]
    ev = fleet.event(hosts, _flaky_script(mark), names=["u1", "u2", "u3"])
    (hosts[0].home_dir / f"{mark}-broken").write_text("")
    ssh_pool.kill(hosts[1])
    first = run_event(fleet.settings.with_(connect_retry_delay=0.05), RunRequest(event_id=ev), out=None)
    assert [h.status for h in first.hosts] == ["failure", "unreachable", "success"]
    ssh_pool.restart(hosts[1])
    only_unreachable = run_event(fleet.settings, rerun_request(fleet.db, first.log_id, rerun_only="unreachable"),
                                 out=None)
    assert [(h.name, h.status) for h in only_unreachable.hosts] == [("u2", "success")]
    only_failed = run_event(fleet.settings, rerun_request(fleet.db, first.log_id, rerun_only="failed"), out=None)
    assert [(h.name, h.status) for h in only_failed.hosts] == [("u1", "failure")]
    assert [_runs_on(h, mark) for h in hosts] == [2, 1, 1]


def test_runs_and_show(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(4)
    mark = uuid.uuid4().hex[:8]
    ev = fleet.event(hosts, _flaky_script(mark), names=["s1", "s2", "s3", "s4"])
    other = fleet.event(hosts[:1], "echo other", names=["s5"])
    (hosts[1].home_dir / f"{mark}-broken").write_text("")
    stopped = run_event(fleet.settings, RunRequest(event_id=ev, batch="1", max_failures="0"), out=None)
    assert [h.status for h in stopped.hosts] == ["success", "failure", "skipped", "skipped"]
    ok = run_event(fleet.settings, RunRequest(event_id=other), out=None)

    out = cli(fleet, "runs", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)["runs"]
    assert [r["log_id"] for r in listed] == [ok.log_id, stopped.log_id]         # newest first
    assert listed[1]["status"] == "STOPPED" and listed[1]["log_status"] == "FAILURE"
    assert listed[1]["counts"] == {"failure": 1, "skipped": 2, "success": 1} and listed[1]["host_count"] == 4
    assert listed[0]["status"] == "SUCCESS" and listed[0]["counts"] == {"success": 1}
    only = json.loads(cli(fleet, "runs", "--event", str(ev), "--json").stdout)["runs"]
    assert [r["log_id"] for r in only] == [stopped.log_id]
    text = cli(fleet, "runs").stdout.splitlines()
    assert text[0].split() == ["LOG", "STARTED", "(UTC)", "STATUS", "EVENT", "HOSTS"]
    assert text[2].split()[0] == str(stopped.log_id) and "STOPPED" in text[2]
    assert "4: 1 failure, 2 skipped, 1 success" in text[2]

    shown = json.loads(cli(fleet, "show", str(stopped.log_id), "--json").stdout)
    assert shown["status"] == "STOPPED" and shown["error"].startswith("stopped: 1 host failed")
    assert [(h["name"], h["status"], h["exit_code"], h["batch"]) for h in shown["hosts"]] == [
        ("s1", "success", 0, 1), ("s2", "failure", 4, 2), ("s3", "skipped", None, 3), ("s4", "skipped", None, 4)]
    assert shown["hosts"][1]["output"] == "--- stderr ---\nbroken here\n" or "broken here" in shown["hosts"][1]["output"]
    text = cli(fleet, "show", str(stopped.log_id)).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"run {stopped.log_id}: event {ev} (ev) · STOPPED (logs.status FAILURE)")
    assert lines[1] == "4 hosts: 1 failure, 2 skipped, 1 success"
    table = lines.index(next(line for line in lines if line.startswith("HOST")))
    assert [row.split()[0] for row in lines[table + 1: table + 5]] == ["s2", "s3", "s4", "s1"]   # failures first
    assert "--- s2 (failure):" in lines and "--- s1 (success):" in lines and "all good" in lines
    one = json.loads(cli(fleet, "show", str(stopped.log_id), "--host", "s2", "--json").stdout)
    assert [h["name"] for h in one["hosts"]] == ["s2"] and one["host_count"] == 4
    missing = cli(fleet, "show", str(stopped.log_id), "--host", "nope")
    assert missing.returncode == 2 and "has no host 'nope'; its hosts: s1, s2, s3, s4" in missing.stderr
    gone = cli(fleet, "show", "999999", "--json")
    assert gone.returncode == 2 and json.loads(gone.stdout)["status"] == "ERROR"


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:      # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_status_line_on_a_terminal_and_plain_lines_on_a_pipe(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(3)
    ev = fleet.event(hosts, 'echo "line from $CRONIUM_SERVER_NAME"', names=["t1", "t2", "t3"])
    argv = [sys.executable, "-m", "cronium_fab", "run-event", "--id", str(ev)]
    env = dict(fleet.env(), CRONIUM_FAB_WORKER="off", TERM="xterm-256color")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    try:
        raw = _read_all(master)
    finally:
        os.close(master)
        proc.wait(timeout=120)
    assert proc.returncode == 0, raw.decode(errors="replace")
    screen = raw.decode(errors="replace")
    assert "\x1b[" in screen                                            # rich drew and erased the status line
    import re

    assert re.search(r"done \d/3 · running \d · failed 0 · left \d · 0:\d\d", screen), screen
    assert "line from t1" in screen and "SUCCESS: 3/3 hosts succeeded" in screen

    piped = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b[" not in piped.stderr and "running" not in piped.stderr and "left " not in piped.stderr
    assert "t1 | line from t1" in piped.stderr and "SUCCESS: 3/3 hosts succeeded" in piped.stderr
    # --json on a terminal: no status line either (stdout is the document)
    master, slave = os.openpty()
    proc = subprocess.Popen([*argv, "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=env, cwd=ROOT)
    os.close(slave)
    try:
        err = _read_all(master).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.stdout is not None
    doc = json.loads(proc.stdout.read())
    proc.wait(timeout=120)
    assert doc["status"] == "SUCCESS" and "\x1b[" not in err and "left " not in err


def test_plan_checks_every_host_and_runs_nothing(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ready = ssh_hosts(2)
    (no_python,) = ssh_hosts(1, python3="")
    (stranger,) = ssh_hosts(1, key_type="ecdsa")
    ready[0].clear_runner_cache()
    mark = uuid.uuid4().hex[:8]
    script = f'touch "$HOME/{mark}-ran"'
    ids = [fleet.add(h, n) for h, n in zip([*ready, no_python], ["p1", "p2", "p3"], strict=True)]
    ids.append(fleet.add(stranger, "p4", trusted=False))
    from cronium_fab.testing.factories import add_event

    ev = add_event(fleet.db, content=script, servers=ids)
    run_event(fleet.settings, RunRequest(event_id=ev, hosts=["p2"]), out=None)   # p2 has the runner cached
    known_hosts = fleet.settings.known_hosts.read_text()
    before = _rows(fleet)
    (ready[1].home_dir / f"{mark}-ran").unlink()

    out = cli(fleet, "run-event", "--id", str(ev), "--plan", "--json", "--batch", "1,100%",
              "--output-dir", str(tmp_path / "never"), cwd=tmp_path)
    assert out.returncode == 3, out.stderr            # PARTIAL: some hosts would run
    doc = json.loads(out.stdout)
    assert doc["plan"] is True and doc["status"] == "PARTIAL" and doc["batches"] == [["p1"], ["p2", "p3", "p4"]]
    hosts = {h["name"]: h for h in doc["hosts"]}
    assert hosts["p1"]["ready"] and hosts["p1"]["runner"] == "install" and hosts["p1"]["host_key"] == "known"
    assert hosts["p1"]["python"].count(".") == 2
    assert hosts["p2"]["ready"] and hosts["p2"]["runner"] == "cached"
    assert not hosts["p3"]["ready"] and hosts["p3"]["error_kind"] == "python-missing"
    assert not hosts["p4"]["ready"] and hosts["p4"]["host_key"] == "unknown" and hosts["p4"]["reachable"]
    assert "READY" not in out.stderr.splitlines()[-1] and "2/4 hosts would run the script (nothing was run)" in out.stderr
    # accept-new: the unknown key would be recorded by a run, the plan only looks
    out = cli(fleet, "run-event", "--id", str(ev), "--plan", "--host-key-policy", "accept-new", "--hosts", "p4",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "READY: 1/1 hosts would run the script (nothing was run)" in out.stderr
    assert "is not known yet: the run records it (accept-new)" in out.stderr
    # nothing ran, nothing was written or installed, anywhere
    for h in [*ready, no_python, stranger]:
        assert not (h.home_dir / f"{mark}-ran").exists(), h.name
    assert not ready[0].runner_cache_dir.exists() or not any(ready[0].runner_cache_dir.glob("runner-*"))
    assert fleet.settings.known_hosts.read_text() == known_hosts
    assert _rows(fleet) == before and not (tmp_path / "never").exists()
    with fleet.db.session() as s:
        assert s.scalar(sql_select(func.count()).select_from(RunnerPayload)) == 1


def test_hosts_at_once_fit_the_open_files_limit(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    """Under a low open files limit the run takes fewer hosts at once, says so, and every host
    still succeeds (instead of hosts failing with "Too many open files")."""
    import resource

    hosts = ssh_hosts(4)
    ev = fleet.event(hosts, "echo ok")

    def low_limit() -> None:   # 64 reserved + 6 per host: room for 2 hosts at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (64 + 2 * 6 + 5, 64 + 2 * 6 + 5))

    r = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(ev), "--parallel", "4"],
                       env=dict(fleet.env(), CRONIUM_FAB_WORKER="off"), capture_output=True, text=True, cwd=ROOT,
                       timeout=180, preexec_fn=low_limit)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 hosts at once, not 4" in r.stderr
    assert "SUCCESS: 4/4 hosts succeeded" in r.stderr
