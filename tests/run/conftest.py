"""Fixtures for end-to-end runs: a signed runner, trusted dev hosts registered as servers."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from sqlalchemy import select

from cronium_fab.build import build_runner
from cronium_fab.db.engine import Database
from cronium_fab.db.models import Execution, Job, Log
from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name
from cronium_fab.settings import Settings
from cronium_fab.signing import load_private_key, sign_file
from cronium_fab.testing.factories import add_event, add_server
from cronium_fab.testing.hosts import DevHost
from cronium_fab.testing.procs import procs_with, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def signed_runner(tmp_path_factory: pytest.TempPathFactory, signing_keys: tuple[Path, Path]) -> Path:
    art = build_runner(ROOT / "runner", tmp_path_factory.mktemp("dist"))
    sign_file(art.path, load_private_key(signing_keys[0]))
    return art.path


def trust(settings: Settings, host: DevHost, address: str | None = None, port: int | None = None) -> None:
    """Record ``host``'s key, for its own address and port or for another way to it (a proxy)."""
    kind, b64 = host.host_public_key.split()[:2]
    key = paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
    settings.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    KnownHostsStore(settings.known_hosts).replace(host_entry_name(address or host.address, port or host.port), key)


# A script that prints the pid of its runner's parent: the sshd process of its SSH connection
# (OpenSSH forks one per connection and runs every session's command as its child).
CONN = "echo conn=$(cut -d' ' -f4 /proc/$PPID/stat)"


def alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@dataclass
class Fleet:
    db: Database
    settings: Settings

    def add(self, host: DevHost, name: str | None = None, *, ssh_key: str | None = None, trusted: bool = True) -> int:
        if trusted:
            trust(self.settings, host)
        return add_server(self.db, name or host.name, address=host.address, port=host.port, username=host.user,
                          ssh_key=ssh_key if ssh_key is not None else host.private_key_text)

    def event(self, hosts: list[DevHost], script: str, *, type: str = "BASH", names: list[str] | None = None,
              **kw: object) -> int:
        ids = [self.add(h, (names or [None] * len(hosts))[i]) for i, h in enumerate(hosts)]
        return add_event(self.db, type=type, content=script, servers=ids, **kw)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """Environment for running the cronium-fab / fab programs against this fleet."""
        s = self.settings
        return dict(
            os.environ,
            CRONIUM_DATABASE_URL=s.database_url,
            CRONIUM_FAB_DATA_DIR=str(s.data_dir),
            CRONIUM_FAB_SIGNING_KEY=str(s.signing_key),
            CRONIUM_FAB_PUBLIC_KEY=str(s.public_key),
            CRONIUM_FAB_RUNNER=str(s.runner_path),
            CRONIUM_FAB_PAYLOAD_DIR=str(s.payload_dir),
        )


@pytest.fixture
def fleet(db: Database, settings: Settings, signed_runner: Path) -> Fleet:
    return Fleet(db, settings.with_(runner_path=signed_runner, helper_mode="bundled"))


def start_long_run(fleet: Fleet, host: DevHost, program: list[str], env: dict[str, str],
                   cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """``program run-event`` of a script that sleeps under a unique name; returns once it started."""
    marker = f"cfab-long-{time.monotonic_ns()}"
    ev = fleet.event([host], f'echo started; exec -a "{marker}" sleep 120')
    proc = subprocess.Popen([*program, "run-event", "--id", str(ev)], env=env, stderr=subprocess.PIPE, text=True,
                            cwd=cwd)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            break
    return proc, marker


def wait_gone(marker: str, timeout: float = 5.0) -> list[int]:
    """Waits until no process has ``marker`` in its argv; returns those left."""
    wait_until(lambda: not procs_with(marker), timeout, interval=0.1)
    return procs_with(marker)


def assert_ctrl_c_cancels(fleet: Fleet, host: DevHost, program: list[str], env: dict[str, str], cwd: Path) -> None:
    """Ctrl-C of the controller program: exit 5, no remote process left, `cancelled` recorded."""
    proc, marker = start_long_run(fleet, host, program, env, cwd)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 5, rest
    assert "cancelled: the controller received SIGINT (Ctrl-C)" in rest    # the summary says why
    assert wait_gone(marker) == []
    with fleet.db.session() as s:
        execution = s.scalars(select(Execution)).one()
        assert execution.status == "cancelled"
        assert "SIGINT" in (execution.error or ""), execution.error
        assert s.scalars(select(Job)).one().status == "cancelled"
        assert s.scalars(select(Log)).one().status == "FAILURE"
