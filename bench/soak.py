"""Soak: many warm runs of one event on 5 local sshd hosts; do the long-lived processes leak?

Run by hand (not a test)::

    flock /tmp/cronium-bench.lock .venv/bin/python bench/soak.py [--runs 10000] [--db sqlite|postgresql]
        [--hosts 5] [--serve] [--samples 20]

- Default: through the CLI worker, as the Cronium backend calls us: a ``cronium-fab worker`` and
  ``cronium-fab run-event --id N --json`` once per run. The worker forks for every run (the fork
  does the run and exits), so what can leak in the worker itself is only what its parent keeps:
  the table samples the parent, and counts its children (zombies or forks that did not end).
- ``--serve``: through ``cronium-fab serve``: jobs are enqueued one after another (each waited
  for), and every run happens inside that one process, so its fds, threads and RSS are the figures
  that matter.

At ``--samples`` points it prints, for the long-lived process: open fds, threads, RSS (KiB), its
live children, its TCP connections to PostgreSQL (``--db postgresql``: the database connections
it holds, read from /proc/net/tcp, so other users of the same server do not count), and on the
hosts: processes below the sshd listeners that are not sshd (leftover shells, runners, scripts),
entries in the hosts' TMPDIRs (leftover work dirs) and sshd sessions of live connections (``hconn``:
``serve`` keeps one per host between runs, see docs/QUEUE.md); each sample is taken once the last run has wound down (or after 3 s). The verdict fits
a line through the samples of the second half of the runs (the first half is warm-up: caches,
lazy imports, the connection pool, the allocator) and gives each figure's growth per 1,000 runs:
``flat`` when under the threshold, else ``GROWS``. Every run must succeed; a failed one stops the
soak with its output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_queue import serve  # noqa: E402
from bench_run_event import cli_env, pg_schema, setup, start_worker  # noqa: E402
from sqlalchemy import select  # noqa: E402

from cronium_fab.db.engine import Database  # noqa: E402
from cronium_fab.db.models import Job  # noqa: E402
from cronium_fab.jobqueue import enqueue  # noqa: E402
from cronium_fab.testing.hosts import DevHost, DevHostPool, process_trees  # noqa: E402

CLI = str(Path(sys.executable).parent / "cronium-fab")
# growth per 1,000 runs above which a figure is reported as growing
THRESHOLDS = {"fds": 0.5, "threads": 0.5, "rss_kib": 512.0, "children": 0.5, "pg_conns": 0.5,
              "host_procs": 0.5, "host_tmp": 0.5, "host_conns": 0.5}


@dataclass
class Sample:
    runs: int
    seconds: float
    fds: int
    threads: int
    rss_kib: int
    children: int
    pg_conns: int
    host_procs: int   # below the hosts' sshd listeners, not sshd: shells, runners, scripts left
    host_tmp: int
    host_conns: int = 0   # sshd sessions of live connections (serve keeps one per host between runs)


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_conns_to(port: int, inodes: set[int]) -> int:
    """How many established TCP connections to ``port`` are among the sockets ``inodes``."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and int(cols[9]) in inodes:
                    n += 1
    return n


def _sample_once(pid: int, runs: int, t0: float, hosts: list[DevHost]) -> Sample:
    st = _status(pid)
    tree = process_trees([pid])
    inodes: set[int] = set()
    for p in tree:
        with contextlib.suppress(OSError):
            inodes |= _socket_inodes(p)
    host_tree = [p for p in process_trees([h.pid for h in hosts if h.pid]) if p not in {h.pid for h in hosts}]
    sshd = sum(1 for p in host_tree if _comm(p).startswith("sshd"))
    return Sample(runs=runs, seconds=time.monotonic() - t0, fds=len(os.listdir(f"/proc/{pid}/fd")),
                  threads=int(st["Threads"]), rss_kib=int(st["VmRSS"].split()[0]), children=len(tree) - 1,
                  pg_conns=tcp_conns_to(5432, inodes), host_procs=len(host_tree) - sshd,
                  host_tmp=sum(len(os.listdir(h.tmp_dir)) for h in hosts), host_conns=sshd)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read()
    except OSError:
        return ""


def kept(s: Sample) -> int:
    """Connections serve keeps (a Paramiko thread each) once the hosts' other sessions ended."""
    return s.host_conns if s.host_procs == 0 else 0


def sample(pid: int, runs: int, t0: float, hosts: list[DevHost], settle: float = 3.0) -> Sample:
    """A sample once the last run has wound down (its fork exited, its host threads and the hosts'
    sshd sessions ended: a run is recorded a moment before they are gone), or after ``settle`` s."""
    deadline = time.monotonic() + settle
    s = _sample_once(pid, runs, t0, hosts)
    while (s.children or s.host_procs or s.threads > 2 + kept(s)) and time.monotonic() < deadline:
        time.sleep(0.05)
        s = _sample_once(pid, runs, t0, hosts)
    return s


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def verdict(samples: list[Sample], runs: int) -> dict[str, tuple[float, bool]]:
    steady = [s for s in samples if s.runs >= runs // 2] or samples
    out = {}
    for k, limit in THRESHOLDS.items():
        xs = [float(s.runs) for s in steady]
        ys = [float(getattr(s, k)) for s in steady]
        g = slope_per_1000(xs, ys)
        # flat: the fitted growth is small, or the figure did not end above its steady-state start
        out[k] = (g, g <= limit or ys[-1] <= ys[0])
    return out


def run_cli(env: dict[str, str], event: int) -> None:
    p = subprocess.run([CLI, "run-event", "--id", str(event), "--json"], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"run-event exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def run_job(db: Database, event: int, timeout: float = 120) -> None:
    job_id, _ = enqueue(db, event)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        with db.session() as s:
            status, result = s.execute(select(Job.status, Job.result).where(Job.id == job_id)).one()
        if status in ("completed", "failed", "cancelled"):
            if status != "completed":
                raise SystemExit(f"job {job_id} ended {status}: {json.dumps(result)[:3000]}")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} still {status} after {timeout} s")
        time.sleep(delay)
        delay = min(0.05, delay * 1.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--serve", action="store_true", help="run through `cronium-fab serve` (enqueued jobs)")
    ap.add_argument("--samples", type=int, default=20, help="how many samples over the runs")
    ap.add_argument("--json", type=Path, help="also write the samples and the verdict here")
    args = ap.parse_args()
    every = max(1, args.runs // args.samples)
    work = Path(tempfile.mkdtemp(prefix="cfab-soak-"))
    pool = DevHostPool(work / "hosts")
    procs: list[subprocess.Popen[bytes]] = []
    with pg_schema(args.db) as url:
        try:
            hosts = pool.add_hosts(args.hosts)
            settings, event, _known = setup(work, hosts, url, content="echo soak $$")
            env = dict(cli_env(settings), CRONIUM_FAB_WORKER_SOCKET=str(work / "w.sock"))
            db = Database(settings.database_url)
            if args.serve:
                target = serve(env, work, "soak")
                procs.append(target)

                def one() -> None:
                    run_job(db, event)
            else:
                target = start_worker(sys.executable, env, work)
                procs.append(target)

                def one() -> None:
                    run_cli(env, event)
            one()   # warm: the runner cached on every host, the payload built
            mode = "serve (jobs enqueued, runs in the process)" if args.serve else "CLI worker (a fork per run)"
            print(f"# soak: {args.runs} runs of `echo` on {args.hosts} local sshd hosts, {args.db}, {mode}")
            print(f"# sampled process: pid {target.pid}; every {every} runs\n")
            head = (f"{'runs':>7} {'s':>7} {'runs/s':>6} {'fds':>4} {'thr':>4} {'RSS KiB':>8} {'child':>5} "
                    f"{'pg':>3} {'hproc':>5} {'htmp':>4} {'hconn':>5}")
            print(head)
            t0 = time.monotonic()
            samples = [sample(target.pid, 0, t0, hosts)]

            def show(s: Sample, prev: Sample) -> None:
                rate = (s.runs - prev.runs) / max(1e-9, s.seconds - prev.seconds)
                print(f"{s.runs:7d} {s.seconds:7.1f} {rate:6.1f} {s.fds:4d} {s.threads:4d} {s.rss_kib:8d} "
                      f"{s.children:5d} {s.pg_conns:3d} {s.host_procs:5d} {s.host_tmp:4d} {s.host_conns:5d}",
                      flush=True)

            show(samples[0], samples[0])
            for i in range(1, args.runs + 1):
                one()
                if i % every == 0 or i == args.runs:
                    samples.append(sample(target.pid, i, t0, hosts))
                    show(samples[-1], samples[-2])
            result = verdict(samples, args.runs)
            print("\nverdict (growth per 1,000 runs over the second half, least squares):")
            for k, (g, flat) in result.items():
                print(f"  {k:10s} {g:+10.2f}  {'flat' if flat else 'GROWS'}")
            ok = all(flat for _, flat in result.values())
            print(f"\n{'FLAT' if ok else 'LEAK'}: {args.runs} runs in {samples[-1].seconds:.0f} s")
            if args.json:
                args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "samples": [vars(s) for s in samples],
                                                 "verdict": {k: {"per_1000": g, "flat": f}
                                                             for k, (g, f) in result.items()}}, indent=1))
            db.dispose()
            return 0 if ok else 1
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
            pool.stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
