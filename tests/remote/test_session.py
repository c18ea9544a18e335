"""run_on_host against real sshd hosts, with a fake runner that speaks the framing."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from cronium_fab.build import RunnerArtifact
from cronium_fab.remote.runner_cache import install_command, runner_file_name
from cronium_fab.remote.session import HostRun, run_on_host
from cronium_fab.testing.hosts import DevHost
from tests.remote.fake_runner import build_fake_runner

pytestmark = pytest.mark.ssh


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []
        self.first = threading.Event()

    def __call__(self, stream: str, ts: float, data: bytes) -> None:
        assert ts > 1e9
        self.records.append((stream, data))
        self.first.set()


def go(conn, runner: RunnerArtifact, *, header: dict | None = None, cancel: threading.Event | None = None,
       watchdog_s: float | None = 30.0, rec: Recorder | None = None, **kw) -> HostRun:
    return run_on_host(conn, runner, header or {"job_id": "j1"}, b"PAYLOAD-BYTES", rec or Recorder(),
                       cancel or threading.Event(), watchdog_s, **kw)


def cached_file(host: DevHost, runner: RunnerArtifact) -> Path:
    return host.runner_cache_dir / runner_file_name(runner.sha256)


def assert_success(run: HostRun) -> None:
    assert run.error_kind is None, run.error
    assert run.result is not None and run.result["status"] == "success"
    assert run.result["payload_sha256"] == hashlib.sha256(b"PAYLOAD-BYTES").hexdigest()


def test_cold_run_installs_runner_then_runs(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1)
    host.clear_runner_cache()
    rec = Recorder()
    run = go(connect(host), fake_runner, rec=rec)
    assert_success(run)
    assert (run.runner_cached, run.runner_installed, run.execs) == (False, True, 3)
    assert run.runner_bytes_sent == fake_runner.size
    assert rec.records == [("stdout", b"hello\n"), ("stderr", b"oops\n")]
    assert run.hello is not None and run.hello["sha256"] == fake_runner.sha256
    f = cached_file(host, fake_runner)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == fake_runner.sha256
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(host.runner_cache_dir.stat().st_mode) == 0o700
    assert os.listdir(host.runner_cache_dir) == [f.name]  # no temp file left
    # the runner ran with the host's own cache and tmp dirs
    assert run.result["env"] == {"XDG_CACHE_HOME": str(host.cache_dir), "TMPDIR": str(host.tmp_dir)}


def test_warm_run_is_one_exec_and_sends_no_runner_bytes(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    go(conn, fake_runner)  # make sure it is cached
    run = go(conn, fake_runner)
    assert_success(run)
    assert (run.runner_cached, run.runner_installed, run.execs, run.runner_bytes_sent) == (True, False, 1, 0)
    assert run.setup_s is not None and run.execution_s is not None


@pytest.mark.parametrize("damage", ["flip-byte", "group-writable", "symlink", "truncate"])
def test_damaged_cached_runner_is_detected_and_replaced(ssh_hosts, connect, fake_runner, damage, tmp_path):
    (host,) = ssh_hosts(1)
    conn = connect(host)
    go(conn, fake_runner)
    f = cached_file(host, fake_runner)
    if damage == "flip-byte":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "group-writable":
        f.chmod(0o620)
    elif damage == "symlink":
        real = tmp_path / "elsewhere.pyz"
        real.write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(real)
    else:
        f.write_bytes(b"")
    run = go(conn, fake_runner)
    assert_success(run)
    assert (run.runner_cached, run.runner_installed, run.execs) == (False, True, 3)
    assert not f.is_symlink() and stat.S_IMODE(f.stat().st_mode) == 0o600
    assert hashlib.sha256(f.read_bytes()).hexdigest() == fake_runner.sha256


def test_host_without_python3_says_so(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1, python3="")
    run = go(connect(host), fake_runner)
    assert run.error_kind == "python-missing" and "python3" in (run.error or "")
    assert run.execs == 1 and run.result is None


def test_host_with_too_old_python3_says_so(ssh_hosts, connect, fake_runner):
    old = Path("/root/.pyenv/versions/3.6.15/bin/python3")
    if not os.access(old, os.X_OK):
        pytest.skip("no python 3.6 at " + str(old))
    (host,) = ssh_hosts(1, python3=str(old))
    run = go(connect(host), fake_runner)
    assert run.error_kind == "python-too-old" and "3.6.15" in (run.error or "")


def test_unwritable_cache_is_runner_install_failed(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1, exclusive=True)
    host.runner_cache_dir.write_text("a file where the cache directory should be")
    run = go(connect(host), fake_runner)
    assert run.error_kind == "runner-install-failed", run.error
    assert run.execs == 2


def test_concurrent_runs_installing_at_once_leave_a_good_cache(ssh_hosts, connect, tmp_path):
    (host,) = ssh_hosts(1)
    # A big runner makes every upload last long enough that all four runs find the cache empty and
    # install at once, even on a loaded machine.
    fake_runner = build_fake_runner(tmp_path, pad_bytes=8 << 20)
    raced = 0
    for _attempt in range(5):   # every attempt must be correct; at least one must really race (timing)
        host.clear_runner_cache()
        conns = [connect(host) for _ in range(4)]
        runs: list[HostRun] = []
        barrier = threading.Barrier(len(conns))

        def one(conn, barrier=barrier, runs=runs):
            barrier.wait()
            runs.append(go(conn, fake_runner))

        threads = [threading.Thread(target=one, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(runs) == 4
        for run in runs:
            assert_success(run)
        f = cached_file(host, fake_runner)
        assert hashlib.sha256(f.read_bytes()).hexdigest() == fake_runner.sha256
        assert os.listdir(host.runner_cache_dir) == [f.name]
        raced += sum(r.runner_installed for r in runs) >= 2
        if raced:
            break
    assert raced, "no attempt had two installs at once: the race was never exercised"


def test_concurrent_raw_installs_never_expose_a_partial_file(ssh_hosts, connect, tmp_path):
    from tests.remote.fake_runner import build_fake_runner

    big = build_fake_runner(tmp_path, pad_bytes=3_000_000)  # ~3 MB: many SSH windows
    (host,) = ssh_hosts(1)
    data = big.path.read_bytes()
    conns = [connect(host), connect(host)]
    stop = threading.Event()
    seen_bad: list[int] = []
    final = cached_file(host, big)

    def watch():
        while not stop.is_set():
            try:
                got = final.read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(got).hexdigest() != big.sha256:
                seen_bad.append(len(got))

    def install(conn, results):
        chan = conn.transport.open_session()
        chan.exec_command(install_command(big.sha256))
        chan.sendall(data)
        chan.shutdown_write()
        results.append((chan.makefile("rb").read(), chan.recv_exit_status()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    results: list = []
    threads = [threading.Thread(target=install, args=(c, results)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    watcher.join()
    assert [r[1] for r in results] == [0, 0]
    assert seen_bad == []
    assert hashlib.sha256(final.read_bytes()).hexdigest() == big.sha256
    assert os.listdir(host.runner_cache_dir) == [final.name] or set(os.listdir(host.runner_cache_dir)) >= {final.name}


def test_cancel_closes_stdin_and_runner_answers_cancelled(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1)
    cancel = threading.Event()
    rec = Recorder()
    out: list[HostRun] = []
    t = threading.Thread(target=lambda: out.append(
        go(connect(host), fake_runner, header={"fake": {"wait_eof": True}}, cancel=cancel, rec=rec)))
    t.start()
    assert rec.first.wait(10)
    t0 = time.monotonic()
    cancel.set()
    t.join(10)
    (run,) = out
    assert time.monotonic() - t0 < 2
    assert run.error_kind == "cancelled"
    assert run.result is not None and run.result["status"] == "cancelled"
    assert not os.path.exists(f"/proc/{run.hello['pid']}/cmdline") or b"python" not in Path(
        f"/proc/{run.hello['pid']}/cmdline").read_bytes()


def test_watchdog_stops_a_runner_that_never_answers(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1)
    t0 = time.monotonic()
    run = go(connect(host), fake_runner, header={"fake": {"ignore_eof": True}}, watchdog_s=0.5, cancel_grace_s=0.5)
    assert run.error_kind == "watchdog-timeout"
    assert run.result is None
    assert time.monotonic() - t0 < 5


def test_cancel_before_start_runs_nothing(ssh_hosts, connect, fake_runner):
    (host,) = ssh_hosts(1)
    cancel = threading.Event()
    cancel.set()
    run = go(connect(host), fake_runner, cancel=cancel)
    assert run.error_kind == "cancelled" and run.execs == 0


def test_dropped_connection_is_disconnected(ssh_hosts, ssh_pool, connect, fake_runner):
    (host,) = ssh_hosts(1, exclusive=True)
    conn = connect(host)
    go(conn, fake_runner)
    rec = Recorder()
    out: list[HostRun] = []
    t = threading.Thread(target=lambda: out.append(
        go(conn, fake_runner, header={"fake": {"ignore_eof": True}}, rec=rec)))
    t.start()
    assert rec.first.wait(10)
    ssh_pool.kill(host)
    t.join(10)
    (run,) = out
    assert run.error_kind == "disconnected", run.error
