"""Connections against real sshd hosts: host key policy, authentication, unreachable hosts."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import paramiko
import pytest

from cronium_fab.remote import (
    AuthRefused,
    HostKeyChanged,
    HostKeyUnknown,
    HostTarget,
    HostUnreachable,
    KeyInvalid,
    SSHSettings,
    fingerprint,
    load_private_key,
    open_connection,
    record_host_key,
)
from cronium_fab.testing.hosts import DevHost, DevHostPool, generate_keypair
from cronium_fab.testing.procs import session_processes, wait_until
from tests.remote.conftest import host_target

pytestmark = pytest.mark.ssh


target = host_target


def settings(tmp_path: Path, policy: str = "strict", **kw: object) -> SSHSettings:
    return SSHSettings(
        host_key_policy=policy,  # type: ignore[arg-type]
        known_hosts_path=tmp_path / "kh" / "known_hosts",
        system_known_hosts=(),
        **kw,  # type: ignore[arg-type]
    )


def host_fingerprint(host: DevHost) -> str:
    import base64

    key_type, b64 = host.host_public_key.split()[:2]
    return fingerprint(paramiko.PKey.from_type_string(key_type, base64.b64decode(b64)))


def run(conn: object, cmd: str) -> bytes:
    chan = conn.transport.open_session()  # type: ignore[attr-defined]
    chan.exec_command(cmd)
    out = chan.makefile("rb").read()
    chan.recv_exit_status()
    chan.close()
    return out


def test_accept_new_records_key_then_strict_accepts_it(ssh_hosts, tmp_path, caplog):
    (host,) = ssh_hosts(1)
    s = settings(tmp_path, "accept-new")
    conn = open_connection(target(host), s)
    assert run(conn, "echo hi") == b"hi\n"
    conn.close()
    kh = s.known_hosts_path
    assert kh.read_text() == host.known_hosts_line() + "\n"
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    assert stat.S_IMODE(kh.parent.stat().st_mode) == 0o700
    assert host_fingerprint(host) in caplog.text
    conn = open_connection(target(host), settings(tmp_path, "strict"))
    assert conn.transport.is_authenticated()
    conn.close()


def test_strict_refuses_unknown_host_and_shows_its_fingerprint(ssh_hosts, tmp_path):
    (host,) = ssh_hosts(1)
    with pytest.raises(HostKeyUnknown) as e:
        open_connection(target(host), settings(tmp_path, "strict"))
    assert e.value.kind == "host-key-unknown"
    assert e.value.fingerprint == host_fingerprint(host)
    assert host.name in str(e.value)
    assert not (tmp_path / "kh" / "known_hosts").exists()


def test_system_known_hosts_is_trusted(ssh_hosts, tmp_path):
    (host,) = ssh_hosts(1)
    system = tmp_path / "ssh_known_hosts"
    system.write_text(host.known_hosts_line() + "\n")
    s = SSHSettings(known_hosts_path=tmp_path / "ours", system_known_hosts=(system,))
    open_connection(target(host), s).close()


def test_changed_host_key_is_refused_even_with_accept_new(ssh_hosts, ssh_pool: DevHostPool, tmp_path):
    (host,) = ssh_hosts(1, exclusive=True)
    old_fp = host_fingerprint(host)
    s = settings(tmp_path, "accept-new")
    open_connection(target(host), s).close()
    ssh_pool.regenerate_host_key(host)
    new_fp = host_fingerprint(host)
    with pytest.raises(HostKeyChanged) as e:
        open_connection(target(host), s)
    msg = str(e.value)
    assert e.value.kind == "host-key-changed"
    assert old_fp in msg and new_fp in msg and host.name in msg and "CHANGED" in msg
    assert (e.value.expected_fingerprint, e.value.actual_fingerprint) == (old_fp, new_fp)
    assert s.known_hosts_path.read_text().count("\n") == 1  # the new key was not recorded


def test_known_key_of_other_type_counts_as_changed(ssh_hosts, tmp_path):
    (host,) = ssh_hosts(1)
    s = settings(tmp_path, "accept-new")
    other = paramiko.ECDSAKey.generate()
    s.known_hosts_path.parent.mkdir(mode=0o700)
    s.known_hosts_path.write_text(f"[{host.address}]:{host.port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(HostKeyChanged):
        open_connection(target(host), s)


def test_record_host_key_then_strict_connects(ssh_hosts, tmp_path):
    (host,) = ssh_hosts(1)
    s = settings(tmp_path)
    rec = record_host_key(host.address, host.port, s)
    assert rec.fingerprint == host_fingerprint(host) and not rec.already_known
    assert record_host_key(host.address, host.port, s).already_known
    open_connection(target(host), s).close()


def test_record_host_key_refuses_changed_key_unless_replace(ssh_hosts, ssh_pool, tmp_path):
    (host,) = ssh_hosts(1, exclusive=True)
    s = settings(tmp_path)
    record_host_key(host.address, host.port, s)
    ssh_pool.regenerate_host_key(host)
    with pytest.raises(HostKeyChanged):
        record_host_key(host.address, host.port, s)
    rec = record_host_key(host.address, host.port, s, replace=True)
    assert rec.replaced and rec.fingerprint == host_fingerprint(host)
    assert s.known_hosts_path.read_text() == host.known_hosts_line() + "\n"
    open_connection(target(host), s).close()


def test_wrong_key_is_auth_refused(ssh_hosts, tmp_path):
    (host,) = ssh_hosts(1)
    other_key, _ = generate_keypair("ed25519")
    with pytest.raises(AuthRefused) as e:
        open_connection(target(host, private_key=other_key), settings(tmp_path, "accept-new"))
    assert e.value.kind == "auth-refused" and host.name in str(e.value)


def _transports_to(host: DevHost) -> list[paramiko.Transport]:
    """Live Paramiko transports of this process to ``host`` (a closed one's socket is gone)."""
    def port(t: paramiko.Transport) -> int | None:
        try:
            return t.getpeername()[1]
        except OSError:
            return None
    return [t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_alive()
            and port(t) == host.port]


@pytest.mark.parametrize("refusal", ["auth-refused", "host-key-unknown", "host-key-changed"])
def test_a_refused_connection_leaves_no_transport_nor_sshd_session(ssh_hosts, tmp_path, refusal):
    """A long-lived process (serve) that meets a refusal must not keep its transport: a thread,
    a socket and an sshd session on the host per refused run."""
    (host,) = ssh_hosts(1)
    s = settings(tmp_path, "accept-new" if refusal == "auth-refused" else "strict")
    key = None
    if refusal == "auth-refused":
        key, _ = generate_keypair("ed25519")
    elif refusal == "host-key-changed":
        _, other = generate_keypair("ed25519")
        s.known_hosts_path.parent.mkdir(parents=True, exist_ok=True)
        s.known_hosts_path.write_text(f"[{host.address}]:{host.port} {other}\n")
    with pytest.raises((AuthRefused, HostKeyUnknown, HostKeyChanged)) as e:
        open_connection(target(host, private_key=key), s)
    assert e.value.kind == refusal
    assert wait_until(lambda: not _transports_to(host), 5, 0.05), _transports_to(host)
    assert wait_until(lambda: not session_processes(host), 5, 0.05), session_processes(host)


def test_killed_host_is_unreachable_connection_refused(ssh_hosts, ssh_pool, tmp_path):
    (host,) = ssh_hosts(1, exclusive=True)
    ssh_pool.kill(host)
    with pytest.raises(HostUnreachable) as e:
        open_connection(target(host), settings(tmp_path, "accept-new"))
    assert e.value.kind == "connection-refused"


def test_unresolvable_name_is_unreachable_dns(tmp_path):
    t = HostTarget(name="nowhere", host="nonexistent.invalid", port=22, user="x", use_ssh_config=False)
    with pytest.raises(HostUnreachable) as e:
        open_connection(t, settings(tmp_path))
    assert e.value.kind == "dns"


@pytest.mark.parametrize(("key_type", "key_format"), [("ed25519", "openssh"), ("ecdsa", "openssh"),
                                                      ("ecdsa", "pem"), ("rsa", "openssh"), ("rsa", "pem")])
def test_key_texts_of_every_type_authenticate(ssh_hosts, tmp_path, key_type, key_format):
    (host,) = ssh_hosts(1)
    text = host.add_client_key(key_type, key_format)
    conn = open_connection(target(host, private_key=text), settings(tmp_path, "accept-new"))
    assert run(conn, "echo ok") == b"ok\n"
    conn.close()


def test_garbage_key_text_is_key_invalid():
    with pytest.raises(KeyInvalid):
        load_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")


def test_password_authentication(ssh_hosts, tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("password hosts need root (a throwaway user is created)")
    (host,) = ssh_hosts(1, password=True)
    t = target(host, user=host.password_user, private_key=None, password=host.password)
    conn = open_connection(t, settings(tmp_path, "accept-new"))
    assert run(conn, "id -un").strip() == host.password_user.encode()
    conn.close()
    with pytest.raises(AuthRefused):
        open_connection(target(host, user=host.password_user, private_key=None, password="wrong"),
                        settings(tmp_path, "accept-new"))


def test_ssh_config_alias_is_resolved(ssh_hosts, tmp_path):
    (host,) = ssh_hosts(1)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host web-alias\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n"
        f"  IdentityFile {host.private_key_path}\n"
    )
    s = settings(tmp_path, "accept-new", ssh_config_path=cfg)
    conn = open_connection(HostTarget(name="web", host="web-alias"), s)
    assert (conn.host, conn.port) == (host.address, host.port)
    assert run(conn, "echo via-alias") == b"via-alias\n"
    conn.close()


def test_connection_has_keepalive_nodelay_and_gcm(ssh_hosts, tmp_path):
    import socket

    (host,) = ssh_hosts(1)
    conn = open_connection(target(host), settings(tmp_path, "accept-new", keepalive_interval=7))
    assert conn.transport.packetizer._Packetizer__keepalive_interval == 7
    assert conn.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    # AES-GCM (no HMAC per packet) over Paramiko's default AES-CTR + HMAC
    assert conn.transport.local_cipher == conn.transport.remote_cipher == "aes128-gcm@openssh.com"
    conn.close()


def test_connections_do_not_share_connect_kwargs(ssh_hosts, tmp_path):
    hosts = ssh_hosts(2)
    s = settings(tmp_path, "accept-new")
    conns = [open_connection(target(h), s) for h in hosts]
    assert conns[0].connect_kwargs is not conns[1].connect_kwargs
    assert all("key_filename" not in c.connect_kwargs for c in conns)
    for c in conns:
        c.close()


def test_a_global_request_returns_its_own_answer_even_when_a_key_exchange_wakes_it(ssh_hosts, tmp_path):
    """Paramiko ends a global request's wait on one event that a completed key exchange also sets,
    and then returns the previous answer. Here something sets that event over and over (as
    re-keys would) while requests run: each must still get the server's answer to itself."""
    import threading
    import time

    (host,) = ssh_hosts(1)
    conn = open_connection(target(host), settings(tmp_path, "accept-new"))
    transport = conn.transport
    stop = threading.Event()

    def spurious_wakeups() -> None:
        while not stop.is_set():
            event = transport.completion_event
            if event is not None:
                event.set()
            time.sleep(0.0005)

    waker = threading.Thread(target=spurious_wakeups, daemon=True)
    waker.start()
    try:
        for _ in range(20):
            port = transport.global_request("tcpip-forward", ("127.0.0.1", 0), wait=True)
            assert port is not None                       # sshd grants it: a message with the port
            allocated = port.get_int()
            assert 1024 <= allocated <= 65535
            # an unknown request: sshd answers FAILURE (None), never the port message above
            assert transport.global_request("no-such-request@cronium", wait=True) is None
            assert transport.global_request("cancel-tcpip-forward", ("127.0.0.1", allocated), wait=True) is not None
    finally:
        stop.set()
        waker.join()
        conn.close()
