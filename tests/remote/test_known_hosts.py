"""The known_hosts store answers as Paramiko's HostKeys does (and as OpenSSH reads the file),
from an index: plain names, names hashed by ``ssh-keygen -H``, several keys per host, bad lines."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import paramiko
import pytest

from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name
from cronium_fab.testing.hosts import generate_keypair


def _key_line() -> str:
    return generate_keypair("ed25519")[1].strip()


def _paramiko_lookup(path: Path, name: str) -> dict[str, str]:
    """Paramiko's answer for the same file (whose load fails on a broken key: that line left out)."""
    clean = path.with_name("paramiko-" + path.name)
    clean.write_text("".join(ln for ln in path.read_text().splitlines(True) if "not-base64!" not in ln))
    hk = paramiko.HostKeys(str(clean))
    entry = hk.lookup(name)
    return {t: k.get_base64() for t, k in entry.items()} if entry else {}


def _ours(store: KnownHostsStore, name: str) -> dict[str, str]:
    return {t: k.get_base64() for t, k in store.lookup(name).items()}


def _fleet_file(path: Path, n: int, *, broken: bool = True) -> list[str]:
    names = [host_entry_name(f"10.0.{i // 250}.{i % 250 + 1}", 22 if i % 2 else 2200) for i in range(n)]
    lines = [f"{name} {_key_line()}" for name in names]
    ecdsa = generate_keypair("ecdsa")[1].strip()
    lines.insert(3, f"{names[5]},alias-5 {ecdsa}")                  # a second key type, two names
    lines.insert(7, f"{names[5]} {_key_line()}")                     # a later ed25519: the first wins
    lines[10:10] = ["# a comment", ""]
    if broken:   # OpenSSH skips such lines (ssh-keygen -H refuses the file)
        lines[12:12] = ["garbage", f"{names[9]} ssh-ed25519 not-base64!"]
    path.write_text("\n".join(lines) + "\n")
    return names


def test_lookups_match_paramiko_for_every_host_of_a_fleet(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    names = _fleet_file(path, 60)
    store = KnownHostsStore(path)
    for name in [*names, "alias-5", "10.9.9.9", "[10.0.0.1]:22"]:
        assert _ours(store, name) == _paramiko_lookup(path, name), name
    assert set(_ours(store, names[5])) == {"ssh-ed25519", "ecdsa-sha2-nistp256"}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (OpenSSH) is not installed")
def test_names_hashed_by_ssh_keygen_are_found(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    names = _fleet_file(path, 20, broken=False)
    plain = {name: _ours(KnownHostsStore(path), name) for name in names}
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    assert "|1|" in path.read_text()
    hashed = KnownHostsStore(path)
    for name in names:
        assert _ours(hashed, name) == plain[name] == _paramiko_lookup(path, name), name
    assert _ours(hashed, "10.9.9.9") == {}


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    store = KnownHostsStore(path)
    assert store.lookup("h1") == {}
    store.add("h1", paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(_key_line().split()[1])))
    assert set(store.lookup("h1")) == {"ssh-ed25519"}
    other = _key_line()
    path.write_text(f"h1 {other}\n")
    assert _ours(store, "h1") == {"ssh-ed25519": other.split()[1]}
