"""The dev sshd hosts themselves: isolation per host, clean stop, detached mode, missing sshd."""

from __future__ import annotations

import subprocess

import pytest

from cronium_fab.testing import hosts as devhosts
from cronium_fab.testing.hosts import DevHostError, load_state, running, start_hosts, stop_from_state
from tests.sshd import require_sshd

pytestmark = pytest.mark.ssh


def ssh(host, command: str) -> str:
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
         f"UserKnownHostsFile={host.dir / 'kh'}", "-i", str(host.private_key_path), "-p", str(host.port),
         f"{host.user}@{host.address}", command],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout


def test_hosts_are_isolated_and_stop_leaves_no_process(tmp_path):
    require_sshd()
    pool = start_hosts(2, tmp_path)
    try:
        for h in pool.hosts:
            (h.dir / "kh").write_text(h.known_hosts_line() + "\n")  # OpenSSH agrees with our line
        a, b = pool.hosts
        assert a.address != b.address
        assert ssh(a, 'echo "$XDG_CACHE_HOME $TMPDIR $HOME"').split() == [str(a.cache_dir), str(a.tmp_dir), str(a.home_dir)]
        assert ssh(b, "echo $XDG_CACHE_HOME").strip() == str(b.cache_dir)
        pids = [h.pid for h in pool.hosts]
    finally:
        pool.stop()
    assert running(pool.hosts) == []
    assert all(b"sshd" not in _cmdline(p) for p in pids)


def _cmdline(pid: int | None) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_detached_hosts_survive_in_state_and_stop_from_state(tmp_path):
    require_sshd()
    pool = start_hosts(2, tmp_path, detach=True)
    hosts = load_state(tmp_path)
    assert [(h.name, h.port, h.pid) for h in hosts] == [(h.name, h.port, h.pid) for h in pool.hosts]
    assert len(running(hosts)) == 2
    # the state file holds private key text: never readable by other users
    assert (tmp_path / "devhosts.json").stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_mode & 0o777 == 0o700
    assert stop_from_state(tmp_path) == 2
    assert running(hosts) == []
    assert load_state(tmp_path) == []
    assert not any(h.dir.exists() for h in hosts)


def test_missing_sshd_says_what_to_install(monkeypatch):
    monkeypatch.setattr(devhosts, "SSHD", "/nonexistent/sshd")
    monkeypatch.setattr(devhosts.shutil, "which", lambda name, **kw: None)
    with pytest.raises(DevHostError, match="apt-get install -y openssh-server"):
        devhosts.find_sshd()
