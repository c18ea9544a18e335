"""Real OpenSSH sshd hosts for tests: a session-wide pool of shared hosts plus private ones.

Shared hosts (the default) are reused across tests with the same options, so a test must not
kill them, change their host keys or rely on their runner cache being empty (use
``host.clear_runner_cache()``). Ask for ``exclusive=True`` hosts to do any of that: they are
stopped at the end of the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cronium_fab.testing.hosts import DevHost, DevHostError, DevHostPool, find_sshd


def require_sshd() -> None:
    """Skip the test when sshd is missing; with ``CI`` set, fail instead (CI must test SSH)."""
    try:
        find_sshd()
    except DevHostError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI: {e}", pytrace=False)
        pytest.skip(str(e))


class SharedHosts:
    """Hosts started on demand, grouped by their options, alive for the whole session."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._pools: dict[tuple[tuple[str, object], ...], DevHostPool] = {}

    def get(self, n: int, **opts: object) -> list[DevHost]:
        key = tuple(sorted(opts.items()))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = DevHostPool(self.base_dir / f"pool{len(self._pools)}")
        missing = n - len(pool.hosts)
        if missing > 0:
            pool.add_hosts(missing, **opts)  # type: ignore[arg-type]
        return pool.hosts[:n]

    def stop(self) -> None:
        for pool in self._pools.values():
            pool.stop()
        self._pools.clear()
