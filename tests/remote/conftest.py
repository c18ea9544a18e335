from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from cronium_fab.build import RunnerArtifact
from cronium_fab.remote import HostTarget, SSHSettings, fingerprint, open_connection
from cronium_fab.testing.hosts import DevHost
from tests.remote.fake_runner import build_fake_runner


def host_target(host: DevHost, **kw: object) -> HostTarget:
    args: dict[str, object] = {
        "name": host.name,
        "host": host.address,
        "port": host.port,
        "user": host.user,
        "private_key": host.private_key_text,
        "use_ssh_config": False,
    }
    args.update(kw)
    return HostTarget(**args)  # type: ignore[arg-type]


def host_fingerprint(host: DevHost) -> str:
    key_type, b64 = host.host_public_key.split()[:2]
    return fingerprint(paramiko.PKey.from_type_string(key_type, base64.b64decode(b64)))


@pytest.fixture
def connect(tmp_path: Path) -> Iterator[Callable[[DevHost], object]]:
    """Open a verified connection to a dev host (first key accepted); closed after the test."""
    settings = SSHSettings(host_key_policy="accept-new", known_hosts_path=tmp_path / "known_hosts",
                           system_known_hosts=())
    conns = []

    def factory(host: DevHost):
        conn = open_connection(host_target(host), settings)
        conns.append(conn)
        return conn

    yield factory
    for c in conns:
        c.close()


@pytest.fixture(scope="session")
def fake_runner(tmp_path_factory: pytest.TempPathFactory) -> RunnerArtifact:
    return build_fake_runner(tmp_path_factory.mktemp("fake-runner"))
