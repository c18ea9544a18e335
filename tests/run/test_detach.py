"""Handing a process over on purpose (docs/RUNNER.md): ``cronium.detach CMD`` outlives the run and
its work dir; every other process the script leaves (``nohup x &``, ``setsid x &``) is still killed.
On real sshd, with the host's python3 and with the oldest one we support (3.8)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from cronium_fab.execute import RunRequest, run_event
from cronium_fab.testing.procs import procs_with, wait_until
from tests.run.conftest import Fleet

pytestmark = pytest.mark.ssh
OLD_PYTHON = "/root/.pyenv/versions/3.8.18/bin/python3.8"


def _cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def _env(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
    return {k.decode(): v.decode() for k, v in pairs}


def _kill(pids: list[int]) -> None:
    for p in pids:
        os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("python", ["system", "3.8"])
def test_a_detached_process_survives_the_run_and_the_others_do_not(fleet: Fleet, ssh_hosts, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   python: str) -> None:
    if python == "3.8" and not os.path.exists(OLD_PYTHON):
        pytest.fail(f"{OLD_PYTHON} is missing")
    (host,) = ssh_hosts(1, **({"python3": OLD_PYTHON} if python == "3.8" else {}))
    tag = f"cfab-detach-{os.getpid()}-{time.monotonic_ns()}"
    log = tmp_path / "service.log"
    script = (
        f'cronium.detach --log {log} bash -c \'echo "service up in $PWD"; exec -a "{tag}-keptA" sleep 300\'\n'
        f'cronium_detach bash -c \'exec -a "{tag}-keptB" sleep 301\' >/dev/null\n'
        # a command that daemonizes itself: it forks and exits at once (sh -c 'x &', redis --daemonize)
        f'cronium.detach bash -c \'(exec -a "{tag}-daemon" sleep 305) & exit 0\' >/dev/null\n'
        'sleep 0.5\n'
        f'nohup bash -c \'exec -a "{tag}-nohup" sleep 302\' >/dev/null 2>&1 &\n'
        f'setsid bash -c \'exec -a "{tag}-setsid" sleep 303\' &\n'
        f'( trap "" TERM HUP; exec -a "{tag}-stubborn" sleep 304 ) &\n'
        'echo "work dir $CRONIUM_WORK_DIR"\n'
    )
    ev = fleet.event([host], script)
    result = run_event(fleet.settings, RunRequest(event_id=ev), out=None)
    h = result.hosts[0]
    kept: list[int] = []
    try:
        assert result.status == "SUCCESS", h.to_dict()
        pid_line = h.stdout.splitlines()[0]
        assert pid_line.isdigit(), h.stdout             # cronium.detach prints the pid
        workdir = h.stdout.split("work dir ", 1)[1].split()[0]
        # the runner killed everything else the script left behind ...
        for name in ("nohup", "setsid", "stubborn"):
            assert wait_until(lambda n=name: not procs_with(f"{tag}-{n}"), 10), f"{name} survived the run"
        # ... removed the work dir, and left the handed-over processes alone
        assert not os.path.exists(workdir)
        kept = procs_with(f"{tag}-keptA") + procs_with(f"{tag}-keptB")
        assert len(set(kept)) == 2, kept
        assert int(pid_line) in kept
        time.sleep(1)       # still there a moment later (nothing is killing them slowly)
        assert all(procs_with(f"{tag}-{n}") for n in ("keptA", "keptB", "daemon"))
        (daemon,) = procs_with(f"{tag}-daemon")         # its launcher is gone, it was not killed
        assert os.getsid(daemon) != os.getsid(os.getpid())
        for pid in kept:
            assert os.getsid(pid) == pid                        # its own session
            assert not _cwd(pid).startswith(workdir)            # not in the removed work dir
            env = _env(pid)
            assert not [k for k in env if k.startswith("CRONIUM_")], env   # no run context, no tokens
            assert workdir not in "".join(env.values())
        assert wait_until(lambda: "service up in" in log.read_text() if log.exists() else False, 10)
    finally:
        _kill(procs_with(f"{tag}-keptA") + procs_with(f"{tag}-daemon"))


def test_detach_errors_are_clear_and_leave_nothing(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    script = ('cronium.detach; echo "none=$?"\n'
              'cronium.detach --log relative.log true; echo "relative=$?"\n'
              'cronium.detach /no/such/program; echo "missing=$?"\n')
    ev = fleet.event([host], script)
    h = run_event(fleet.settings, RunRequest(event_id=ev), out=None).hosts[0]
    assert "none=2" in h.stdout and "relative=2" in h.stdout and "missing=127" in h.stdout, h.stdout
    assert "usage: cronium.detach" in h.stderr
    assert "absolute path" in h.stderr
    assert "/no/such/program: No such file or directory" in h.stderr
