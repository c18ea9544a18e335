"""Benchmark: the job queue's overhead and throughput (`cronium-fab serve` on PostgreSQL).

Run by hand (not a test): ``.venv/bin/python bench/bench_queue.py [--rounds 15] [--hosts 10] [--jobs 30]``.
Needs PostgreSQL (``CRONIUM_TEST_DATABASE_URL`` or 127.0.0.1:5432, a private schema is made and dropped).

- **Latency**: from the call to the script's first instruction on the host (the script writes its
  start time): ``enqueue`` with an idle ``serve`` worker (woken by NOTIFY), against a warm
  ``cronium-fab run-event`` served by a ``cronium-fab worker`` of the same event, alternately, in one
  run; median and p95 of each, and the difference.
- **Throughput**: jobs/s of ``--jobs`` trivial jobs on ``--hosts`` hosts with 1, 2 and 3 workers
  (``--jobs 2`` each), from the enqueue of the first to the completion of the last.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import paramiko  # noqa: E402
from bench_run_event import cli_env, pg_schema, setup, start_worker  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from cronium_fab.db.engine import Database  # noqa: E402
from cronium_fab.db.models import Job  # noqa: E402
from cronium_fab.jobqueue import enqueue  # noqa: E402
from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name  # noqa: E402
from cronium_fab.settings import Settings  # noqa: E402
from cronium_fab.testing.factories import add_event, add_server  # noqa: E402
from cronium_fab.testing.hosts import DevHost, DevHostPool  # noqa: E402


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


def started_at(mark: Path, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while not mark.exists() or not mark.read_text().strip():
        if time.monotonic() > deadline:
            raise SystemExit(f"the script never started ({mark})")
        time.sleep(0.002)
    return float(mark.read_text())


def serve(env: dict[str, str], work: Path, name: str, jobs: int = 1) -> subprocess.Popen[bytes]:
    log = work / f"serve-{name}.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "cronium-fab"), "serve", "--worker-id", name,
                             "--jobs", str(jobs)], env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 30
    while "serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"serve did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def register(db: Database, settings: Settings, hosts: list[DevHost]) -> None:
    """More hosts as servers (ids 2..), their host keys trusted."""
    store = KnownHostsStore(settings.known_hosts)
    for h in hosts:
        add_server(db, h.name, address=h.address, port=h.port, username=h.user, ssh_key=h.private_key_text)
        kind, b64 = h.host_public_key.split()[:2]
        store.add(host_entry_name(h.address, h.port), paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=30)
    args = ap.parse_args()
    with pg_schema() as url:
        assert url is not None
        run(args, url)


def run(args: argparse.Namespace, url: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="cfab-bench-queue-"))
    pool = DevHostPool(work / "hosts")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        hosts = pool.add_hosts(args.hosts)
        mark = work / "mark"
        settings, one_host_event, _known = setup(work, hosts[:1], url, content=f"date +%s.%N > {mark}")
        db = Database(url)
        register(db, settings, hosts[1:])
        fleet_event = add_event(db, content="true", servers=list(range(1, args.hosts + 1)))
        env = dict(cli_env(settings), CRONIUM_FAB_WORKER_SOCKET=str(work / "w.sock"))
        procs.append(start_worker(sys.executable, env, work))
        procs.append(serve(env, work, "lat"))
        cli = str(Path(sys.executable).parent / "cronium-fab")
        for _ in range(2):   # warm: runner cached on the host, payload built, worker forked once
            subprocess.run([cli, "run-event", "--id", str(one_host_event), "--quiet"], env=env, check=True,
                           stderr=subprocess.DEVNULL)
        queued: list[float] = []
        direct: list[float] = []
        for _ in range(args.rounds):
            mark.unlink(missing_ok=True)
            t0 = time.time()
            subprocess.run([cli, "run-event", "--id", str(one_host_event), "--quiet"], env=env, check=True,
                           stderr=subprocess.DEVNULL)
            direct.append(started_at(mark) - t0)
            mark.unlink(missing_ok=True)
            t0 = time.time()
            enqueue(db, one_host_event)
            queued.append(started_at(mark) - t0)
            time.sleep(0.3)    # let the job's end be recorded before the next round
        stop(procs[1:])
        procs = procs[:1]
        print(f"## Queue latency, 1 host ({args.rounds} rounds, alternating)\n")
        print("| path | median ms | p95 ms |\n|---|---|---|")
        print(f"| warm `cronium-fab run-event` (worker) | {statistics.median(direct) * 1000:.0f} | {p95(direct) * 1000:.0f} |")
        print(f"| `enqueue` -> idle `serve` (NOTIFY) | {statistics.median(queued) * 1000:.0f} | {p95(queued) * 1000:.0f} |")
        print(f"| difference | {(statistics.median(queued) - statistics.median(direct)) * 1000:+.0f} | |\n")
        print(f"## Throughput, {args.jobs} jobs of `true` on {args.hosts} hosts\n")
        print("| workers | seconds | jobs/s |\n|---|---|---|")
        for n in (1, 2, 3):
            ws = [serve(env, work, f"t{n}-{i}", jobs=2) for i in range(n)]
            t0 = time.monotonic()
            for _ in range(args.jobs):
                enqueue(db, fleet_event)
            with db.session() as s:
                def left() -> int:
                    return s.scalar(select(func.count()).select_from(Job).where(
                        Job.event_id == fleet_event, Job.status.not_in(("completed", "failed", "cancelled")))) or 0
                while left():
                    s.expire_all()
                    time.sleep(0.05)
            took = time.monotonic() - t0
            print(f"| {n} | {took:.2f} | {args.jobs / took:.1f} |")
            stop(ws)
        db.dispose()
    finally:
        stop(procs)
        pool.stop()


if __name__ == "__main__":
    main()
