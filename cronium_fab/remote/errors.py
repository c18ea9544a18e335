"""Typed failures of the SSH side. Each carries a machine ``kind`` tag and the host it is about."""

from __future__ import annotations

from typing import Literal

from ..errors import EXIT_FAILURE, CroniumFabError

# Why a host failed, as the controller tells it (``HostResult.error_kind``; a runner that delivered
# its result may report kinds of its own, e.g. ``timeout`` or ``internal``).
ErrorKind = Literal[
    "connection-refused", "connection-reset", "timeout", "dns", "network", "handshake",  # HostUnreachable
    "auth-refused", "key-invalid", "host-key-unknown", "host-key-changed",
    "python-missing", "python-too-old", "runner-install-failed",            # the runner's bootstrap
    "setup-timeout", "watchdog-timeout", "disconnected", "unresponsive", "cancelled",  # a run that ended early
    "forwarding-refused", "forwarding-failed", "forwarding-conflict",       # API mode's tunnel
    "internal", "remote",
]
# a peer we must never wait on again (frozen, gone, or stuck in set-up)
DEAD_PEER: frozenset[ErrorKind] = frozenset({"watchdog-timeout", "disconnected", "unresponsive", "setup-timeout"})
# a connect that failed this way may work a moment later: tried again (``--connect-retries``); an
# auth refusal, a host key problem or anything after the connection was up never is
TRANSIENT_CONNECT: frozenset[ErrorKind] = frozenset({"connection-refused", "connection-reset", "timeout"})
# the runner never started, so no runner is deployed there
NO_RUNNER: frozenset[ErrorKind] = frozenset({"python-missing", "python-too-old"})


class RemoteError(CroniumFabError):
    """Base of every failure of the SSH side: ``kind`` is a stable tag, ``str(e)`` says what to do.
    Raised out of a command (``known-hosts-add``), it ends it with exit status 1, as a failed run."""

    kind: str = "remote"
    exit_code = EXIT_FAILURE

    def __init__(self, kind: str, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.host = host
        self.attempts = 1  # connect attempts made (``connection.connect`` retries transient failures)


class HostUnreachable(RemoteError):
    """No SSH session could be set up: kind is ``connection-refused``, ``connection-reset`` (the
    peer reset or closed the connection before the SSH handshake ended), ``timeout``, ``dns``,
    ``network`` or ``handshake`` (TCP worked but the SSH banner/key exchange did not)."""


class AuthRefused(RemoteError):
    """The server refused every credential we offered (kind ``auth-refused``)."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__("auth-refused", message, host=host)


class KeyInvalid(RemoteError):
    """A private key text could not be loaded as any key type Paramiko supports (kind ``key-invalid``)."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__("key-invalid", message, host=host)


class HostKeyUnknown(RemoteError):
    """Policy ``strict`` and no key known for the host (kind ``host-key-unknown``).

    ``fingerprint`` is the key the server offered, so a caller can show it and record it.
    """

    def __init__(self, message: str, *, host: str, fingerprint: str, key_type: str) -> None:
        super().__init__("host-key-unknown", message, host=host)
        self.fingerprint = fingerprint
        self.key_type = key_type


class HostKeyChanged(RemoteError):
    """The server's key differs from the recorded one (kind ``host-key-changed``). Never accepted."""

    def __init__(self, message: str, *, host: str, expected_fingerprint: str, actual_fingerprint: str) -> None:
        super().__init__("host-key-changed", message, host=host)
        self.expected_fingerprint = expected_fingerprint
        self.actual_fingerprint = actual_fingerprint
