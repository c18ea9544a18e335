"""SSH fixtures (import from tests/conftest.py: ``pytest_plugins = ["tests.conftest_ssh"]``).

``ssh_hosts(n, exclusive=False, **opts)`` returns ``n`` running ``DevHost``s; ``opts`` are those of
``cronium_fab.testing.hosts.DevHostPool.add_hosts`` (``python3=""`` for a host without python3,
``key_type="rsa"``, ``allow_tcp_forwarding=False``, ``password=True``...). Shared hosts live for
the session; ``exclusive=True`` hosts come from ``ssh_pool``, this test's own pool, which the test
may use to ``kill``/``restart``/``regenerate_host_key`` them, and which is stopped afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from cronium_fab.testing.hosts import DevHost, DevHostPool
from tests.sshd import SharedHosts, require_sshd

SSHHostsFactory = Callable[..., list[DevHost]]


@pytest.fixture(scope="session")
def ssh_shared_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedHosts]:
    shared = SharedHosts(tmp_path_factory.mktemp("sshd-shared"))
    yield shared
    shared.stop()


@pytest.fixture
def ssh_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevHostPool]:
    """This test's private hosts (stopped, with their sessions, at the end of the test)."""
    require_sshd()
    pool = DevHostPool(tmp_path_factory.mktemp("sshd"))
    yield pool
    pool.stop()


@pytest.fixture
def ssh_hosts(ssh_shared_hosts: SharedHosts, ssh_pool: DevHostPool) -> SSHHostsFactory:
    def factory(n: int = 1, *, exclusive: bool = False, **opts: object) -> list[DevHost]:
        if exclusive:
            return ssh_pool.add_hosts(n, **opts)  # type: ignore[arg-type]
        return ssh_shared_hosts.get(n, **opts)

    return factory
