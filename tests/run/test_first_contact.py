"""First contact on real sshd hosts: the mistakes a new user makes get a straight answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from cronium_fab.db.models import Execution, Job, Log
from cronium_fab.execute import RunRequest, run_event
from cronium_fab.testing.factories import add_event
from tests.run.conftest import ROOT, Fleet, trust


def _cli(fleet: Fleet, args: list[str], cwd: Path, program: str = "cronium_fab",
         **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cronium_fab", *args] if program == "cronium_fab" else [program, *args]
    return subprocess.run(cmd, env=dict(fleet.env(), CRONIUM_FAB_WORKER="off", **env), capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def _rows(fleet: Fleet) -> tuple[int, int, int]:
    with fleet.db.session() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) or 0 for m in (Job, Log, Execution))  # type: ignore[return-value]


def test_known_hosts_add_takes_several_hosts_and_an_event(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b, c = ssh_hosts(3, exclusive=True)
    ids = [fleet.add(h, name, trusted=False) for h, name in ((a, "demo-1"), (b, "demo-2"), (c, "demo-3"))]
    out = _cli(fleet, ["known-hosts-add", "demo-1", "demo-2", "--yes"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("SHA256:") == 2 and "recorded 2 key(s)" in out.stderr
    ev = add_event(fleet.db, content="echo ok", servers=ids)
    out = _cli(fleet, ["known-hosts-add", "--event", str(ev)], tmp_path)   # not a terminal: shows, refuses
    assert out.returncode == 2 and "pass --yes" in out.stderr
    assert out.stderr.count("SHA256:") == 3 and out.stderr.count("(already recorded)") == 2
    out = _cli(fleet, ["known-hosts-add", "--event", str(ev), "--yes"], tmp_path)
    assert out.returncode == 0 and "recorded 1 key(s)" in out.stderr
    assert run_event(fleet.settings, RunRequest(event_id=ev), out=None).status == "SUCCESS"


def test_known_hosts_add_refuses_all_when_one_key_changed(fleet: Fleet, ssh_hosts, ssh_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = ssh_hosts(2, exclusive=True)
    fleet.add(a, "keep")
    fleet.add(b, "new", trusted=False)
    ssh_pool.regenerate_host_key(a)
    before = fleet.settings.known_hosts.read_text()
    out = _cli(fleet, ["known-hosts-add", "keep", "new", "--yes"], tmp_path)
    assert out.returncode == 2 and "keep" in out.stderr and "--replace" in out.stderr and "nothing recorded" in out.stderr
    assert fleet.settings.known_hosts.read_text() == before


def test_failed_host_says_exit_code_and_last_stderr_line(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    ev = fleet.event([host], "echo working; echo 'warning: low disk' >&2; echo 'fatal: no such table' >&2; exit 7")
    out = _cli(fleet, ["run-event", "--id", str(ev), "--json"], tmp_path)
    assert out.returncode == 1
    h = json.loads(out.stdout)["hosts"][0]
    assert h["error"] == "exit code 7: fatal: no such table"
    assert f"  {host.name}: exit code 7: fatal: no such table" in out.stderr   # the summary says why
    with fleet.db.session() as s:
        assert s.scalars(select(Execution.error)).one() == "exit code 7: fatal: no such table"


def test_typo_of_a_server_is_refused_before_any_row(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    ev = fleet.event(hosts, "echo ok", names=["demo-1", "demo-2"])
    out = _cli(fleet, ["run-event", "--id", str(ev), "--hosts", "demo-9", "--json"], tmp_path)
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ERROR" and "did you mean demo-1 or demo-2?" in doc["error"]
    assert "neither one of your servers nor a host that resolves" in out.stderr
    assert _rows(fleet) == (0, 0, 0)


def test_fab_dash_i_key_is_used_and_missing_keys_are_named(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1, exclusive=True)
    trust(fleet.settings, host)
    key = tmp_path / "deploy_key"
    key.write_text(host.add_client_key())
    key.chmod(0o600)
    home = tmp_path / "home"   # no ~/.ssh keys and no agent: only -i can authenticate
    home.mkdir()
    ev = add_event(fleet.db, content="echo reached")
    dest = f"{host.user}@{host.address}:{host.port}"
    env = {"HOME": str(home), "SSH_AUTH_SOCK": ""}
    fab = str(Path(sys.executable).parent / "fab")
    out = _cli(fleet, ["-i", str(key), "-H", dest, "run-event", "--id", str(ev), "--json"], ROOT, program=fab, **env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hosts"][0]["stdout"] == "reached\n"
    out = _cli(fleet, ["run-event", "--id", str(ev), "--hosts", dest, "--json"], tmp_path, **env)
    h = json.loads(out.stdout)["hosts"][0]
    assert h["status"] == "unreachable" and h["error_kind"] == "auth-refused"
    assert "no key file" in h["error"] and "-i KEY" in h["error"], h["error"]
    out = _cli(fleet, ["-i", str(key), "run-event", "--id", str(ev), "--hosts", dest], tmp_path, **env)
    assert out.returncode == 0, out.stderr   # cronium-fab takes -i as fab does
