"""The SSH side: verified connections, the runner cache on targets, the run protocol."""

from .connection import (
    HostKeyRecord,
    HostTarget,
    SSHSettings,
    load_private_key,
    open_connection,
    record_host_key,
)
from .errors import AuthRefused, HostKeyChanged, HostKeyUnknown, HostUnreachable, KeyInvalid, RemoteError
from .known_hosts import fingerprint

__all__ = [
    "AuthRefused",
    "HostKeyChanged",
    "HostKeyRecord",
    "HostKeyUnknown",
    "HostTarget",
    "HostUnreachable",
    "KeyInvalid",
    "RemoteError",
    "SSHSettings",
    "fingerprint",
    "load_private_key",
    "open_connection",
    "record_host_key",
]
