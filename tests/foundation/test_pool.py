"""The bookkeeping of ``ConnectionPool`` (pure logic; what it does with real sshd connections is in
tests/run/test_keep_connections.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cronium_fab.remote.connection import HostTarget, SSHSettings
from cronium_fab.remote.pool import ConnectionPool, pool_key


class FakeSock:
    def __init__(self) -> None:
        self.timeout = 0.1

    def settimeout(self, seconds: float) -> None:
        self.timeout = seconds


class FakeTransport:
    def __init__(self) -> None:
        self.active = True
        self.sock = FakeSock()

    def is_active(self) -> bool:
        return self.active


@dataclass
class FakeConn:
    name: str
    transport: FakeTransport | None = None
    closed: bool = False
    reusable: bool = True
    gateway: object = None

    def __post_init__(self) -> None:
        self.transport = FakeTransport()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.active = False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pool_of(clock: Clock, **kw: float) -> ConnectionPool:
    return ConnectionPool(clock=clock, **kw)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def trusted_and_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host key check and the round trip need a real server (tests/run/test_keep_connections.py);
    here every live fake connection passes them."""
    from cronium_fab.remote import pool

    monkeypatch.setattr(pool, "_host_key_still_known", lambda conn, settings: True)
    monkeypatch.setattr(pool, "_answers", lambda conn, timeout: conn.transport.is_active())


S = SSHSettings(known_hosts_path=Path("/nonexistent/known_hosts"))


def test_key_separates_destinations_credentials_and_settings(tmp_path: Path) -> None:
    base = HostTarget(name="web1", host="10.0.0.1", port=22, user="ops", private_key="SECRET-KEY-TEXT")
    k = pool_key(base, S)
    assert pool_key(base, S) == k
    assert pool_key(HostTarget(name="other name", host="10.0.0.1", port=22, user="ops",
                               private_key="SECRET-KEY-TEXT"), S) == k   # the display name does not matter
    for changed in (dict(host="10.0.0.2"), dict(port=2222), dict(user="root"), dict(private_key="OTHER"),
                    dict(password="pw"), dict(key_passphrase="pp"), dict(use_ssh_config=False)):
        t = HostTarget(**{**dict(name="web1", host="10.0.0.1", port=22, user="ops",  # type: ignore[arg-type]
                                 private_key="SECRET-KEY-TEXT"), **changed})
        assert pool_key(t, S) != k, changed
    assert pool_key(base, SSHSettings(known_hosts_path=S.known_hosts_path, host_key_policy="accept-new")) != k
    key_file = tmp_path / "id_ed25519"
    key_file.write_text("one")
    by_file = HostTarget(name="web1", host="10.0.0.1", key_files=(str(key_file),))
    before = pool_key(by_file, S)
    key_file.write_text("another key")   # replaced on disk: same path, new content
    assert pool_key(by_file, S) != before


def test_ssh_config_entry_is_part_of_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text("Host web\n  HostName 10.0.0.1\n  User ops\n")
    settings = SSHSettings(known_hosts_path=S.known_hosts_path, ssh_config_path=cfg)
    target = HostTarget(name="web", host="web")
    before = pool_key(target, settings)
    cfg.write_text("Host web\n  HostName 10.0.0.2\n  User ops\n")
    import os
    os.utime(cfg, ns=(1, 1))   # a new mtime for the config cache
    assert pool_key(target, settings) != before
    assert pool_key(HostTarget(name="web", host="web", use_ssh_config=False), settings) != before


def test_take_gives_back_the_most_recent_live_connection(clock: Clock) -> None:
    pool = pool_of(clock)
    a, b = FakeConn("a"), FakeConn("b")
    pool.opened(a)
    pool.opened(b)
    pool.give("k", a)
    clock.now += 1
    pool.give("k", b)
    assert pool.take("other", S) is None
    assert pool.take("k", S) is b
    b.transport.active = False   # type: ignore[union-attr]
    pool.give("k", b)            # dead: closed, not kept
    assert b.closed and len(pool) == 1
    a.transport.active = False   # type: ignore[union-attr]
    assert pool.take("k", S) is None and a.closed and pool.dropped == 1


def test_a_silent_connection_takes_the_others_kept_for_its_host_along(
        clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    from cronium_fab.remote import pool as pool_mod

    pool = pool_of(clock)
    conns = [FakeConn(str(i)) for i in range(3)]
    for c in conns:
        pool.give("k", c)
    other = FakeConn("other host")
    pool.give("k2", other)
    asked: list[str] = []
    monkeypatch.setattr(pool_mod, "_answers", lambda conn, timeout: asked.append(conn.name) or False)
    assert pool.take("k", S) is None
    assert asked == ["2"] and all(c.closed for c in conns) and pool.dropped == 3   # one round trip, not three
    assert not other.closed and len(pool) == 1


def test_a_connection_marked_not_reusable_or_through_a_jump_host_is_closed_not_kept(clock: Clock) -> None:
    pool = pool_of(clock)
    marked, jumped = FakeConn("marked", reusable=False), FakeConn("jumped", gateway=object())
    pool.give("k", marked)
    pool.give("k", jumped)
    assert marked.closed and jumped.closed and len(pool) == 0


def test_idle_time_and_age_bound_reuse(clock: Clock) -> None:
    pool = pool_of(clock, idle_s=10, max_age_s=100)
    a = FakeConn("a")
    pool.opened(a)
    pool.give("k", a)
    clock.now += 11
    assert pool.take("k", S) is None and a.closed        # idle too long
    b = FakeConn("b")
    pool.opened(b)
    for _ in range(12):                                   # used every 9 s: never idle too long ...
        clock.now += 9
        pool.give("k", b)
        if pool.take("k", S) is None:
            break
    assert b.closed and clock.now - 1000 - 11 >= 100      # ... but retired at its age
    c = FakeConn("c")
    pool.opened(c)
    clock.now += 95
    pool.give("k", c)                                     # kept at 95 s of age ...
    clock.now += 6
    assert pool.take("k", S) is None and c.closed         # ... too old when taken at 101 s


def test_sweep_closes_expired_and_dead_connections_only(clock: Clock) -> None:
    pool = pool_of(clock, idle_s=10)
    old, dead, fresh = FakeConn("old"), FakeConn("dead"), FakeConn("fresh")
    pool.give("k1", old)
    clock.now += 8
    pool.give("k2", dead)
    pool.give("k2", fresh)
    dead.transport.active = False   # type: ignore[union-attr]
    clock.now += 3
    assert pool.sweep() == 2
    assert old.closed and dead.closed and not fresh.closed and len(pool) == 1


def test_at_most_max_idle_are_kept_oldest_go_first(clock: Clock) -> None:
    pool = pool_of(clock, max_idle=2)
    conns = [FakeConn(str(i)) for i in range(3)]
    for i, c in enumerate(conns):
        clock.now += 1
        pool.give(f"k{i}", c)
    assert [c.closed for c in conns] == [True, False, False] and len(pool) == 2


def test_close_closes_idle_ones_and_those_given_back_later(clock: Clock) -> None:
    pool = pool_of(clock)
    idle, out = FakeConn("idle"), FakeConn("out")
    pool.give("k", idle)
    pool.close()
    assert idle.closed and len(pool) == 0
    pool.give("k", out)
    assert out.closed and len(pool) == 0


def test_an_idle_connection_s_thread_polls_slowly_a_taken_one_at_paramiko_s_pace(clock: Clock) -> None:
    from cronium_fab.remote.pool import BUSY_POLL_S, IDLE_POLL_S

    pool = pool_of(clock)
    c = FakeConn("c")
    pool.give("k", c)
    assert c.transport.sock.timeout == IDLE_POLL_S   # type: ignore[union-attr]
    assert pool.take("k", S) is c
    assert c.transport.sock.timeout == BUSY_POLL_S   # type: ignore[union-attr]


def test_max_idle_fits_the_open_files_limit() -> None:
    import subprocess
    import sys

    # in a child with a soft limit of 100 and a hard one of 200: raised to 200, half of it kept
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200));"
            "from cronium_fab.remote.pool import max_idle_for_fds; n = max_idle_for_fds();"
            "print(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["100", "200"]


def test_hosts_at_once_fit_the_open_files_limit() -> None:
    import subprocess
    import sys

    # soft 100, hard 200: raised to 200; 64 kept back, 6 per host: 22 hosts at once at most
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200));"
            "from cronium_fab.remote.pool import hosts_at_once_for_fds as f;"
            "print(f(128), f(10), f(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["22", "10", "1"]
