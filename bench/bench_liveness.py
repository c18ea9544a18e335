"""Benchmark: the heartbeat (PROTOCOL.md §2) on a loaded machine: N local sshd hosts run a script
that prints nothing for several heartbeat timeouts; no healthy host may be cut off.

Run by hand, under the bench lock: ``flock /tmp/cronium-bench.lock .venv/bin/python
bench/bench_liveness.py [--hosts 300] [--quiet 30]``. Two `cronium-fab run-event` runs in the same
session: with the default heartbeat (2 s / 10 s) and with one so slow it never fires (the
baseline); it prints the hosts by state, the wall time and the controller's CPU of each, and the
ratio.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cronium_fab.build import build_runner  # noqa: E402
from cronium_fab.db.engine import Database  # noqa: E402
from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name  # noqa: E402
from cronium_fab.signing import generate_keypair, load_private_key, sign_file  # noqa: E402
from cronium_fab.testing.factories import add_event, add_server  # noqa: E402
from cronium_fab.testing.hosts import DevHostPool  # noqa: E402


def run(env: dict[str, str], event: int, extra: dict[str, str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(event), "--json"],
                        env=dict(env, **extra), capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    import json

    try:
        doc = json.loads(cp.stdout)
        states: dict[str, int] = {}
        for h in doc.get("hosts", []):
            states[h["status"]] = states.get(h["status"], 0) + 1
        errors = sorted({(h.get("error") or "")[:90] for h in doc.get("hosts", []) if h["status"] != "success"})
        summary = f"{doc.get('status')} {states} {errors[:3] if errors else ''}"
    except ValueError:
        summary = f"exit {cp.returncode}: {cp.stderr[-300:]}"
    return wall, cpu, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=300)
    ap.add_argument("--quiet", type=float, default=30.0, help="seconds the script prints nothing")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cfab-liveness-"))
    pool = DevHostPool(tmp / "hosts")
    try:
        keys = (tmp / "keys" / "cosign.key", tmp / "keys" / "cosign.pub")
        generate_keypair(*keys)
        art = build_runner(ROOT / "runner", tmp / "dist")
        sign_file(art.path, load_private_key(keys[0]))
        t0 = time.monotonic()
        hosts = pool.add_hosts(args.hosts, ready_timeout=300)
        print(f"# {len(hosts)} local sshd hosts up in {time.monotonic() - t0:.1f} s; {os.cpu_count()} cores",
              flush=True)
        db_url = f"sqlite:///{tmp / 'cronium.db'}"
        db = Database(db_url)
        db.init()
        data = tmp / "data"
        data.mkdir()
        store = KnownHostsStore(data / "known_hosts")
        ids = []
        for h in hosts:
            kind, b64 = h.host_public_key.split()[:2]
            store.add(host_entry_name(h.address, h.port), paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
            ids.append(add_server(db, h.name, address=h.address, port=h.port, username=h.user,
                                  ssh_key=h.private_key_text))
        warm = add_event(db, name="warm", content="true", servers=ids)
        quiet = add_event(db, name="quiet", content=f"sleep {args.quiet:g}; echo done", servers=ids,
                          timeout_value=int(args.quiet * 4))
        db.dispose()
        env = dict(os.environ, CRONIUM_DATABASE_URL=db_url, CRONIUM_FAB_DATA_DIR=str(data),
                   CRONIUM_FAB_SIGNING_KEY=str(keys[0]), CRONIUM_FAB_PUBLIC_KEY=str(keys[1]),
                   CRONIUM_FAB_RUNNER=str(art.path), CRONIUM_FAB_PAYLOAD_DIR=str(tmp / "payloads"),
                   CRONIUM_FAB_HELPER_MODE="bundled", CRONIUM_FAB_WORKER="off", CRONIUM_FAB_PARALLEL=str(args.hosts))
        run(env, warm, {})   # installs the runner everywhere
        rows = []
        for name, extra in (("heartbeat 2 s / 10 s", {}),
                            ("no heartbeat (1e6 s)", {"CRONIUM_FAB_HEARTBEAT": "1e6", "CRONIUM_FAB_HEARTBEAT_TIMEOUT": "2e6"})):
            wall, cpu, summary = run(env, quiet, extra)
            rows.append((name, wall, cpu))
            print(f"{name:24} wall {wall:6.1f} s  controller CPU {cpu:6.2f} s  {summary}", flush=True)
        print(f"# CPU ratio heartbeat/baseline: {rows[0][2] / rows[1][2]:.2f}; "
              f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        pool.stop()


if __name__ == "__main__":
    main()
