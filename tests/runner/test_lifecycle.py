"""Timeout, cancel (stdin EOF, signals, broken stdout), no orphans, workdir cleanup, limits."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import time

import pytest
from crnr_testlib import alive, decode, encode_input, header, payload, run_serve, serve

FORK_SETSID = r"""
import os, signal, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:
        print("gc", os.getpid(), flush=True)
        while True:
            time.sleep(1)
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("main", os.getpid(), flush=True)
time.sleep(1000)
"""


def _pids(out: bytes) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in re.findall(rb"(\w+) (\d+)", out)}


def _wait_gone(pids, within: float = 1.0) -> list[int]:
    end = time.monotonic() + within
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


@pytest.mark.timeout(60)
def test_timeout_kills_setsid_grandchild_ignoring_term(any_py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    t0 = time.monotonic()
    # timeout generous enough that a loaded machine still gets both pids printed before it
    s = run_serve(any_py, pyz, FORK_SETSID, "python", proc_env=env, timeout=4, kill_grace=1)
    took = time.monotonic() - t0
    pids = _pids(s.stdout)
    assert set(pids) == {"gc", "main"}, s.stdout
    r = s.result
    assert r["status"] == "timeout" and r["timed_out"] is True
    assert r["signal"] == signal.SIGKILL and r["exit_code"] is None
    assert _wait_gone(pids.values(), 0.1) == [], "orphans survived the timeout"
    assert took < 20
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(60)
def test_stdin_eof_stops_script_within_two_seconds(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    marks = {}

    def close_later(proc):
        time.sleep(1.0)
        marks["closed"] = time.monotonic()
        proc.stdin.close()

    p = payload(FORK_SETSID, "python")
    s = serve(py, pyz, encode_input(header(p, timeout=60, kill_grace=30), p), env=env,
              after_write=close_later)
    assert time.monotonic() - marks["closed"] < 2.0
    assert s.result["status"] == "cancelled" and s.result["error_kind"] == "cancelled"
    assert "stdin" in s.result["error"]
    assert _wait_gone(_pids(s.stdout).values(), 0.1) == []
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_runner_cancels(py, pyz, tmpdir_env, sig):
    env, tmp = tmpdir_env

    def signal_later(proc):
        time.sleep(1.0)
        proc.send_signal(sig)

    p = payload(FORK_SETSID, "python")
    s = serve(py, pyz, encode_input(header(p, timeout=60, kill_grace=30), p), env=env, after_write=signal_later)
    assert s.result["status"] == "cancelled" and sig.name in s.result["error"]
    assert _wait_gone(_pids(s.stdout).values(), 0.1) == []
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(60)
def test_broken_stdout_kills_tree_and_cleans(py, pyz, tmpdir_env, tmp_path):
    env, tmp = tmpdir_env
    pidfile = tmp_path / "pids"
    script = f"echo $$ > {pidfile}; sleep 1000 & echo $! >> {pidfile}; " \
             "while true; do echo spam; done"
    p = payload(script)
    proc = subprocess.Popen([py, pyz, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    proc.stdin.write(encode_input(header(p, timeout=60), p))
    proc.stdin.flush()
    proc.stdout.read(4096)
    proc.stdout.close()            # the controller stops reading: EPIPE on the next write
    assert proc.wait(timeout=15) == 0
    proc.stdin.close()
    pids = [int(x) for x in pidfile.read_text().split()]
    assert len(pids) == 2
    assert _wait_gone(pids, 0.5) == []
    assert list(tmp.iterdir()) == []


def test_background_leftovers_killed_after_exit(py, pyz):
    s = run_serve(py, pyz, "sleep 1000 & echo $!; setsid sleep 1001 </dev/null >/dev/null 2>&1 & exit 0")
    assert s.result["status"] == "success"
    assert _wait_gone([int(s.stdout)], 0.1) == []
    out = subprocess.run(["pgrep", "-f", "sleep 1001"], capture_output=True).stdout
    assert out == b""


@pytest.mark.parametrize("script,status", [
    ("echo ok", "success"), ("exit 3", "failure"), ("sleep 30", "timeout"),
])
def test_workdir_removed(py, pyz, tmpdir_env, script, status):
    env, tmp = tmpdir_env
    s = run_serve(py, pyz, f"echo $CRONIUM_WORK_DIR >&2; {script}", proc_env=env, timeout=1, kill_grace=0.5)
    assert s.result["status"] == status
    workdir = s.stderr_script.decode().strip()
    assert workdir.startswith(str(tmp)) and not os.path.exists(workdir)
    assert list(tmp.iterdir()) == []


def test_keep_workdir(py, pyz, tmpdir_env):
    env, tmp = tmpdir_env
    s = run_serve(py, pyz, "echo hi > made.txt; stat -c %a .", proc_env=env, keep_workdir=True)
    kept = s.result["workdir"]
    assert s.stdout == b"700\n"
    with open(os.path.join(kept, "made.txt")) as f:
        assert f.read() == "hi\n"
    assert os.path.isfile(os.path.join(kept, ".cronium", "context.json"))


def test_limit_file_size(py, pyz):
    s = run_serve(py, pyz, "head -c 100000 /dev/zero > big; echo rc=$?; stat -c %s big",
                  limits={"file_size_bytes": 4096})
    lines = s.stdout.decode().split()
    assert lines[0] != "rc=0" and int(lines[1]) <= 4096


def test_limit_open_files(py, pyz):
    script = "fs = []\ntry:\n    for i in range(100):\n        fs.append(open(__file__))\nexcept OSError as e:\n" \
             "    print('EMFILE', e.errno)\n"
    s = run_serve(py, pyz, script, "python", limits={"open_files": 16})
    assert s.stdout.decode().startswith("EMFILE 24")


@pytest.mark.timeout(60)
def test_limit_cpu_seconds(py, pyz):
    s = run_serve(py, pyz, "while True:\n    pass\n", "python", limits={"cpu_seconds": 1}, timeout=20)
    assert s.result["signal"] in (signal.SIGXCPU, signal.SIGKILL)
    assert s.result["usage"]["cpu_user_s"] + s.result["usage"]["cpu_sys_s"] >= 0.8


def test_limit_address_space(py, pyz):
    script = "try:\n    x = bytearray(512 * 1024 * 1024)\n    print('allocated')\nexcept MemoryError:\n    print('MemoryError')\n"
    s = run_serve(py, pyz, script, "python", limits={"address_space_bytes": 256 * 1024 * 1024})
    assert s.stdout == b"MemoryError\n"


def test_usage_reports_script_memory(py, pyz):
    s = run_serve(py, pyz, "x = bytearray(80 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])\n", "python")
    assert s.result["usage"]["max_rss_kb"] > 80 * 1024


def test_hello_comes_before_input(py, pyz):
    proc = subprocess.Popen([py, pyz, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first = proc.stdout.read(5)
    proc.stdin.close()   # controller gone before sending anything
    rest = proc.stdout.read()
    assert proc.wait(timeout=10) == 0
    hello, records, result = decode(first + rest)
    assert first == b"CRNRH" and hello["pid"] == proc.pid
    assert result["status"] == "cancelled"


# -- heartbeat (PROTOCOL.md §2 ``heartbeat``): both directions ------------------------------------

def _send_heartbeats(every: float, stop_after: float | None = None):
    def writer(proc):
        import threading

        def beat():
            end = None if stop_after is None else time.monotonic() + stop_after
            while proc.poll() is None and (end is None or time.monotonic() < end):
                try:
                    proc.stdin.write(b".")
                    proc.stdin.flush()
                except (BrokenPipeError, ValueError):
                    return
                time.sleep(every)
        threading.Thread(target=beat, daemon=True).start()
    return writer


@pytest.mark.timeout(60)
def test_controller_silence_cancels_and_cleans_up(py, pyz, tmpdir_env):
    """A controller that stops writing (frozen, or the network cut) while stdin stays open: the
    runner stops the script's whole tree, removes the work dir, and says why in a cancelled result."""
    env, tmp = tmpdir_env
    p = payload(FORK_SETSID, "python")
    t0 = time.monotonic()
    s = serve(py, pyz, encode_input(header(p, timeout=60, kill_grace=30,
                                           heartbeat={"interval": 0.3, "timeout": 1.5}), p), env=env,
              after_write=_send_heartbeats(0.3, stop_after=1.0))
    took = time.monotonic() - t0
    r = s.result
    assert r["status"] == "cancelled" and r["error_kind"] == "cancelled", r
    assert "controller silent for" in r["error"] and "heartbeat" in r["error"], r["error"]
    assert took < 30     # far from the 60 s timeout: the silence ended it
    assert _wait_gone(_pids(s.stdout).values(), 0.1) == [], "the script's tree survived the silence"
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(60)
def test_heartbeats_keep_a_quiet_script_alive_and_runner_sends_keepalives(py, pyz, tmpdir_env):
    """A script that prints nothing for several silence timeouts is not killed while the
    controller's heartbeats arrive; the runner sends K records while it is quiet."""
    env, tmp = tmpdir_env
    p = payload("sleep 7; echo done", "bash")
    # values that survive a loaded 2-core machine (a 1-2 s stall must not cut the run off)
    s = serve(py, pyz, encode_input(header(p, timeout=60, heartbeat={"interval": 1, "timeout": 5}), p),
              env=env, after_write=_send_heartbeats(0.5))
    assert s.result["status"] == "success", s.result
    assert s.stdout == b"done\n"
    keepalives = [r for r in s.records if r.kind == "K"]
    assert len(keepalives) >= 3, len(keepalives)   # ~7 s / 1 s, with room for a loaded machine
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(60)
def test_without_heartbeat_in_the_header_silence_is_fine(py, pyz, tmpdir_env):
    """No ``heartbeat`` asked for: a silent controller is not a reason to stop, and no K is sent."""
    env, _tmp = tmpdir_env
    s = run_serve(py, pyz, "sleep 2.5; echo ok", proc_env=env)
    assert s.result["status"] == "success" and s.stdout == b"ok\n"
    assert not [r for r in s.records if r.kind == "K"]


def _first_output_pid(out) -> int:
    """Read records (exactly) up to the first O record; the script printed its pid first."""
    assert out.read(4) == b"CRNR"
    while True:
        head = out.read(5)
        assert len(head) == 5, "runner ended before any output"
        body = out.read(struct.unpack(">I", head[1:])[0])
        if head[:1] == b"O":
            return int(body[8:].split(b"\n", 1)[0])


@pytest.mark.timeout(60)
def test_frozen_controller_not_reading_a_flood_still_stops_the_script(py, pyz, tmpdir_env):
    """A frozen controller neither writes nor reads: the runner's stdout fills up. The runner must
    not block on it for ever: the script's tree is stopped and the runner exits."""
    env, tmp = tmpdir_env
    p = payload("echo $$; exec yes flood", "bash")
    proc = subprocess.Popen([py, pyz, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(encode_input(header(p, timeout=60, heartbeat={"interval": 0.3, "timeout": 1.5}), p))
        proc.stdin.flush()
        pid = _first_output_pid(proc.stdout)   # the hello and the first output; then we read nothing
        assert alive(pid)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert _wait_gone([pid], 2.0) == [], "the script's tree survived"
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("hb", [{"interval": 0}, {"interval": 2, "timeout": 1}, "fast"])
def test_bad_heartbeat_is_a_protocol_error(py, pyz, hb):
    s = run_serve(py, pyz, "true", heartbeat=hb)
    assert s.rc == 3 and s.result["error_kind"] == "protocol" and "heartbeat" in s.result["error"]


@pytest.mark.timeout(90)
def test_a_slow_reader_sending_heartbeats_is_not_a_broken_stdout(py, pyz, tmpdir_env):
    """Back-pressure is not a frozen controller: stdout stays full for longer than the heartbeat
    timeout while the controller's heartbeats keep coming; the run ends normally, nothing lost."""
    env, tmp = tmpdir_env
    p = payload("head -c 1000000 /dev/zero | tr '\\0' x; echo; echo done", "bash")

    def slow(proc):
        _send_heartbeats(0.5)(proc)
        time.sleep(9)          # the reader reads nothing for three silence timeouts

    s = serve(py, pyz, encode_input(header(p, timeout=60, heartbeat={"interval": 1, "timeout": 3}), p),
              env=env, after_write=slow)
    assert s.result["status"] == "success", s.result
    assert s.stdout == b"x" * 1000000 + b"\ndone\n"
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(60)
def test_keepalives_continue_while_leftovers_are_stopped(py, pyz, tmpdir_env):
    """After the script: stopping a leftover that ignores SIGTERM takes the kill grace (2 s), and the
    runner keeps sending K records meanwhile (a controller must not take it for a frozen host)."""
    env, tmp = tmpdir_env
    p = payload('(trap "" TERM; exec sleep 100) >/dev/null 2>&1 &\necho started', "bash")
    s = serve(py, pyz, encode_input(header(p, timeout=60, heartbeat={"interval": 0.2, "timeout": 10}), p),
              env=env, after_write=_send_heartbeats(0.5))
    assert s.result["status"] == "success", s.result
    kinds = "".join(r.kind for r in s.records)
    after = kinds[kinds.index("O") + 1:]
    assert after.count("K") >= 3, kinds          # ~2 s / 0.2 s, with room for a loaded machine
    assert list(tmp.iterdir()) == []
