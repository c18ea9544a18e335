"""Local development and test "hosts": real OpenSSH sshd processes on 127.0.0.x.

Every host is its own ``sshd -D -e`` child with its own config, host key (ed25519), client key,
``authorized_keys`` and pidfile, listening on its own loopback address and a free port. All hosts
log in the current user, but each host's sessions get their own ``HOME``, ``XDG_CACHE_HOME`` and
``TMPDIR`` (sshd ``SetEnv``), so the runner cache of one host is not the cache of another, and
the login shell does not read the real ``~/.bashrc`` (on our machines it starts pyenv, +60-90 ms
per command, and puts a python3 shim first on PATH).

Used by the pytest fixtures (``tests/conftest_ssh.py``) and by ``make demo`` (``detach=True``
keeps the hosts running after this process exits; ``stop_from_state`` stops them later).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

SSHD = "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")
INSTALL_HINT = "install openssh-server: apt-get install -y openssh-server"
STATE_FILE = "devhosts.json"

KeyType = Literal["ed25519", "ecdsa", "rsa"]
KeyFormat = Literal["openssh", "pem"]

_counter_lock = threading.Lock()
_counter = 0
_live_pools: weakref.WeakSet[DevHostPool] = weakref.WeakSet()


def _stop_live_pools() -> None:
    for pool in list(_live_pools):
        pool._atexit()


atexit.register(_stop_live_pools)


class DevHostError(RuntimeError):
    """sshd is missing, would not start, or did not become ready."""


@dataclass
class DevHost:
    name: str
    address: str
    port: int
    user: str
    private_key_path: Path
    private_key_text: str
    host_public_key: str  # "ssh-ed25519 AAAA..." (the sshd's host key, as in known_hosts)
    cache_dir: Path  # XDG_CACHE_HOME of this host's sessions
    tmp_dir: Path  # TMPDIR of this host's sessions
    pid: int | None
    dir: Path
    home_dir: Path
    key_type: str = "ed25519"
    password_user: str | None = None
    password: str | None = None
    allow_tcp_forwarding: bool = True
    path_env: str | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key_path(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def authorized_keys_path(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def runner_cache_dir(self) -> Path:
        """Where the bootstrap looks for the runner on this host."""
        return self.cache_dir / "cronium"

    def known_hosts_line(self) -> str:
        hostport = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{hostport} {self.host_public_key}"

    def add_client_key(self, key_type: KeyType = "ed25519", key_format: KeyFormat = "openssh") -> str:
        """Authorize a new client key of ``key_type`` on this host and return its private key text.

        sshd reads ``authorized_keys`` at every authentication, so this works on a running host.
        """
        private_text, public_line = generate_keypair(key_type, key_format)
        with open(self.authorized_keys_path, "a") as f:
            f.write(public_line + "\n")
        return private_text

    def clear_runner_cache(self) -> None:
        shutil.rmtree(self.runner_cache_dir, ignore_errors=True)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> DevHost:
        paths = {"private_key_path", "cache_dir", "tmp_dir", "dir", "home_dir"}
        kw = {k: (Path(str(v)) if k in paths else v) for k, v in d.items()}
        return cls(**kw)  # type: ignore[arg-type]


def generate_keypair(key_type: KeyType = "ed25519", key_format: KeyFormat = "openssh") -> tuple[str, str]:
    """Return (private key text, OpenSSH public key line) for a fresh key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        fmt = serialization.PrivateFormat.OpenSSH  # ed25519 has no traditional PEM form
    elif key_type == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
        fmt = serialization.PrivateFormat.OpenSSH if key_format == "openssh" else serialization.PrivateFormat.TraditionalOpenSSL
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        fmt = serialization.PrivateFormat.OpenSSH if key_format == "openssh" else serialization.PrivateFormat.TraditionalOpenSSL
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    private = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


def find_sshd() -> str:
    path = shutil.which("sshd") or (SSHD if os.path.exists(SSHD) else None)
    if not path:
        raise DevHostError(f"sshd not found; {INSTALL_HINT}")
    return path


def _sftp_server() -> str | None:
    return next((p for p in SFTP_SERVER_CANDIDATES if os.path.exists(p)), None)


def _ensure_privsep_dir() -> None:
    if os.path.isdir("/run/sshd"):
        return
    if os.geteuid() != 0:
        raise DevHostError("/run/sshd does not exist and we are not root to create it: sudo mkdir -p -m 0755 /run/sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def _address(index: int) -> str:
    # 127.0.0.2 .. 127.0.0.254, then 127.0.1.2 ...
    return f"127.0.{index // 253}.{2 + index % 253}"


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


_STD_PATH = "/usr/local/bin:/usr/bin:/bin"


def _link_commands_without_python(bindir: Path) -> None:
    for d in reversed(_STD_PATH.split(":")):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith("python") or (bindir / name).exists():
                continue
            (bindir / name).symlink_to(os.path.join(d, name))


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _render_config(host: DevHost, sftp: str | None) -> str:
    env = {
        "HOME": str(host.home_dir),
        "XDG_CACHE_HOME": str(host.cache_dir),
        "TMPDIR": str(host.tmp_dir),
    }
    if host.path_env is not None:
        env["PATH"] = host.path_env
    lines = [
        f"ListenAddress {host.address}:{host.port}",
        f"HostKey {host.host_key_path}",
        f"PidFile {host.dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {host.authorized_keys_path}",
        "StrictModes no",
        "UsePAM no",
        "PubkeyAuthentication yes",
        f"PasswordAuthentication {'yes' if host.password else 'no'}",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "MaxStartups 200:30:400",
        "MaxSessions 200",
        "LogLevel ERROR",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        f"AllowTcpForwarding {'yes' if host.allow_tcp_forwarding else 'no'}",
        "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
    ]
    if sftp:
        lines.append(f"Subsystem sftp {sftp}")
    return "\n".join(lines) + "\n"


def _wait_banner(address: str, port: int, deadline: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=max(0.05, deadline - time.monotonic())) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_trees(roots: list[int]) -> list[int]:
    """The roots and all their descendants (one scan of /proc for all of them)."""
    if not os.path.isdir("/proc"):
        return list(roots)
    children = _proc_children()
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_trees(roots: list[tuple[int, Path | None]]) -> None:
    """SIGKILL sshds and everything below them (sessions, runners, scripts): hosts that die.

    A root given with its config path is only killed while its cmdline still names that config
    (otherwise the pid was reused by someone else: leave it alone).
    """
    live = [pid for pid, config_path in roots if config_path is None or str(config_path) in _cmdline(pid)]
    if not live:
        return
    tree = process_trees(live)
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    # SIGKILL is asynchronous: wait (bounded) until none of them runs any more, so a caller that
    # checks right after (or reuses the port) sees the host down. Zombies of our own children
    # have an empty cmdline and count as gone.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_cmdline(p) for p in tree):
        time.sleep(0.01)


def _kill_tree(pid: int, config_path: Path | None = None) -> None:
    _kill_trees([(pid, config_path)])


class DevHostPool:
    """A set of running dev hosts. ``stop()`` kills them all (also at interpreter exit)."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.hosts: list[DevHost] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._users: list[str] = []
        self._detach = False
        self._stopped = False
        _live_pools.add(self)

    # --- starting -------------------------------------------------------------------------
    def add_hosts(
        self,
        n: int,
        *,
        allow_tcp_forwarding: bool = True,
        path_env: str | None = None,
        python3: str | None = None,
        key_type: KeyType = "ed25519",
        key_format: KeyFormat = "openssh",
        password: bool = False,
        detach: bool = False,
        ready_timeout: float = 15.0,
    ) -> list[DevHost]:
        """Start ``n`` more hosts and wait until every one answers with an SSH banner.

        ``python3``: ``None`` keeps the system's python3; ``""`` makes a host WITHOUT python3 on
        PATH; a path makes that interpreter the host's ``python3`` (e.g. an old one). ``path_env``
        sets PATH for the host's sessions verbatim. ``password=True`` (root only) creates a
        throwaway user with a random password that can log in to these hosts.
        """
        sshd = find_sshd()
        _ensure_privsep_dir()
        self._detach = self._detach or detach
        sftp = _sftp_server()
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o700)  # host dirs hold private keys
        pw_user = pw = None
        if password:
            pw_user, pw = self._password_user()
        new: list[DevHost] = []
        for _ in range(n):
            host = self._prepare(key_type, key_format, allow_tcp_forwarding, path_env, python3, pw_user, pw)
            host.config_path.write_text(_render_config(host, sftp))
            new.append(host)
        for host in new:
            self._spawn(sshd, host)
        deadline = time.monotonic() + ready_timeout
        for host in new:
            self._wait_ready(sshd, host, sftp, deadline)
        self.hosts.extend(new)
        if self._detach:
            self.write_state()
        return new

    def _prepare(
        self,
        key_type: KeyType,
        key_format: KeyFormat,
        allow_tcp_forwarding: bool,
        path_env: str | None,
        python3: str | None,
        pw_user: str | None,
        pw: str | None,
    ) -> DevHost:
        global _counter
        with _counter_lock:
            index = _counter
            _counter += 1
        address = _address(index % (253 * 200))
        name = f"devhost{index + 1}"
        d = self.base_dir / name
        while d.exists():  # a previous pool in the same base dir
            name += "x"
            d = self.base_dir / name
        d.mkdir(mode=0o700, parents=True)
        home, cache, tmp = d / "home", d / "cache", d / "tmp"
        for p in (home, cache, tmp):
            p.mkdir(mode=0o700)
        if python3 is not None:
            bindir = d / "bin"
            bindir.mkdir()
            if python3:  # this interpreter first on the usual PATH
                (bindir / "python3").symlink_to(python3)
                path_env = path_env or f"{bindir}:{_STD_PATH}"
            else:  # the usual commands, minus every python
                _link_commands_without_python(bindir)
                path_env = path_env or str(bindir)
        host_private, host_public = generate_keypair("ed25519")
        _write_private(d / "ssh_host_ed25519_key", host_private)
        (d / "ssh_host_ed25519_key.pub").write_text(host_public + "\n")
        client_private, client_public = generate_keypair(key_type, key_format)
        key_path = d / f"client_{key_type}"
        _write_private(key_path, client_private)
        (d / "authorized_keys").write_text(client_public + "\n")
        return DevHost(
            name=name,
            address=address,
            port=_free_port(address),
            user=_current_user(),
            private_key_path=key_path,
            private_key_text=client_private,
            host_public_key=host_public,
            cache_dir=cache,
            tmp_dir=tmp,
            pid=None,
            dir=d,
            home_dir=home,
            key_type=key_type,
            password_user=pw_user,
            password=pw,
            allow_tcp_forwarding=allow_tcp_forwarding,
            path_env=path_env,
        )

    def _spawn(self, sshd: str, host: DevHost) -> None:
        with open(host.dir / "sshd.log", "ab") as log:
            proc = subprocess.Popen(
                [sshd, "-f", str(host.config_path), "-D", "-e"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._procs[host.name] = proc
        host.pid = proc.pid

    def _wait_ready(self, sshd: str, host: DevHost, sftp: str | None, deadline: float) -> None:
        attempts = 0
        while True:
            proc = self._procs[host.name]
            if proc.poll() is not None:
                log = (host.dir / "sshd.log").read_text(errors="replace")
                if "Address already in use" in log and attempts < 5:  # lost the race for the port
                    attempts += 1
                    host.port = _free_port(host.address)
                    host.config_path.write_text(_render_config(host, sftp))
                    self._spawn(sshd, host)
                    continue
                raise DevHostError(f"sshd for {host.name} exited with {proc.returncode}: {log.strip()[-2000:]}")
            if _wait_banner(host.address, host.port, time.monotonic() + 1.0):
                return
            if time.monotonic() > deadline:
                raise DevHostError(f"sshd for {host.name} at {host.address}:{host.port} gave no SSH banner in time")
            time.sleep(0.01)

    def _password_user(self) -> tuple[str, str]:
        if os.geteuid() != 0:
            raise DevHostError("password hosts need root (a throwaway user with a password is created)")
        if not self._users:
            user = "crndev" + secrets.token_hex(4)
            subprocess.run(
                ["useradd", "--no-create-home", "--home-dir", str(self.base_dir), "--shell", "/bin/sh", user],
                check=True,
                capture_output=True,
            )
            self._users.append(user)
            self._password = secrets.token_urlsafe(18)
            subprocess.run(["chpasswd"], input=f"{user}:{self._password}\n".encode(), check=True, capture_output=True)
        return self._users[0], self._password

    # --- mutating one host ----------------------------------------------------------------
    def kill(self, host: DevHost) -> None:
        """Kill the host's sshd and everything below it: new connections get 'connection refused'."""
        proc = self._procs.pop(host.name, None)
        if host.pid:
            _kill_tree(host.pid, host.config_path)
        if proc is not None:
            proc.wait(timeout=10)
        host.pid = None
        if self._detach:
            self.write_state()

    def restart(self, host: DevHost, ready_timeout: float = 15.0) -> None:
        """Start a killed host again on the same address and port (with its current host key)."""
        if host.pid:
            self.kill(host)
        sshd = find_sshd()
        self._spawn(sshd, host)
        self._wait_ready(sshd, host, _sftp_server(), time.monotonic() + ready_timeout)
        if self._detach:
            self.write_state()

    def regenerate_host_key(self, host: DevHost) -> str:
        """Give the host a new ed25519 host key (restarting its sshd); return the new public key."""
        private, public = generate_keypair("ed25519")
        _write_private(host.host_key_path, private)
        (host.dir / "ssh_host_ed25519_key.pub").write_text(public + "\n")
        host.host_public_key = public
        self.restart(host)
        return public

    # --- stopping -------------------------------------------------------------------------
    def stop(self) -> None:
        """Kill every host of this pool (and their sessions); delete throwaway users."""
        roots: list[tuple[int, Path | None]] = [(h.pid, h.config_path) for h in self.hosts if h.pid]
        roots += [(proc.pid, None) for proc in self._procs.values()]
        _kill_trees(roots)      # all at once: one scan of /proc, one wait, however many hosts
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
        self._procs.clear()
        for host in self.hosts:
            host.pid = None
        if self._detach and self.hosts:
            self.write_state()
        for user in self._users:
            subprocess.run(["userdel", user], capture_output=True)
        self._users.clear()
        state = self.base_dir / STATE_FILE
        if state.exists():
            state.unlink()
        self._stopped = True

    def _atexit(self) -> None:
        if not self._detach and not self._stopped:
            self.stop()

    def write_state(self) -> Path:
        """The hosts' description, private key text included: 0600 in the 0700 base directory."""
        path = self.base_dir / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"hosts": [h.to_json() for h in self.hosts], "users": self._users}, indent=2))
        os.replace(tmp, path)
        return path

    def __enter__(self) -> DevHostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_hosts(n: int, base_dir: Path | str, *, detach: bool = False, **opts: object) -> DevHostPool:
    """Start ``n`` sshd hosts under ``base_dir``; see ``DevHostPool.add_hosts`` for the options.

    With ``detach=True`` the hosts outlive this process; their description is written to
    ``base_dir/devhosts.json`` (read it back with ``load_state``, stop them with ``stop_from_state``).
    """
    pool = DevHostPool(Path(base_dir))
    try:
        pool.add_hosts(n, detach=detach, **opts)  # type: ignore[arg-type]
    except BaseException:
        pool.stop()
        raise
    return pool


def load_state(base_dir: Path | str) -> list[DevHost]:
    path = Path(base_dir) / STATE_FILE
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [DevHost.from_json(h) for h in data["hosts"]]


def stop_from_state(base_dir: Path | str) -> int:
    """Stop the detached hosts recorded under ``base_dir``; return how many were running."""
    path = Path(base_dir) / STATE_FILE
    if not path.exists():
        return 0
    data = json.loads(path.read_text())
    stopped = 0
    for h in data["hosts"]:
        host = DevHost.from_json(h)
        if host.pid and str(host.config_path) in _cmdline(host.pid):
            _kill_tree(host.pid, host.config_path)
            stopped += 1
    for user in data.get("users", []):
        subprocess.run(["userdel", user], capture_output=True)
    path.unlink()
    for h in data["hosts"]:  # their keys and caches go with them
        shutil.rmtree(h["dir"], ignore_errors=True)
    return stopped


def running(hosts: Iterable[DevHost]) -> Sequence[DevHost]:
    """The hosts whose sshd is still alive."""
    return [h for h in hosts if h.pid and str(h.config_path) in _cmdline(h.pid)]
