"""Where things live. Every path and default in one place, overridable by environment variables.

Paths that belong to a checkout (keys, dist, payloads) are relative to the working directory,
so `inv build sign` and `cronium-fab` agree when run from the project root; the Cronium backend
sets the ``CRONIUM_FAB_*`` variables (or its cwd) when it calls us.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import paths
from .errors import ConfigError

HOST_KEY_POLICIES = ("strict", "accept-new")
HELPER_MODES = ("auto", "api", "bundled")
# Liveness between controller and runner (PROTOCOL.md §2 ``heartbeat``), both ways: a sign of life
# every HEARTBEAT_INTERVAL seconds; a side silent for HEARTBEAT_TIMEOUT is gone.
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 10.0
KILL_GRACE = 5.0   # the runner's SIGTERM -> SIGKILL grace for a script's tree (header ``kill_grace``)
# hosts at once: enough to keep the controller busy over a real network (a host takes ~9 round trips:
# at 150 ms, 100 hosts took 6.3 s at 32 at once and 4.5 s at 100, Fabric 3.1 s), not so many that a
# run on one machine's loopback pays for the crowd (there 256 cost ~7% more than 32); see README
PARALLEL = 128
KEEP_CONNECTIONS = 300.0   # serve: idle seconds a host's SSH connection is kept for its next run


def default_data_dir() -> Path:
    return Path(paths.data_dir())


def default_database_url() -> str:
    return paths.database_url()


def _env_path(name: str, default: str | Path) -> Path:
    return Path(os.environ.get(name) or default).expanduser()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    if not raw.strip().isdigit():
        raise ConfigError(f"{name}={raw!r} is not a whole number")
    return int(raw)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None


def keep_connections_from_env() -> float:
    """``CRONIUM_FAB_KEEP_CONNECTIONS`` alone (the worker reads only this of the settings: every
    command it serves reads all of them from its caller's environment)."""
    keep = _env_float("CRONIUM_FAB_KEEP_CONNECTIONS", KEEP_CONNECTIONS)
    Settings(keep_connections=keep).validate()   # the same rule and message as for a command
    return keep


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=default_database_url)
    data_dir: Path = field(default_factory=default_data_dir)
    signing_key: Path = Path("keys/cosign.key")
    public_key: Path = Path("keys/cosign.pub")
    runner_path: Path = Path("dist/cronium-runner.pyz")
    runner_src: Path = Path("runner")
    payload_dir: Path = Path("payloads")
    host_key_policy: str = "strict"
    helper_mode: str = "auto"
    parallel: int = PARALLEL
    connect_timeout: float = 10.0
    connect_retry_delay: float = 1.0  # before the first retry of a refused/reset/timed-out connect
    setup_timeout: float = 60.0
    keepalive: float = 5.0
    # the controller gives up on a host this long after the runner's own timeout + kill grace should
    # have ended it (a frozen or cut-off peer)
    watchdog_margin: float = 30.0
    # liveness between controller and runner (both ways): a sign of life every interval; a side
    # silent for the timeout is gone (the runner stops its script, we end the host unresponsive)
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    api_secret: str | None = field(default=None, repr=False)  # HS256 secret for API-mode tokens
    # serve: seconds a host's connection is kept open after a clean run for the next run (0: never)
    keep_connections: float = KEEP_CONNECTIONS

    @property
    def known_hosts(self) -> Path:
        return Path(paths.known_hosts_path(str(self.data_dir)))

    @classmethod
    def from_env(cls) -> Settings:
        s = cls(
            database_url=os.environ.get("CRONIUM_DATABASE_URL") or default_database_url(),
            data_dir=default_data_dir(),
            signing_key=_env_path("CRONIUM_FAB_SIGNING_KEY", "keys/cosign.key"),
            public_key=_env_path("CRONIUM_FAB_PUBLIC_KEY", "keys/cosign.pub"),
            runner_path=_env_path("CRONIUM_FAB_RUNNER", "dist/cronium-runner.pyz"),
            runner_src=_env_path("CRONIUM_FAB_RUNNER_SRC", "runner"),
            payload_dir=_env_path("CRONIUM_FAB_PAYLOAD_DIR", "payloads"),
            host_key_policy=os.environ.get("CRONIUM_FAB_HOST_KEY_POLICY") or "strict",
            helper_mode=os.environ.get("CRONIUM_FAB_HELPER_MODE") or "auto",
            parallel=_env_int("CRONIUM_FAB_PARALLEL", PARALLEL),
            connect_timeout=_env_float("CRONIUM_FAB_CONNECT_TIMEOUT", 10.0),
            connect_retry_delay=_env_float("CRONIUM_FAB_CONNECT_RETRY_DELAY", 1.0),
            setup_timeout=_env_float("CRONIUM_FAB_SETUP_TIMEOUT", 60.0),
            watchdog_margin=_env_float("CRONIUM_FAB_WATCHDOG_MARGIN", 30.0),
            heartbeat_interval=_env_float("CRONIUM_FAB_HEARTBEAT", HEARTBEAT_INTERVAL),
            heartbeat_timeout=_env_float("CRONIUM_FAB_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT),
            api_secret=os.environ.get("CRONIUM_FAB_API_SECRET") or None,
            keep_connections=_env_float("CRONIUM_FAB_KEEP_CONNECTIONS", KEEP_CONNECTIONS),
        )
        s.validate()
        return s

    def with_(self, **changes: object) -> Settings:
        s = replace(self, **changes)  # type: ignore[arg-type]
        s.validate()
        return s

    def validate(self) -> None:
        if self.host_key_policy not in HOST_KEY_POLICIES:
            raise ConfigError(
                f"host key policy {self.host_key_policy!r} is not one of {', '.join(HOST_KEY_POLICIES)}"
            )
        if self.helper_mode not in HELPER_MODES:
            raise ConfigError(f"helper mode {self.helper_mode!r} is not one of {', '.join(HELPER_MODES)}")
        if not self.keep_connections >= 0:
            raise ConfigError(f"CRONIUM_FAB_KEEP_CONNECTIONS ({self.keep_connections:g}) must be a number of "
                              "seconds, 0 or more (0: a new connection for every run)")
        if self.parallel < 1:
            raise ConfigError("--parallel must be at least 1")
        if not 0 < self.heartbeat_interval * 2 <= self.heartbeat_timeout:
            raise ConfigError(f"CRONIUM_FAB_HEARTBEAT_TIMEOUT ({self.heartbeat_timeout:g} s) must be at least twice "
                              f"CRONIUM_FAB_HEARTBEAT ({self.heartbeat_interval:g} s), which must be above 0")
