"""Latency and throughput of a helper call (GET variable) made directly against the helper API on localhost.

Run by hand (not a test):
    .venv/bin/python bench/bench_helper_api.py [-n 2000] [--clients 8] [--database-url postgresql+psycopg://...]
Default database: a temporary SQLite file. Prints the median / p95 latency of one call over a kept-alive
connection and over a new connection per call (what the runner's urllib shim does), and the calls per
second of one client and of ``--clients`` clients in parallel. The tunnel comparison (issue 5) reuses
``measure`` with the tunnel's port.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cronium_fab import records  # noqa: E402
from cronium_fab.db.engine import Database  # noqa: E402
from cronium_fab.db.models import Event, Execution, Job, User  # noqa: E402
from cronium_fab.helper_api import ExecutionContext, HelperAPI  # noqa: E402

EXEC = "exec_bench_1_1"


def prepare(db: Database) -> ExecutionContext:
    db.init()
    with db.session() as s:
        if s.get(User, "bench") is None:
            s.add(User(id="bench", email="bench@example.test", username="bench"))
            s.flush()
        event = Event(user_id="bench", name="bench", type="BASH", content="true")
        s.add(event)
        s.flush()
        job_id = f"job_bench_{event.id}"
        s.add(Job(id=job_id, event_id=event.id, user_id="bench", type="SCRIPT", status="running", payload={}))
        s.flush()
        s.add(Execution(id=f"{EXEC}_{event.id}", job_id=job_id, server_name="bench", status="running"))
        records.set_variable(s, "bench", "counter", {"n": 42, "label": "bench"})
        return ExecutionContext(f"{EXEC}_{event.id}", job_id, event.id, "bench", "bench", None, "bench")


def measure(port: int, path: str, token: str, n: int, *, keep_alive: bool) -> list[float]:
    """Seconds per call, ``n`` sequential GETs."""
    headers = {"Authorization": f"Bearer {token}"}
    times: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(n):
        if not keep_alive:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise SystemExit(f"unexpected HTTP {resp.status}")
        if not keep_alive:
            conn.close()
    conn.close()
    return times


def parallel_rate(port: int, path: str, token: str, n: int, clients: int) -> float:
    """Calls per second with ``clients`` keep-alive clients, ``n`` calls each."""
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=lambda: (barrier.wait(), measure(port, path, token, n, keep_alive=True)))
               for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return clients * n / (time.perf_counter() - t0)


def report(name: str, times: list[float]) -> None:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[int(len(ms) * 0.95) - 1]
    print(f"{name:<34} median {statistics.median(ms):6.3f} ms   p95 {p95:6.3f} ms   "
          f"{len(ms) / sum(times):7.0f} calls/s")


@contextlib.contextmanager
def private_schema(url: str | None) -> Iterator[str | None]:
    """On PostgreSQL, a throwaway schema (dropped afterwards): the bench never touches existing tables."""
    if not url or not url.startswith("postgresql"):
        yield url
        return
    from cronium_fab.testing.pg import private_schema as schema

    with schema(url, "cfab_bench_") as scoped:
        yield scoped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="calls per measurement")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, private_schema(args.database_url) as url:
        db = Database(url or f"sqlite:///{tmp}/bench.db")
        ctx = prepare(db)
        with HelperAPI(db, rate_per_s=None) as api:
            token = api.register_execution(ctx)
            path = f"/executions/{ctx.execution_id}/variables/counter"
            measure(api.port, path, token, 100, keep_alive=True)  # warm up pool and caches
            print(f"database: {db.dialect}; GET variable, {args.n} calls each")
            report("keep-alive connection", measure(api.port, path, token, args.n, keep_alive=True))
            report("new connection per call", measure(api.port, path, token, args.n, keep_alive=False))
            report("GET /health (no DB, keep-alive)", measure(api.port, "/health", token, args.n, keep_alive=True))
            rate = parallel_rate(api.port, path, token, args.n // args.clients or 1, args.clients)
            print(f"{args.clients} parallel keep-alive clients:       {rate:7.0f} calls/s")
        db.dispose()


if __name__ == "__main__":
    main()
