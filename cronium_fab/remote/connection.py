"""Opening verified, tuned SSH connections (a ``fabric.Connection`` per host).

What Fabric does not do by default and we do here:
- host keys are verified (Fabric always installs ``AutoAddPolicy``): our known_hosts file plus
  ``~/.ssh/known_hosts``; policy ``strict`` refuses unknown hosts, ``accept-new`` records the first
  key; a CHANGED key is refused under every policy;
- connect, banner and auth timeouts, keepalive on (a dead peer is noticed), TCP_NODELAY on the
  socket before the key exchange (Paramiko never sets it: ~44 ms vs ~3 ms per exec round trip);
- AES-GCM is offered first (``_Transport``): less CPU per packet than AES-CTR + HMAC in Paramiko;
- each Connection gets its own ``fabric.Config`` and ``connect_kwargs`` (a shared Config makes
  ``key_filename`` grow by one entry per connection);
- failures are typed (``HostUnreachable``, ``AuthRefused``, ``HostKeyChanged``, ``HostKeyUnknown``);
  ``connect`` tries a transient failure (refused, reset, timed out) again, with jitter.
"""

from __future__ import annotations

import io
import logging
import os
import random
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fabric
import paramiko

from ..errors import ConfigError
from .errors import (
    TRANSIENT_CONNECT,
    AuthRefused,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    KeyInvalid,
    RemoteError,
)
from .known_hosts import KnownHostsStore, fingerprint, host_entry_name

log = logging.getLogger("cronium_fab.remote")

# ``accept-once`` (not a user setting): an unknown key is accepted for this one connection and
# never recorded; the connection's ``first_contact`` says so (``run-event --plan`` looks with it)
HostKeyPolicy = Literal["strict", "accept-new", "accept-once"]


def default_known_hosts_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "cronium-fab" / "known_hosts"


def parse_destination(value: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``[user@][host]:port`` (IPv6) -> (user, host, port); a bare IPv6
    address has no port. A port that is not a number is refused (ConfigError)."""
    user, _, rest = value.strip().rpartition("@")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_s = tail.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port_s = rest.partition(":")
    else:
        host, port_s = rest, ""
    if port_s and not port_s.isdigit():
        raise ConfigError(f"{value!r}: the port must be a number")
    return user or None, host, int(port_s) if port_s else None


@dataclass(frozen=True)
class SSHSettings:
    """Connection settings shared by all hosts of a run."""

    host_key_policy: HostKeyPolicy = "strict"
    known_hosts_path: Path = field(default_factory=default_known_hosts_path)
    # Read-only extra known_hosts files (OpenSSH's own).
    system_known_hosts: tuple[Path, ...] = (Path("~/.ssh/known_hosts"),)
    connect_timeout: float = 10.0  # TCP connect and SSH key exchange
    banner_timeout: float = 15.0
    auth_timeout: float = 15.0
    keepalive_interval: int = 15  # seconds; 0 disables
    ssh_config_path: Path | None = None  # None: ~/.ssh/config
    retry_delay: float = 1.0  # before the first connect retry (doubling, jittered)

    def store(self) -> KnownHostsStore:
        return _store_for(self.known_hosts_path, self.system_known_hosts)


@dataclass(frozen=True)
class HostTarget:
    """One server to connect to.

    ``host`` is an address or an alias of ``~/.ssh/config`` (resolved when ``use_ssh_config``):
    HostName, User, Port, IdentityFile and ProxyJump/ProxyCommand are honoured (through Fabric).
    ``private_key`` is key TEXT (Ed25519/ECDSA/RSA; OpenSSH or PEM format). Given a key or a
    password, only those are tried (no agent, no ~/.ssh/id_*): a server with ``MaxAuthTries``
    would otherwise refuse us after a few agent keys.
    """

    name: str
    host: str
    port: int | None = None
    user: str | None = None
    server_id: int | None = None
    private_key: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    use_ssh_config: bool = True
    key_passphrase: str | None = field(default=None, repr=False)
    key_files: tuple[str, ...] = ()  # -i KEY: tried first, before the agent and ~/.ssh/id_*


_KEY_CLASSES: tuple[type[paramiko.PKey], ...] = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def load_private_key(text: str, passphrase: str | None = None, *, host: str | None = None) -> paramiko.PKey:
    """Load private key text of any type Paramiko supports (OpenSSH or PEM format)."""
    if "\\n" in text and "\n" not in text.strip():
        text = text.replace("\\n", "\n")  # a key pasted into a single-line field
    text = text.strip() + "\n"
    errors = []
    for cls in _KEY_CLASSES:
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException as e:
            raise KeyInvalid(f"the private key is encrypted and no passphrase was given ({e})", host=host) from e
        except (paramiko.SSHException, ValueError, IndexError, TypeError) as e:
            errors.append(f"{cls.__name__}: {e}")
    raise KeyInvalid("the private key text is not an Ed25519, ECDSA or RSA key: " + "; ".join(errors), host=host)


class _VerifyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by Paramiko when no key of the offered type is known for the host."""

    def __init__(self, store: KnownHostsStore, policy: HostKeyPolicy, display: str, conn: _Connection) -> None:
        self.store = store
        self.policy = policy
        self.display = display
        self.conn = conn

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fp = fingerprint(key)
        known = self.store.lookup(hostname)
        if known:
            # A key of another type is recorded and the server did not offer that type: treat it
            # as a change (OpenSSH does the same), never as a first contact.
            old = ", ".join(f"{t} {fingerprint(k)}" for t, k in known.items())
            raise HostKeyChanged(
                _changed_message(self.display, hostname, old, f"{key.get_name()} {fp}", self.store),
                host=self.display,
                expected_fingerprint=next(fingerprint(k) for k in known.values()),
                actual_fingerprint=fp,
            )
        self.conn.first_contact = f"{key.get_name()} {fp}"
        if self.policy == "accept-once":
            return
        if self.policy == "accept-new":
            self.store.add(hostname, key)
            log.warning("host %s (%s): first contact, recorded %s key %s in %s",
                        self.display, hostname, key.get_name(), fp, self.store.path)
            return
        raise HostKeyUnknown(
            f"host {self.display} ({hostname}) is not in known_hosts; it offered {key.get_name()} key {fp}. "
            f"Check the fingerprint, then record it with `cronium-fab known-hosts-add '{hostname}'` "
            f"(or run with --host-key-policy accept-new / CRONIUM_FAB_HOST_KEY_POLICY=accept-new)",
            host=self.display,
            fingerprint=fp,
            key_type=key.get_name(),
        )


def _changed_message(display: str, hostname: str, expected: str, actual: str, store: KnownHostsStore) -> str:
    return (
        f"HOST KEY CHANGED for {display} ({hostname}): known {expected}, offered {actual}. "
        f"Someone may be intercepting the connection, or the server was reinstalled. Refusing to connect. "
        f"If the change is expected (check the new fingerprint with the server's admin), record the new key "
        f"with `cronium-fab known-hosts-add '{hostname}' --replace` (and remove the old entry from "
        f"~/.ssh/known_hosts if it is there)"
    )


_stores: dict[tuple[Path, tuple[Path, ...]], KnownHostsStore] = {}
_stores_lock = threading.Lock()


def _store_for(path: Path, extra: tuple[Path, ...]) -> KnownHostsStore:
    key = (Path(path).expanduser(), tuple(Path(p).expanduser() for p in extra))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = KnownHostsStore(key[0], key[1])
        return store


_ssh_configs: dict[Path, tuple[float, paramiko.SSHConfig]] = {}
_ssh_configs_lock = threading.Lock()


def _ssh_config(settings: SSHSettings) -> paramiko.SSHConfig:
    """~/.ssh/config parsed once per process (re-read when it changes)."""
    path = Path(settings.ssh_config_path or "~/.ssh/config").expanduser()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return paramiko.SSHConfig()
    with _ssh_configs_lock:
        cached = _ssh_configs.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        cfg = paramiko.SSHConfig.from_path(str(path))
        _ssh_configs[path] = (mtime, cfg)
        return cfg


def _tcp_connect(host: str, port: int, timeout: float, display: str) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise HostUnreachable("dns", f"host {display}: cannot resolve {host!r}: {e.strerror or e}", host=display) from e
    except ConnectionRefusedError as e:
        raise HostUnreachable(
            "connection-refused", f"host {display}: connection refused at {host}:{port} (is sshd running?)", host=display
        ) from e
    except ConnectionResetError as e:
        raise HostUnreachable("connection-reset", f"host {display}: connection reset at {host}:{port}",
                              host=display) from e
    except TimeoutError as e:
        raise HostUnreachable(
            "timeout", f"host {display}: no TCP connection to {host}:{port} within {timeout:g} s", host=display
        ) from e
    except OSError as e:
        raise HostUnreachable("network", f"host {display}: cannot reach {host}:{port}: {e.strerror or e}", host=display) from e
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Transport(paramiko.Transport):
    """Paramiko's Transport offering AES-GCM first: an AEAD cipher carries its own tag, so no HMAC
    is computed and compared per packet (Paramiko compares MACs byte by byte in Python): ~0.5 ms of
    CPU less per connection (measured on loopback). A server without GCM gets the usual order."""

    _preferred_ciphers = tuple(sorted(paramiko.Transport._preferred_ciphers,  # type: ignore[attr-defined]
                                      key=lambda c: "-gcm@" not in c))
    _replies = 0   # answers to our global requests so far (set in the transport thread)

    def _parse_request_success(self, m: paramiko.Message) -> None:
        self._replies += 1
        super()._parse_request_success(m)  # type: ignore[misc]

    def _parse_request_failure(self, m: paramiko.Message) -> None:
        self._replies += 1
        super()._parse_request_failure(m)  # type: ignore[misc]

    def global_request(self, kind: str, data: Any = None, wait: bool = True) -> paramiko.Message | None:
        """Paramiko's, but a wait ends with the server's answer: Paramiko also ends it when a key
        exchange completes (one event for both), and then returns the previous answer while the
        real one is taken for the next request's. A kept connection lives long enough to re-key."""
        if not wait:
            return super().global_request(kind, data, wait)
        before = self._replies
        answer = super().global_request(kind, data, wait)
        while self.is_active() and self._replies == before:   # woken by a re-key, not by the answer
            self.completion_event = event = threading.Event()
            if self._replies == before:
                event.wait(0.1)
        return self.global_response if self._replies != before else answer


def _connect_kwargs(target: HostTarget, settings: SSHSettings) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "banner_timeout": settings.banner_timeout,
        "auth_timeout": settings.auth_timeout,
        "transport_factory": _Transport,
    }
    if target.private_key:
        kw["pkey"] = load_private_key(target.private_key, target.key_passphrase, host=target.name)
    if target.password:
        kw["password"] = target.password
    if target.private_key or target.password:
        kw["look_for_keys"] = False
        kw["allow_agent"] = False
    elif target.key_files:
        kw["key_filename"] = [str(Path(k).expanduser()) for k in target.key_files]
    return kw


DEFAULT_KEY_FILES = ("id_rsa", "id_ecdsa", "id_ed25519")   # what Paramiko looks for in ~/.ssh


def _keys_tried(target: HostTarget, conn: fabric.Connection) -> str:
    """Which credentials an authentication with ``conn`` offered (names and paths, never contents)."""
    if target.private_key:
        return "the server's stored key"
    if target.password:
        return "the server's stored password"
    files = [str(f) for f in conn.connect_kwargs.get("key_filename") or []]
    files += [str(p) for p in (Path(f"~/.ssh/{n}").expanduser() for n in DEFAULT_KEY_FILES) if p.exists()]
    agent = "the ssh-agent" if os.environ.get("SSH_AUTH_SOCK") else "no ssh-agent (SSH_AUTH_SOCK is not set)"
    return (f"key files {', '.join(dict.fromkeys(files))}" if files else "no key file") + f", {agent}"


def _no_credentials(target: HostTarget, conn: fabric.Connection, display: str, why: str) -> AuthRefused:
    return AuthRefused(
        f"host {display}: authentication as {conn.user!r} {why}; tried {_keys_tried(target, conn)}. Give a key with "
        "`-i KEY` (fab -i / cronium-fab -i), an IdentityFile in ~/.ssh/config or an ssh-agent, or register the "
        "server with its key (`cronium-fab load`)", host=display)


def destination_problem(host: str, settings: SSHSettings | None = None) -> str | None:
    """Why an SSH destination (``host`` or a ~/.ssh/config alias) cannot be reached by name, or None.
    A jump host resolves the name itself: then there is nothing to check here."""
    cfg = _ssh_config(settings or SSHSettings()).lookup(host)
    if cfg.get("proxyjump") or cfg.get("proxycommand"):
        return None
    hostname = cfg.get("hostname", host)
    try:
        socket.getaddrinfo(hostname, None)
    except socket.gaierror as e:
        return f"cannot resolve {hostname!r}: {e.strerror or e}"
    except UnicodeError as e:
        return f"{hostname!r} is not a host name: {e}"
    return None


class _Connection(fabric.Connection):
    """A Connection that also closes its jump host (Fabric leaves a ProxyJump gateway open)."""

    first_contact: str | None = None  # the key type and fingerprint of a host key we did not know
    # False once something of a run may be left on the connection (a remote forward that could not
    # be set up or cancelled): it is not kept for another run (remote/pool.py)
    reusable: bool = True

    def close(self) -> None:
        super().close()
        # Fabric closes only a connection whose open() returned: one refused during authentication
        # or the host key check keeps its Paramiko transport (a thread, a socket, an sshd session
        # on the host) unless the client is closed too. SSHClient.close() is idempotent.
        self.client.close()
        if isinstance(self.gateway, fabric.Connection):
            self.gateway.close()


def _verified_gateway(gw: fabric.Connection, settings: SSHSettings, display: str) -> fabric.Connection:
    """Open a ProxyJump hop (and the hops before it) through ``open_connection``: Fabric would open
    it itself with AutoAddPolicy, so the jump host's key would never be checked."""
    inner = gw.gateway if isinstance(gw.gateway, fabric.Connection) else None
    before = _verified_gateway(inner, settings, display) if inner is not None else None
    hop = HostTarget(name=f"{display} (jump host {gw.host})", host=gw.host, port=gw.port, user=gw.user)
    try:
        return open_connection(hop, settings, gateway=before)
    except BaseException:
        if before is not None:
            before.close()
        raise


def open_connection(target: HostTarget, settings: SSHSettings | None = None, *,
                    gateway: fabric.Connection | None = None) -> fabric.Connection:
    """Open and return a verified connection to ``target``; raise a ``RemoteError`` on failure.

    The caller owns the connection (``conn.close()``, which also closes its jump hosts).
    ``conn.transport`` is ready for raw channels. ProxyJump hops from ~/.ssh/config are opened
    with the same host key policy and timeouts (``gateway`` is used internally for that).
    """
    settings = settings or SSHSettings()
    ssh_config = _ssh_config(settings) if target.use_ssh_config else paramiko.SSHConfig()
    config = fabric.Config(ssh_config=ssh_config)
    conn = _Connection(
        target.host,
        user=target.user,
        port=target.port,
        config=config,
        connect_timeout=max(1, round(settings.connect_timeout)),
        connect_kwargs=_connect_kwargs(target, settings),
    )
    display = target.name
    if gateway is not None:
        conn.gateway = gateway
    elif isinstance(conn.gateway, fabric.Connection):
        conn.gateway = _verified_gateway(conn.gateway, settings, display)
    store = settings.store()
    entry = host_entry_name(conn.host, conn.port)
    for key_type, key in store.lookup(entry).items():
        conn.client.get_host_keys().add(entry, key_type, key)
    conn.client.set_missing_host_key_policy(_VerifyPolicy(store, settings.host_key_policy, display, conn))
    if not conn.gateway:
        conn.connect_kwargs["sock"] = _tcp_connect(conn.host, conn.port, settings.connect_timeout, display)
    try:
        conn.open()
    except RemoteError:
        conn.close()
        raise
    except paramiko.BadHostKeyException as e:
        conn.close()
        raise HostKeyChanged(
            _changed_message(
                display, entry, f"{e.expected_key.get_name()} {fingerprint(e.expected_key)}",
                f"{e.key.get_name()} {fingerprint(e.key)}", store,
            ),
            host=display,
            expected_fingerprint=fingerprint(e.expected_key),
            actual_fingerprint=fingerprint(e.key),
        ) from e
    except paramiko.AuthenticationException as e:
        conn.close()
        if not (target.private_key or target.password):
            raise _no_credentials(target, conn, display, f"refused ({e})") from e
        what = "key" if target.private_key else "password"
        raise AuthRefused(f"host {display}: authentication as {conn.user!r} refused ({what}): {e}", host=display) from e
    except paramiko.ssh_exception.NoValidConnectionsError as e:
        conn.close()
        raise HostUnreachable("connection-refused", f"host {display}: {e}", host=display) from e
    except TimeoutError as e:
        conn.close()
        raise HostUnreachable("timeout", f"host {display}: SSH handshake timed out ({e})", host=display) from e
    except (paramiko.SSHException, EOFError, ConnectionError) as e:
        conn.close()
        if "No authentication methods available" in str(e):   # no key file, no agent, no password
            raise _no_credentials(target, conn, display, "impossible: nothing to offer") from e
        kind = _handshake_failure_kind(e)
        what = {"connection-reset": "the server closed or reset the connection during the SSH handshake",
                "timeout": "the SSH handshake timed out"}.get(kind, "SSH handshake failed")
        raise HostUnreachable(kind, f"host {display}: {what} with {conn.host}:{conn.port}: {e or type(e).__name__}",
                              host=display) from e
    except OSError as e:
        conn.close()
        raise HostUnreachable("network", f"host {display}: {e}", host=display) from e
    transport = conn.transport
    assert transport is not None
    if settings.keepalive_interval:
        transport.set_keepalive(settings.keepalive_interval)
    return conn


def _handshake_failure_kind(e: BaseException) -> str:
    """``connection-reset`` when the peer went away mid-handshake (sshd at its MaxStartups, a
    restarting host, a middlebox), ``timeout`` when it never answered, else ``handshake``.
    Paramiko wraps the socket's error in an SSHException while it reads the banner."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, EOFError | ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
            return "connection-reset"
        if isinstance(err, TimeoutError):
            return "timeout"
    return "handshake"


def connect(target: HostTarget, settings: SSHSettings | None = None, *, retries: int = 1,
            cancel: threading.Event | None = None) -> tuple[fabric.Connection, int]:
    """``open_connection`` that tries a transient failure (``TRANSIENT_CONNECT``: refused, reset,
    timed out) up to ``retries`` more times, waiting about ``retry_delay`` s, then twice that, ...
    (each wait jittered between half and all of it, so a fleet that lost its network does not
    come back in lockstep). Returns the connection and how many attempts it took; the error of
    the last attempt says how many there were (``attempts`` on it). ``cancel`` ends the waiting."""
    settings = settings or SSHSettings()
    attempt = 0
    while True:
        attempt += 1
        try:
            return open_connection(target, settings), attempt
        except RemoteError as exc:
            exc.attempts = attempt
            if exc.kind not in TRANSIENT_CONNECT or attempt > retries:
                if attempt > 1:
                    exc.message = f"{exc.message} (after {attempt} attempts)"
                    exc.args = (exc.message,)
                raise
            wait = settings.retry_delay * 2 ** (attempt - 1)
            log.info("host %s: %s; trying again in about %.1f s", target.name, exc.kind, wait)
            if (cancel or threading.Event()).wait(random.uniform(wait / 2, wait)):
                raise


@dataclass(frozen=True)
class HostKeyRecord:
    host: str
    port: int
    name: str  # the known_hosts name: host or [host]:port
    key_type: str
    fingerprint: str
    already_known: bool
    replaced: bool


def fetch_host_key(host: str, port: int = 22, timeout: float = 10.0) -> paramiko.PKey:
    """The key the server at host:port offers (key exchange only, no authentication)."""
    sock = _tcp_connect(host, port, timeout, host)
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = timeout
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise HostUnreachable("handshake", f"host {host}:{port}: SSH handshake failed: {e}", host=host) from e
    finally:
        transport.close()


@dataclass(frozen=True)
class HostKeyOffer:
    """The key a server offers, beside what our known_hosts holds for it (not recorded yet)."""

    host: str
    port: int
    name: str  # the known_hosts name: host or [host]:port
    key: paramiko.PKey = field(repr=False)
    known: dict[str, paramiko.PKey] = field(repr=False)

    @property
    def key_type(self) -> str:
        return self.key.get_name()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    @property
    def already_known(self) -> bool:
        return self.known.get(self.key_type) == self.key

    def known_fingerprints(self) -> str:
        return ", ".join(f"{t} {fingerprint(k)}" for t, k in self.known.items())


def offered_host_key(host: str, port: int = 22, settings: SSHSettings | None = None) -> HostKeyOffer:
    """Fetch the server's host key (key exchange only) and look up what we know of it."""
    settings = settings or SSHSettings()
    name = host_entry_name(host, port)
    key = fetch_host_key(host, port, settings.connect_timeout)
    return HostKeyOffer(host, port, name, key, settings.store().lookup(name))


def save_host_key(offer: HostKeyOffer, settings: SSHSettings | None = None, *, replace: bool = False) -> HostKeyRecord:
    """Record an offered key in our known_hosts file. A different key already recorded raises
    ``HostKeyChanged`` unless ``replace`` is true."""
    settings = settings or SSHSettings()
    store = settings.store()
    record = HostKeyRecord(offer.host, offer.port, offer.name, offer.key_type, offer.fingerprint,
                           already_known=offer.already_known, replaced=bool(offer.known) and not offer.already_known)
    if offer.already_known:
        return record
    if offer.known and not replace:
        raise HostKeyChanged(
            _changed_message(offer.host, offer.name, offer.known_fingerprints(), f"{offer.key_type} {offer.fingerprint}",
                             store),
            host=offer.host,
            expected_fingerprint=next(fingerprint(k) for k in offer.known.values()),
            actual_fingerprint=offer.fingerprint,
        )
    if offer.known:
        store.replace(offer.name, offer.key)
    else:
        store.add(offer.name, offer.key)
    return record


def record_host_key(
    host: str, port: int = 22, settings: SSHSettings | None = None, *, replace: bool = False
) -> HostKeyRecord:
    """Fetch the server's host key and record it in our known_hosts file.

    A different key already recorded raises ``HostKeyChanged`` unless ``replace`` is true.
    The returned record carries the SHA256 fingerprint to show the user.
    """
    return save_host_key(offered_host_key(host, port, settings), settings, replace=replace)
