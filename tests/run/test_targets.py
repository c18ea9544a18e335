"""Targets: -H values that are servers, SSH destinations, ~/.ssh/config aliases; --parallel; known-hosts-add."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cronium_fab.execute import RunRequest, run_event
from cronium_fab.testing.factories import add_event
from tests.run.conftest import Fleet, trust

pytestmark = pytest.mark.ssh


def _cli(fleet: Fleet, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cronium_fab", *args], env=dict(fleet.env(), **env),
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_hosts_option_uses_server_record_by_name_or_address(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    a, b = ssh_hosts(2)
    sa, _sb = fleet.add(a, "alpha"), fleet.add(b, "beta")
    ev = add_event(fleet.db, content="echo $CRONIUM_SERVER_NAME", servers=[sa])
    result = run_event(fleet.settings, RunRequest(event_id=ev, hosts=["beta", a.address]), out=None)
    assert [(h.name, h.status, h.stdout) for h in result.hosts] == [("beta", "success", "beta\n"),
                                                                    ("alpha", "success", "alpha\n")]


def test_ssh_destination_and_config_alias_use_default_keys(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    trust(fleet.settings, host)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text(host.private_key_text)
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    (home / ".ssh" / "config").write_text(
        f"Host web-alias\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n"
        f"  IdentityFile {home / '.ssh' / 'id_ed25519'}\n")
    ev = add_event(fleet.db, content="echo reached")
    for dest in ("web-alias", f"{host.user}@{host.address}:{host.port}"):
        out = _cli(fleet, ["run-event", "--id", str(ev), "--hosts", dest, "--json"], tmp_path, HOME=str(home))
        assert out.returncode == 0, out.stderr
        h = json.loads(out.stdout)["hosts"][0]
        assert (h["name"], h["status"], h["stdout"], h["server_id"]) == (dest, "success", "reached\n", None)


def test_parallel_one_runs_hosts_one_after_another(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    hosts = ssh_hosts(2)
    script = "import time\ns = time.time()\ntime.sleep(0.5)\ncronium.output([s, time.time()])"
    ev = fleet.event(hosts, script, type="PYTHON")
    result = run_event(fleet.settings, RunRequest(event_id=ev, parallel=1), out=None)
    (s1, e1), (s2, e2) = sorted(h.output for h in result.hosts)
    assert e1 <= s2


def test_unknown_host_is_refused_under_strict_and_known_hosts_add_records_it(fleet: Fleet, ssh_hosts,  # type: ignore[no-untyped-def]
                                                                              tmp_path: Path) -> None:
    (host,) = ssh_hosts(1)
    sid = fleet.add(host, trusted=False)
    ev = add_event(fleet.db, content="echo ok", servers=[sid])
    first = run_event(fleet.settings, RunRequest(event_id=ev), out=None)
    assert first.hosts[0].status == "unreachable" and first.hosts[0].error_kind == "host-key-unknown"
    out = _cli(fleet, ["known-hosts-add", f"{host.address}:{host.port}", "--yes"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "SHA256:" in out.stderr
    again = run_event(fleet.settings, RunRequest(event_id=ev), out=None)
    assert again.status == "SUCCESS"


def test_accept_new_records_first_key(fleet: Fleet, ssh_hosts) -> None:  # type: ignore[no-untyped-def]
    (host,) = ssh_hosts(1)
    sid = fleet.add(host, trusted=False)
    ev = add_event(fleet.db, content="echo ok", servers=[sid])
    result = run_event(fleet.settings.with_(host_key_policy="accept-new"), RunRequest(event_id=ev), out=None)
    assert result.status == "SUCCESS"
    assert host.host_public_key.split()[1] in fleet.settings.known_hosts.read_text()


def test_known_hosts_add_by_server_name_refuses_changed_key_without_replace(fleet: Fleet, ssh_hosts, ssh_pool,  # type: ignore[no-untyped-def]
                                                                          tmp_path: Path) -> None:
    (host,) = ssh_hosts(1, exclusive=True)
    sid = fleet.add(host, "named-server", trusted=False)
    ev = add_event(fleet.db, content="echo ok", servers=[sid])
    out = _cli(fleet, ["known-hosts-add", "named-server"], tmp_path)  # stdin is not a terminal
    assert out.returncode == 2 and "pass --yes" in out.stderr and "SHA256:" in out.stderr
    assert _cli(fleet, ["known-hosts-add", "named-server", "--yes"], tmp_path).returncode == 0
    ssh_pool.regenerate_host_key(host)
    changed = run_event(fleet.settings, RunRequest(event_id=ev), out=None).hosts[0]
    assert changed.error_kind == "host-key-changed" and "known-hosts-add" in (changed.error or "")
    out = _cli(fleet, ["known-hosts-add", f"[{host.address}]:{host.port}", "--yes"], tmp_path)
    assert out.returncode == 2 and "--replace" in out.stderr
    out = _cli(fleet, ["known-hosts-add", f"[{host.address}]:{host.port}", "--yes", "--replace"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert run_event(fleet.settings, RunRequest(event_id=ev), out=None).status == "SUCCESS"


def test_proxyjump_hop_is_verified_and_used(fleet: Fleet, ssh_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    jump, target = ssh_hosts(2)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    for h in (jump, target):
        (home / ".ssh" / h.name).write_text(h.private_key_text)
        (home / ".ssh" / h.name).chmod(0o600)
    (home / ".ssh" / "config").write_text(
        f"Host behind-jump\n  HostName {target.address}\n  Port {target.port}\n  User {target.user}\n"
        f"  IdentityFile {home / '.ssh' / target.name}\n  ProxyJump {jump.user}@{jump.address}:{jump.port}\n"
        f"Host {jump.address}\n  IdentityFile {home / '.ssh' / jump.name}\n")
    ev = add_event(fleet.db, content="echo via-jump")
    trust(fleet.settings, target)  # the jump host is not trusted yet: strict must refuse it
    out = _cli(fleet, ["run-event", "--id", str(ev), "--hosts", "behind-jump", "--json"], tmp_path, HOME=str(home))
    h = json.loads(out.stdout)["hosts"][0]
    assert h["status"] == "unreachable" and h["error_kind"] == "host-key-unknown" and "jump host" in h["error"]
    trust(fleet.settings, jump)
    out = _cli(fleet, ["run-event", "--id", str(ev), "--hosts", "behind-jump", "--json"], tmp_path, HOME=str(home))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hosts"][0]["stdout"] == "via-jump\n"
