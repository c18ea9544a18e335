"""`cronium-fab worker`: commands served by a resident worker behave exactly as in-process runs.

Real worker process, real client program, real sshd hosts, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
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
from cronium_fab.testing.procs import procs_with, wait_until
from tests.run.conftest import CONN, ROOT, Fleet, alive, assert_ctrl_c_cancels, start_long_run, wait_gone

# One xdist worker runs every test that starts a `cronium-fab worker` (here and test_demo.py), one after
# another: the upgrade test changes the code on disk (a file in site-packages), which makes every
# running worker refuse its clients ("runs other code") while it lasts.
pytestmark = [pytest.mark.ssh, pytest.mark.xdist_group("cronium-fab-worker")]
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
        kw.setdefault("env", self.env)
        return subprocess.run([CLIENT, *args], capture_output=True, text=True,  # type: ignore[call-overload, no-any-return]
                              timeout=120, **kw)


def start_worker(env: dict[str, str], cwd: Path, argv: list[str] | None = None) -> RunningWorker:
    """A `cronium-fab worker` on env's CRONIUM_FAB_WORKER_SOCKET, else on a new short socket path
    (Unix socket paths are <= 107 bytes); its log in a new file under ``cwd``."""
    if "CRONIUM_FAB_WORKER_SOCKET" not in env:
        env = dict(env, CRONIUM_FAB_WORKER_SOCKET=str(Path(tempfile.mkdtemp(prefix="cfw", dir="/tmp")) / "w.sock"))
    log = Path(tempfile.mkstemp(prefix="worker-", suffix=".log", dir=cwd)[1])
    with log.open("wb") as f:
        proc = subprocess.Popen(argv or [CLIENT, "worker"], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    w = RunningWorker(proc, Path(env["CRONIUM_FAB_WORKER_SOCKET"]), log, env)
    if not wait_until(lambda: "listening on" in log.read_text() or proc.poll() is not None, 30) \
            or "listening on" not in log.read_text():
        proc.kill()
        raise AssertionError(f"worker did not start: {log.read_text()}")
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
    # live output (names padded to the longest) + summary on stderr
    assert re.search(rf"^{re.escape(ok_host.name)} *\| out$", out.stderr, re.M) and "HOST" in out.stderr, out.stderr
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


def test_a_served_run_shows_its_command_in_ps(fleet: Fleet, ssh_hosts, worker: RunningWorker,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    (host,) = ssh_hosts(1)
    proc, marker = start_long_run(fleet, host, [CLIENT], worker.env, tmp_path)
    try:
        served = worker.served()
        assert len(served) == 1
        pid = int(served[0].split(": run ")[1].split(":")[0])
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        assert title.startswith("cronium-fab run-event (served by worker "), title
        assert "--id" not in title
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert wait_gone(marker) == []


def test_killed_client_cancels_its_run(fleet: Fleet, ssh_hosts, worker: RunningWorker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    proc, marker = start_long_run(fleet, host, [CLIENT], worker.env, tmp_path)
    proc.kill()                      # no chance to forward anything: the worker's run sees the socket close
    proc.wait(timeout=10)
    def status() -> str:
        with fleet.db.session() as s:
            return s.scalars(select(Execution)).one().status

    wait_until(lambda: status() == "cancelled" and not procs_with(marker), 30, interval=0.2)
    assert status() == "cancelled"
    assert procs_with(marker) == []
    wait_until(lambda: "ended" in worker.log_text(), 10)
    assert "ended: exit 5" in worker.log_text()


def test_worker_after_an_upgrade_refuses_then_restarts_itself(fleet: Fleet, worker: RunningWorker,
                                                              tmp_path: Path) -> None:
    """Libraries change (pip install/upgrade): the old worker must not serve the new command line;
    it restarts itself on the new code and serves again."""
    import sqlalchemy

    def wait_listening(times: int) -> None:
        wait_until(lambda: worker.log_text().count("listening on") >= times, 30)
        assert worker.log_text().count("listening on") >= times, worker.log_text()

    site_packages = Path(sqlalchemy.__file__).parents[1]
    installed = site_packages / f"cfab-test-install-{os.getpid()}.txt"
    installed.write_text("as pip would add a package\n")
    try:
        out = worker.client("events", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "runs other code" in out.stderr and "running the command in this process" in out.stderr
        assert worker.served() == []
        wait_listening(2)
        assert "the code on disk changed: restarting to load it" in worker.log_text()
        out = worker.client("events", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "other code" not in out.stderr
        assert len(worker.served()) == 1
    finally:
        installed.unlink()
    wait_listening(3)   # the removal is a change too: let it restart before the fixture stops it


def test_fingerprint_ignores_a_touch(tmp_path: Path) -> None:
    from cronium_fab import wire

    first = wire.code_fingerprint()
    assert wire.code_fingerprint() == first
    edited = ROOT / "cronium_fab" / "__init__.py"
    st = edited.stat()
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # touched, same content
    try:
        assert wire.code_fingerprint() == first, "a touch (or a checkout of the same content) is the same code"
    finally:
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_worker_and_client_refuse_other_users(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    # Open the socket to everyone, as a careless admin might: the uid checks on both ends must still hold.
    worker.socket.parent.chmod(0o755)
    worker.socket.chmod(0o666)
    # The client and its floor are standard library only: another user runs a copy of them with
    # the system python3.
    shared = Path(tempfile.mkdtemp(prefix="cfwc", dir="/tmp"))
    try:
        (shared / "cronium_fab").mkdir()
        for name in ("__init__", "launch", "errors", "paths", "signals", "wire"):
            shutil.copy(ROOT / "cronium_fab" / f"{name}.py", shared / "cronium_fab" / f"{name}.py")
            (shared / "cronium_fab" / f"{name}.py").chmod(0o644)
        shared.chmod(0o755)
        (shared / "cronium_fab").chmod(0o755)
        nobody = 65534
        probe = ("from cronium_fab import launch; "
                 "print('session:', launch._worker_session(launch._Signals()))")
        out = subprocess.run([shutil.which("python3", path="/usr/bin:/bin") or "python3", "-c", probe],
                             env={"CRONIUM_FAB_WORKER_SOCKET": str(worker.socket), "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=60, user=nobody, group=nobody, cwd=shared)
    finally:
        shutil.rmtree(shared)
    assert out.returncode == 0, out.stderr
    assert "session: None" in out.stdout, "the client must not hand its environment to another user's worker"
    wait_until(lambda: "refused a connection from uid 65534" in worker.log_text(), 5)
    assert "refused a connection from uid 65534" in worker.log_text()
    assert worker.served() == []


def test_second_worker_on_same_socket_is_refused_clearly(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    out = subprocess.run([CLIENT, "worker"], env=dict(worker.env, CRONIUM_FAB_WORKER="off"), capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2     # a configuration problem, as for any other bad setting
    assert "another cronium-fab worker already serves" in out.stderr
    assert f"(pid {worker.proc.pid})" in out.stderr
    assert worker.socket.exists()
    version = worker.client("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert len(worker.served()) == 1, f"the first worker still serves: {version.stderr!r} {worker.log_text()!r}"


def test_dead_worker_socket_falls_back_then_is_replaced(fleet: Fleet, tmp_path: Path) -> None:
    w = start_worker(fleet.env(), tmp_path)
    try:
        w.proc.kill()                    # SIGKILL: no chance to remove its socket
        w.proc.wait(timeout=10)
        assert w.socket.exists()
        out = w.client("events", cwd=tmp_path)
        assert out.returncode == 0, out.stderr     # nobody listening: the command runs in-process, silently
        assert out.stderr == ""
        again = start_worker(dict(w.env), tmp_path)     # same socket path: the stale socket is replaced
        try:
            assert again.socket == w.socket
            out = again.client("events", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            assert len(again.served()) == 1
        finally:
            stop_worker(again)
    finally:
        stop_worker(w)


def test_worker_restarts_while_a_run_it_started_goes_on(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Runs in progress hold neither the socket nor the lock: a new worker can start (systemd restart)."""
    (host,) = ssh_hosts(1)
    first = start_worker(fleet.env(), tmp_path)
    try:
        proc, marker = start_long_run(fleet, host, [CLIENT], first.env, tmp_path)
        try:
            first.proc.kill()
            first.proc.wait(timeout=10)
            again = start_worker(dict(first.env), tmp_path)
            try:
                out = again.client("events", cwd=tmp_path)
                assert out.returncode == 0, out.stderr
                assert len(again.served()) == 1
            finally:
                stop_worker(again)
            assert proc.poll() is None, "the run goes on, owned by its client"
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        assert proc.returncode == 5
        assert wait_gone(marker) == []
    finally:
        stop_worker(first)


def test_broken_stdout_is_an_error_as_in_process(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    codes = {}
    for way, env in (("in-process", dict(worker.env, CRONIUM_FAB_WORKER="off")), ("worker", worker.env)):
        r, w = os.pipe()
        os.close(r)                      # nobody will ever read what the command prints
        try:
            proc = subprocess.run([CLIENT, "--help"], env=env, stdout=w, stderr=subprocess.PIPE, text=True,
                                  timeout=60, cwd=tmp_path)
        finally:
            os.close(w)
        codes[way] = proc.returncode
    assert codes["in-process"] != 0
    assert codes["worker"] == codes["in-process"] or codes["worker"] == 120, codes
    assert len(worker.served()) == 1


def test_worker_log_names_the_command_never_its_arguments(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    secret = "s3cr3t-token-in-input"
    for _ in range(3):   # a loaded machine may keep the worker's fork from answering within 2 s: then
        out = worker.client("run-event", "--id", "424242", "--input", json.dumps({"token": secret}),
                            cwd=tmp_path)   # the client runs it itself, and the worker logs nothing of it
        if "running the command in this process" not in out.stderr:
            break
    assert out.returncode == 2
    assert "running the command in this process" not in out.stderr, out.stderr
    wait_until(lambda: "ended: exit 2" in worker.log_text(), 5)
    log = worker.log_text()
    assert "run-event" in log and "ended: exit 2" in log
    assert secret not in log and "424242" not in log


def test_stuck_worker_means_in_process_run_and_never_a_second_run(fleet: Fleet, worker: RunningWorker,
                                                                  tmp_path: Path) -> None:
    worker.proc.send_signal(signal.SIGSTOP)       # accepts nothing; the client times out waiting
    try:
        t0 = time.monotonic()
        out = worker.client("db-init", cwd=tmp_path)
        waited = time.monotonic() - t0
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    assert out.returncode == 0, out.stderr          # ran in-process after the wait
    assert waited >= 1.5
    assert "did not answer within 2 s" in out.stderr and "running the command in this process" in out.stderr
    wait_until(lambda: "gave up" in worker.log_text(), 10)
    assert "no command from a client (it gave up waiting" in worker.log_text()
    assert worker.served() == [], "the command ran in-process; the worker must never run it too"


@pytest.mark.parametrize("way", ["in-process", "worker"])
def test_signals_the_caller_ignores_stay_ignored(fleet: Fleet, ssh_hosts, worker: RunningWorker, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 way: str) -> None:
    """`nohup cronium-fab run-event ...`: a SIGHUP (logout) must not cancel the run; SIGINT still does."""
    (host,) = ssh_hosts(1)
    env = worker.env if way == "worker" else dict(worker.env, CRONIUM_FAB_WORKER="off")
    marker = f"cfab-nohup-{time.monotonic_ns()}"
    ev = fleet.event([host], f'echo started; exec -a "{marker}" sleep 120')
    proc = subprocess.Popen([CLIENT, "run-event", "--id", str(ev)], env=env, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            break
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert proc.poll() is None, "an ignored SIGHUP ended the run"
    assert procs_with(marker), "an ignored SIGHUP stopped the remote script"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert wait_gone(marker) == []
    assert len(worker.served()) == (1 if way == "worker" else 0)


def test_caller_with_closed_stdio_is_served_as_in_process(fleet: Fleet, worker: RunningWorker, tmp_path: Path) -> None:
    """A closed fd 0-2 must never be replaced by the client's control socket."""
    codes = {}
    for way, env in (("in-process", dict(worker.env, CRONIUM_FAB_WORKER="off")), ("worker", worker.env)):
        out = subprocess.run(["bash", "-c", f"{CLIENT} load /nonexistent-inventory.yaml 2>&-"], env=env,
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        codes[way] = out.returncode
    assert codes == {"in-process": 2, "worker": 2}
    assert "killed by signal" not in worker.log_text()


def test_socket_in_a_shared_directory_is_refused_with_advice_that_is_safe(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)                      # like /tmp
    out = subprocess.run([CLIENT, "worker"], env=dict(os.environ, CRONIUM_FAB_WORKER_SOCKET=str(shared / "w.sock")),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    assert "writable by others" in out.stderr and "mkdir -m 700" in out.stderr
    assert "chmod" not in out.stderr.replace("mkdir -m 700", ""), "never advise changing a shared directory"
    assert list(shared.iterdir()) == [], "nothing left behind"


# -- connections kept between the commands a worker serves ------------------------------------------



def _hosts_of(out: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert out.returncode == 0, out.stderr
    return sorted(json.loads(out.stdout)["hosts"], key=lambda h: str(h["name"]))


def _conn_pids(hosts: list[dict[str, object]]) -> list[int]:
    pids = [re.search(r"conn=(\d+)", str(h["stdout"])) for h in hosts]
    assert all(pids), hosts
    return [int(m.group(1)) for m in pids if m]


def _wait_kept(w: RunningWorker, n: int) -> None:
    """Until the worker has been told n times that a run process is free for the next command (a
    command that comes before that gets a new fork: one command at a time per process)."""
    assert wait_until(lambda: w.log_text().count("waits for the next command") >= n, 10), w.log_text()


def _run_pids(w: RunningWorker) -> list[int]:
    return [int(line.split(": run ")[1].split(":")[0]) for line in w.served()]


def test_the_next_command_runs_on_the_connections_a_served_run_kept(
        fleet: Fleet, ssh_hosts, worker: RunningWorker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The second run of an event through the worker opens no SSH connection: the process that ran
    the first one kept them and serves the second; the caller's pipes still close at the end of each
    command (capture_output waits for EOF: a held pipe would time out)."""
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, CONN)
    first = _hosts_of(worker.client("run-event", "--id", str(ev), "--json", cwd=tmp_path))
    assert [h["connection_reused"] for h in first] == [False, False]
    _wait_kept(worker, 1)
    assert "waits for the next command with 2 kept connection(s)" in worker.log_text()
    second = _hosts_of(worker.client("run-event", "--id", str(ev), "--json", cwd=tmp_path))
    assert [h["connection_reused"] for h in second] == [True, True]
    assert _conn_pids(second) == _conn_pids(first)      # read on the hosts: the same sshd connections
    pids = _run_pids(worker)
    assert len(pids) == 2 and pids[0] == pids[1], worker.log_text()
    assert "(this process keeps 2 connection(s) from earlier commands)" in worker.served()[1]
    with fleet.db.session() as s:
        assert sorted(e.status for e in s.scalars(select(Execution))) == ["completed"] * 4


def test_a_kept_process_serves_each_caller_with_its_own_environment_and_directory(
        fleet: Fleet, ssh_hosts, worker: RunningWorker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Commands served one after another by the same kept process each see their own caller's
    environment (a variable only the first caller set is gone), directory and database."""
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, CONN)
    first = worker.client("run-event", "--id", str(ev), cwd=tmp_path,
                          env=dict(worker.env, CRONIUM_FAB_PARALLEL="1"))
    assert first.returncode == 0, first.stderr
    _wait_kept(worker, 1)
    pid = _run_pids(worker)[0]
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")            # it let go of the caller's directory
    plan = worker.client("run-event", "--id", str(ev), "--plan", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["parallel"] == 2                   # not the first caller's 1
    _wait_kept(worker, 2)
    other = tmp_path / "other"
    other.mkdir()
    env = dict(worker.env, CRONIUM_DATABASE_URL="sqlite:///other.db")   # relative: to the caller's directory
    for n, argv in enumerate((["db-init"], ["runs", "--json"])):
        out = subprocess.run([CLIENT, *argv], env=env, cwd=other, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        _wait_kept(worker, 3 + n)
    assert json.loads(out.stdout)["runs"] == []                       # that database, not the first caller's
    assert (other / "other.db").is_file()
    again = worker.client("runs", "--json", cwd=tmp_path)
    assert len(json.loads(again.stdout)["runs"]) == 1
    assert _run_pids(worker) == [pid] * 5, worker.log_text()          # every one served by the kept process


def test_kept_processes_end_after_their_idle_time_closing_their_connections(
        fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN)
    w = start_worker(dict(fleet.env(), CRONIUM_FAB_KEEP_CONNECTIONS="1"), tmp_path)
    try:
        (h,) = _hosts_of(w.client("run-event", "--id", str(ev), "--json", cwd=tmp_path))
        (sshd,) = _conn_pids([h])
        pid = _run_pids(w)[0]
        assert wait_until(lambda: f"run {pid} ended: exit 0" in w.log_text() and not alive(sshd), 15), w.log_text()
        assert not alive(pid)
        (h2,) = _hosts_of(w.client("run-event", "--id", str(ev), "--json", cwd=tmp_path))
        assert h2["connection_reused"] is False
    finally:
        stop_worker(w)


def test_stopping_the_worker_ends_its_kept_processes_and_their_connections(
        fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, CONN)
    w = start_worker(fleet.env(), tmp_path)
    try:
        sshds = _conn_pids(_hosts_of(w.client("run-event", "--id", str(ev), "--json", cwd=tmp_path)))
        _wait_kept(w, 1)
        pid = _run_pids(w)[0]
        assert alive(pid) and all(alive(p) for p in sshds)
    finally:
        stop_worker(w)
    assert w.proc.returncode == 0
    assert wait_until(lambda: not alive(pid) and not any(alive(p) for p in sshds), 15)


def test_with_keeping_off_every_command_gets_its_own_fork_and_connections(
        fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN)
    w = start_worker(dict(fleet.env(), CRONIUM_FAB_KEEP_CONNECTIONS="0"), tmp_path)
    w.env = fleet.env() | {"CRONIUM_FAB_WORKER_SOCKET": w.env["CRONIUM_FAB_WORKER_SOCKET"]}  # its callers keep
    try:
        runs = [_hosts_of(w.client("run-event", "--id", str(ev), "--json", cwd=tmp_path))[0] for _ in range(2)]
        assert [h["connection_reused"] for h in runs] == [False, False]
        assert _conn_pids(runs[:1]) != _conn_pids(runs[1:])
        pids = _run_pids(w)
        assert len(set(pids)) == 2 and "waits for the next command" not in w.log_text()
    finally:
        stop_worker(w)


def test_a_cancelled_run_ends_the_kept_process_that_served_it(fleet: Fleet, ssh_hosts, worker: RunningWorker,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], CONN)
    assert worker.client("run-event", "--id", str(ev), cwd=tmp_path).returncode == 0
    _wait_kept(worker, 1)
    proc, marker = start_long_run(fleet, host, [CLIENT], worker.env, tmp_path)
    pids = _run_pids(worker)
    assert len(pids) == 2 and pids[0] == pids[1], worker.log_text()   # the kept process took it
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert wait_until(lambda: not alive(pids[0]), 15), worker.log_text()
    assert worker.log_text().count("waits for the next command") == 1
    assert wait_gone(marker) == []
