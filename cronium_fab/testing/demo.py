"""``make demo``: a real multi-server run with the Cronium helpers, against local sshd hosts.

Starts three OpenSSH sshd hosts on 127.0.0.x (kept running; ``make demo-stop`` stops them),
records their host keys (we started them, so we trust them), registers them and a sample Python
event in the embedded SQLite database through ``cronium-fab load``, builds the signed payload, runs
the event on all three in parallel and shows the variables the scripts stored.
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import sys
from pathlib import Path

import paramiko
import yaml

from ..db.engine import Database
from ..db.queries import user_variables
from ..errors import CroniumFabError
from ..execute import RunRequest, run_event
from ..fsutil import atomic_write
from ..registry import load_inventory
from ..remote.known_hosts import KnownHostsStore, host_entry_name
from ..settings import Settings
from .hosts import start_hosts, stop_from_state

DEMO_DIR = Path(".demo")
DATA_DIR = DEMO_DIR / "data"
PAYLOAD_DIR = DEMO_DIR / "payloads"
HOSTS = 3

DEMO_SCRIPT = '''\
import os, platform, time

ctx = cronium.event()                      # the run's context: ids, server name, trigger
name = ctx["serverName"]
runs = cronium.getVariable("demo_runs") or 0
print(f"hello from {name}: python {platform.python_version()}, pid {os.getpid()}, previous runs {runs}")
print("input:", cronium.input())
for step in range(3):
    print(f"{name} working... step {step + 1}/3", flush=True)
    time.sleep(0.2)
cronium.setVariable("demo_runs", runs + 1)  # every host writes it: last writer wins
cronium.setVariable(f"demo_seen_{name}", {"pid": os.getpid(), "at": time.strftime("%H:%M:%S")})
cronium.output({"server": name, "ok": True})
cronium.setCondition(True)
'''


def _trust(settings: Settings, address: str, port: int, public_line: str) -> None:
    kind, b64 = public_line.split()[:2]
    key = paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
    settings.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    KnownHostsStore(settings.known_hosts).replace(host_entry_name(address, port), key)


def stop_worker_at(path: Path) -> int | None:
    """SIGTERM the cronium-fab worker of ours listening on ``path``; its pid, or None."""
    import signal
    import socket

    from ..wire import peer_creds

    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
            pid, uid, _gid = peer_creds(sock)
        except OSError:
            return None      # nobody listening: a socket left by a worker that died
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if uid != os.getuid() or b"worker" not in cmdline:
        return None
    os.kill(pid, signal.SIGTERM)
    return pid


def demo_environment() -> dict[str, str]:
    """Everything the demo's commands need, as absolute paths, whatever the caller's environment."""
    here = Settings.from_env()
    return {
        "CRONIUM_DATABASE_URL": f"sqlite:///{(DATA_DIR / 'cronium.db').resolve()}",
        "CRONIUM_FAB_DATA_DIR": str(DATA_DIR.resolve()),
        "CRONIUM_FAB_PAYLOAD_DIR": str(PAYLOAD_DIR.resolve()),
        "CRONIUM_FAB_SIGNING_KEY": str(here.signing_key.resolve()),
        "CRONIUM_FAB_PUBLIC_KEY": str(here.public_key.resolve()),
        "CRONIUM_FAB_RUNNER": str(here.runner_path.resolve()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo")
    parser.add_argument("--stop", action="store_true", help="stop the demo hosts")
    args = parser.parse_args(argv)
    DEMO_DIR.mkdir(mode=0o700, exist_ok=True)
    DEMO_DIR.chmod(0o700)  # the demo's database, keys and inventory are nobody else's business
    hosts_dir = (DEMO_DIR / "hosts").resolve()
    stopped = stop_from_state(hosts_dir)
    if args.stop:
        print(f"stopped {stopped} demo host(s)")
        pid = stop_worker_at(DATA_DIR / "worker.sock")
        if pid:
            print(f"stopped the demo's cronium-fab worker (pid {pid})")
        return 0
    try:
        return _demo(hosts_dir)
    except CroniumFabError as exc:
        print(f"make demo: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _demo(hosts_dir: Path) -> int:
    # The demo's embedded database, known_hosts and payloads live in this checkout (.demo/), so a
    # demo never mixes with your own registrations (nor writes into Cronium's database when
    # CRONIUM_DATABASE_URL is set), nor with another checkout's signing keys.
    env = demo_environment()
    for name in ("CRONIUM_DATABASE_URL", "CRONIUM_FAB_DATA_DIR", "CRONIUM_FAB_PAYLOAD_DIR"):
        if os.environ.get(name) and os.environ[name] != env[name]:
            print(f"== the demo ignores your {name}: it keeps everything in {DEMO_DIR.resolve()}", file=sys.stderr)
    os.environ.update(env)
    env_file = DEMO_DIR / "env"
    lines = [f"export {k}={shlex.quote(v)}\n" for k, v in env.items()]
    lines.append(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"\n')   # cronium-fab
    atomic_write(env_file, "".join(lines).encode(), 0o600)
    settings = Settings.from_env()
    print(f"== starting {HOSTS} local sshd hosts", file=sys.stderr)
    pool = start_hosts(HOSTS, hosts_dir, detach=True)
    servers = []
    for i, h in enumerate(pool.hosts, 1):
        _trust(settings, h.address, h.port, h.host_public_key)
        servers.append({"name": f"demo-{i}", "address": h.address, "port": h.port, "username": h.user,
                        "ssh_key_file": str(h.private_key_path.resolve())})
        print(f"   demo-{i}: {h.user}@{h.address}:{h.port}", file=sys.stderr)
    inventory = {
        "user": "local",
        "servers": servers,
        "events": [{"name": "demo-helpers", "type": "PYTHON", "script": DEMO_SCRIPT, "timeout": 60,
                    "servers": [s["name"] for s in servers], "env": {"DEMO_GREETING": "hello"}}],
    }
    inv_path = DEMO_DIR / "inventory.yaml"
    atomic_write(inv_path, yaml.safe_dump(inventory, sort_keys=False).encode(), 0o600)
    db = Database(settings.database_url)
    db.init()
    report = load_inventory(db, inv_path)
    event_id = report.events["demo-helpers"]
    print(f"== registered {len(servers)} servers and event {event_id} in {db.url}", file=sys.stderr)
    print(f"== cronium-fab run-event --id {event_id} --input '{{\"from\": \"make demo\"}}'\n", file=sys.stderr)
    result = run_event(settings, RunRequest(event_id=event_id, input={"from": "make demo"}))
    with db.session() as s:
        stored = {k: v for k, v in user_variables(s, "local").items() if k.startswith("demo_")}
    print("\n== variables stored by the scripts (user_variables):", file=sys.stderr)
    for k, v in sorted(stored.items()):
        print(f"   {k} = {v!r}", file=sys.stderr)
    print(
        f"\nThe demo's environment is in {env_file} (its own database, keys, runner; absolute paths):\n"
        f"  run it again:    . {env_file} && cronium-fab run-event --id {event_id}"
        "   (--json for the JSON result, --helper-mode bundled|api)\n"
        f"  skip start-up:   . {env_file}; cronium-fab worker 2>>{DEMO_DIR}/worker.log &"
        "   (then cronium-fab commands in that shell are served by it: docs/WORKER.md)\n"
        "  stop the hosts (and that worker):  make demo-stop",
        file=sys.stderr,
    )
    return 0 if result.status == "SUCCESS" else result.exit_code


if __name__ == "__main__":
    sys.exit(main())
