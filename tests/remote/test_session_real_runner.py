"""run_on_host with the real runner (built from runner/) on real sshd hosts."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cronium_fab.build import RunnerArtifact, build_runner
from cronium_fab.payloads import build_payload_content
from cronium_fab.remote.session import Heartbeat, HostRun, run_on_host
from cronium_fab.testing.procs import session_processes

pytestmark = pytest.mark.ssh

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def real_runner(tmp_path_factory: pytest.TempPathFactory) -> RunnerArtifact:
    return build_runner(ROOT / "runner", tmp_path_factory.mktemp("dist"))


class Lines:
    def __init__(self) -> None:
        self.out: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.first = threading.Event()

    def __call__(self, stream: str, ts: float, data: bytes) -> None:
        self.out[stream] += data
        self.first.set()


def run_script(conn, runner: RunnerArtifact, script: str, *, cancel: threading.Event | None = None,
               lines: Lines | None = None, heartbeat: Heartbeat | None = None, **header: object) -> HostRun:
    content = build_payload_content(7, "BASH", script)
    hdr = {"job_id": "job-1", "execution_id": "exec-1", "event_id": 7, "helper_mode": "bundled",
           "manifest": content.manifest, "manifest_sha256": content.manifest_sha256, "timeout": 30, **header}
    return run_on_host(conn, runner, hdr, content.data, lines or Lines(), cancel or threading.Event(), 60.0,
                       heartbeat=heartbeat)


def test_cold_then_warm_run_with_real_runner(ssh_hosts, connect, real_runner):
    (host,) = ssh_hosts(1)
    host.clear_runner_cache()
    conn = connect(host)
    lines = Lines()
    cold = run_script(conn, real_runner, "echo out; echo err >&2; exit 3", lines=lines)
    assert cold.error_kind is None, (cold.error, cold.runner_stderr)
    assert (cold.runner_installed, cold.execs) == (True, 3)
    assert cold.result is not None
    assert (cold.result["status"], cold.result["exit_code"]) == ("failure", 3)
    assert cold.result["runner"]["sha256"] == real_runner.sha256
    assert lines.out == {"stdout": b"out\n", "stderr": b"err\n"}
    warm = run_script(conn, real_runner, "echo warm")
    assert (warm.runner_cached, warm.execs, warm.runner_bytes_sent) == (True, 1, 0)
    assert warm.result is not None and warm.result["status"] == "success"


def test_cancel_stops_the_remote_script_with_real_runner(ssh_hosts, connect, real_runner):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    marker = f"{os.getpid()}.{time.monotonic_ns() % 100000}"
    cancel = threading.Event()
    lines = Lines()
    out: list[HostRun] = []
    t = threading.Thread(target=lambda: out.append(
        run_script(conn, real_runner, f"echo started; sleep 3{marker}", cancel=cancel, lines=lines)))
    t.start()
    assert lines.first.wait(15)
    cancel.set()
    t.join(15)
    (run,) = out
    assert run.error_kind == "cancelled"
    assert run.result is not None and run.result["status"] == "cancelled"
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and marker.encode() in _cmdline(p)]
    assert leftovers == []


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_bootstrap_runs_the_runner_on_python_3_8(ssh_hosts, connect, real_runner):
    py38 = Path("/root/.pyenv/versions/3.8.18/bin/python3")
    if not os.access(py38, os.X_OK):
        pytest.skip(f"no python 3.8 at {py38}")
    (host,) = ssh_hosts(1, python3=str(py38))
    run = run_script(connect(host), real_runner, "echo on-38")
    assert run.error_kind is None, (run.error, run.runner_stderr)
    assert run.hello is not None and run.hello["python"].startswith("3.8.")
    assert run.result is not None and run.result["status"] == "success"


def test_frozen_host_ends_unresponsive_after_the_heartbeat_timeout(ssh_hosts, connect, real_runner):
    """The host's sshd session stops (SIGSTOP: TCP stays up, nothing answers): the run ends as
    ``unresponsive`` once the runner was silent for the heartbeat timeout, not at the watchdog."""
    import signal

    (host,) = ssh_hosts(1, exclusive=True)
    conn = connect(host)
    lines = Lines()
    out: list[HostRun] = []
    t = threading.Thread(target=lambda: out.append(run_script(
        conn, real_runner, "echo started; sleep 60", lines=lines, heartbeat=Heartbeat(0.5, 3.0))))
    t.start()
    frozen: list[int] = []
    try:
        assert lines.first.wait(30)
        frozen = session_processes(host)
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        t.join(50)   # the watchdog (60 s) would end it much later
        took = time.monotonic() - t0
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    (run,) = out
    assert run.error_kind == "unresponsive", (run.error_kind, run.error)
    assert run.error and run.error.startswith("no sign of life from the runner for ") and "host frozen" in run.error
    assert took < 40


def test_heartbeats_keep_a_long_quiet_script_alive(ssh_hosts, connect, real_runner):
    """A script quiet for several heartbeat timeouts, on a healthy host, is not cut off."""
    (host,) = ssh_hosts(1)
    conn = connect(host)
    lines = Lines()
    run = run_script(conn, real_runner, "sleep 12; echo done", lines=lines, heartbeat=Heartbeat(1.0, 5.0))
    assert run.error_kind is None, (run.error_kind, run.error)
    assert run.result is not None and run.result["status"] == "success"
    assert lines.out["stdout"] == b"done\n"
