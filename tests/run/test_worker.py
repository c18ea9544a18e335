"""`cronium-fab worker`: commands served by a resident worker behave exactly as in-process runs.

Real worker process, real client program, real sshd hosts, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from cronium_fab.db.models import Execution, UserVariable
from tests.procs import procs_with
from tests.run.conftest import ROOT, Fleet, assert_ctrl_c_cancels, start_long_run

pytestmark = pytest.mark.ssh
CLIENT = str(Path(sys.executable).parent / "cronium-fab")


@dataclass
class RunningWorker:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log.read_text()

    def served(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if ": run " in line and "ended" not in line]

    def client(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLIENT, *args], env=self.env, capture_output=True, text=True,  # type: ignore[call-overload, no-any-return]
                              timeout=120, **kw)


def start_worker(env: dict[str, str], cwd: Path, argv: list[str] | None = None) -> RunningWorker:
    sock_dir = Path(tempfile.mkdtemp(prefix="cfw", dir="/tmp"))   # short: Unix socket paths are <= 107 bytes
    env = dict(env, CRONIUM_FAB_WORKER_SOCKET=str(sock_dir / "w.sock"))
    log = cwd / "worker.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(argv or [CLIENT, "worker"], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    w = RunningWorker(proc, sock_dir / "w.sock", log, env)
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"worker did not start: {log.read_text()}")
        time.sleep(0.05)
    return w


def stop_worker(w: RunningWorker) -> None:
    if w.proc.poll() is None:
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(timeout=30)
    shutil.rmtree(w.socket.parent, ignore_errors=True)


@pytest.fixture
def worker(fleet: Fleet, tmp_path: Path) -> Iterator[RunningWorker]:
    w = start_worker(fleet.env(), tmp_path)
    yield w
    stop_worker(w)
    assert w.proc.returncode == 0, w.log_text()
    assert not w.socket.exists(), "a stopped worker removes its socket"


def test_worker_serves_run_event_with_same_output_exit_status_and_records(
        fleet: Fleet, ssh_hosts, worker: RunningWorker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok_host, bad_host = ssh_hosts(2)
    script = ('cronium_set_variable "via_$CRONIUM_SERVER_NAME" yes; echo out; echo err >&2; '
              '[ "$CRONIUM_SERVER_NAME" = "' + bad_host.name + '" ] && exit 3; exit 0')
    ev = fleet.event([ok_host, bad_host], script)
    out = worker.client("run-event", "--id", str(ev), "--json", cwd=tmp_path)
    assert out.returncode == 3, out.stderr          # PARTIAL, as in-process
    doc = json.loads(out.stdout)
    assert doc["status"] == "PARTIAL"
    by_name = {h["name"]: h for h in doc["hosts"]}
    assert by_name[ok_host.name]["exit_code"] == 0 and by_name[bad_host.name]["exit_code"] == 3
    assert by_name[bad_host.name]["stdout"] == "out\n" and by_name[bad_host.name]["stderr"] == "err\n"
    assert f"{ok_host.name} | out" in out.stderr and "HOST" in out.stderr   # live output + summary on stderr
    served = worker.served()
    assert len(served) == 1 and "run-event" in served[0], worker.log_text()
    with fleet.db.session() as s:
        stored = {v.key: v.value for v in s.scalars(select(UserVariable))}
        assert stored[f"via_{ok_host.name}"] == "yes" and stored[f"via_{bad_host.name}"] == "yes"
        assert sorted(e.status for e in s.scalars(select(Execution))) == ["completed", "failed"]


def test_usage_error_through_worker_keeps_message_and_code(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    out = worker.client("run-event", "--id", "424242", cwd=tmp_path)
    assert out.returncode == 2
    assert "event 424242 not found" in out.stderr
    assert len(worker.served()) == 1


def test_ctrl_c_of_client_cancels_run_served_by_worker(fleet: Fleet, ssh_hosts, worker: RunningWorker,  # type: ignore[no-untyped-def]
                                                       tmp_path: Path) -> None:
    (host,) = ssh_hosts(1)
    assert_ctrl_c_cancels(fleet, host, [CLIENT], worker.env, tmp_path)
    assert len(worker.served()) == 1


def test_killed_client_cancels_its_run(fleet: Fleet, ssh_hosts, worker: RunningWorker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    proc, marker = start_long_run(fleet, host, [CLIENT], worker.env, tmp_path)
    proc.kill()                      # no chance to forward anything: the worker's run sees the socket close
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with fleet.db.session() as s:
            status = s.scalars(select(Execution)).one().status
        if status == "cancelled" and not procs_with(marker):
            break
        time.sleep(0.2)
    assert status == "cancelled"
    assert procs_with(marker) == []
    deadline = time.monotonic() + 10
    while "ended" not in worker.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "ended: exit 5" in worker.log_text()


def test_worker_running_other_code_is_not_used(fleet: Fleet, ssh_hosts, worker: RunningWorker,  # type: ignore[no-untyped-def]
                                               tmp_path: Path) -> None:
    """After an upgrade or an edit of the code, a worker started before it must not serve us."""
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo fine")
    edited = ROOT / "cronium_fab" / "__init__.py"
    st = edited.stat()
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # as an edit or upgrade would
    try:
        out = worker.client("run-event", "--id", str(ev), "--json", cwd=tmp_path)
    finally:
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "SUCCESS"
    assert "runs other code" in out.stderr and "running the command in this process" in out.stderr
    assert worker.served() == []
    assert worker.client("--version", cwd=tmp_path).returncode == 0
    assert len(worker.served()) == 1, "the same code again: served"


def test_worker_and_client_refuse_other_users(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    # Open the socket to everyone, as a careless admin might: the uid checks on both ends must still hold.
    worker.socket.parent.chmod(0o755)
    worker.socket.chmod(0o666)
    # The client module is standard library only: another user runs a copy of it with the system python3.
    shared = Path(tempfile.mkdtemp(prefix="cfwc", dir="/tmp"))
    try:
        shutil.copy(ROOT / "cronium_fab" / "launch.py", shared / "launch.py")
        shared.chmod(0o755)
        (shared / "launch.py").chmod(0o644)
        nobody = 65534
        probe = "import launch; print('session:', launch._worker_session())"
        out = subprocess.run([shutil.which("python3", path="/usr/bin:/bin") or "python3", "-c", probe],
                             env={"CRONIUM_FAB_WORKER_SOCKET": str(worker.socket), "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=60, user=nobody, group=nobody, cwd=shared)
    finally:
        shutil.rmtree(shared)
    assert out.returncode == 0, out.stderr
    assert "session: None" in out.stdout, "the client must not hand its environment to another user's worker"
    deadline = time.monotonic() + 5
    while "refused a connection from uid 65534" not in worker.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refused a connection from uid 65534" in worker.log_text()
    assert worker.served() == []


def test_second_worker_on_same_socket_is_refused_clearly(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    out = subprocess.run([CLIENT, "worker"], env=dict(worker.env, CRONIUM_FAB_WORKER="off"), capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2     # a configuration problem, as for any other bad setting
    assert "another cronium-fab worker already serves" in out.stderr
    assert worker.socket.exists()
    assert worker.client("--version", cwd=tmp_path).returncode == 0
    assert len(worker.served()) == 1, "the first worker still serves"


def test_dead_worker_socket_falls_back_then_is_replaced(fleet: Fleet, tmp_path: Path) -> None:
    w = start_worker(fleet.env(), tmp_path)
    try:
        w.proc.kill()                    # SIGKILL: no chance to remove its socket
        w.proc.wait(timeout=10)
        assert w.socket.exists()
        out = w.client("events", cwd=tmp_path)
        assert out.returncode == 0, out.stderr     # nobody listening: the command runs in-process, silently
        assert out.stderr == ""
        again = start_worker(dict(w.env), tmp_path)
        try:
            assert again.socket == w.socket or again.socket.exists()
            out = again.client("events", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            assert len(again.served()) == 1
        finally:
            stop_worker(again)
    finally:
        stop_worker(w)
