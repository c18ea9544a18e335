"""Benchmark: warm `cronium-fab run-event` of a trivial event vs OpenSSH and Fabric baselines.

Run by hand (not a test): ``.venv/bin/python bench/bench_run_event.py [--hosts 1,10,50] [--reps 5]``.
Everything is measured in the same run on the same local sshd hosts, and reported as ratios:

- ``cronium-fab``: the CLI, as the Cronium backend calls it (``run-event --id N --quiet``), runner
  already cached on every host (warm path: one exec per host), without a worker (``CRONIUM_FAB_WORKER=off``:
  a fresh interpreter that imports everything) and served by a running ``cronium-fab worker``
  (docs/WORKER.md: the client hands the command to a fork of an already-loaded process).
- ``ssh``: the OpenSSH client, ``ssh host true``; many hosts in parallel with ``xargs -P``.
- ``fabric``: ``fabric.ThreadingGroup(...).run('true')`` with fresh connections, as a program
  (``python -c``), so both sides pay for interpreter start-up and imports.
- ``library``: ``run_event()`` in an already-running Python process vs ThreadingGroup in-process,
  which takes interpreter start-up and imports out of the picture.

It also prints where the CLI's time goes: interpreter start-up, imports, and the phases of one run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cronium_fab.build import build_runner  # noqa: E402
from cronium_fab.db.engine import Database  # noqa: E402
from cronium_fab.execute import RunRequest, run_event  # noqa: E402
from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name  # noqa: E402
from cronium_fab.settings import Settings  # noqa: E402
from cronium_fab.signing import generate_keypair, load_private_key, sign_file  # noqa: E402
from cronium_fab.testing.factories import add_event, add_server  # noqa: E402
from cronium_fab.testing.hosts import DevHost, DevHostPool  # noqa: E402

PG = os.environ.get("CRONIUM_TEST_DATABASE_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def pg_schema(db: str = "postgresql") -> Iterator[str | None]:
    """``db="postgresql"``: a private schema on ``PG`` (dropped after), as a database URL; else None (SQLite)."""
    if db != "postgresql":
        yield None
        return
    from cronium_fab.testing.pg import private_schema

    with private_schema(PG, "cfab_bench_") as url:
        yield url


def timed(cmd: list[str] | str, env: dict[str, str] | None = None, shell: bool = False) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, shell=shell, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median_of(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn() for _ in range(reps))


def setup(work: Path, hosts: list[DevHost], database_url: str | None = None,
          content: str = "true") -> tuple[Settings, int, Path]:
    key, pub = work / "keys" / "cosign.key", work / "keys" / "cosign.pub"
    generate_keypair(key, pub)
    art = build_runner(ROOT / "runner", work / "dist")
    sign_file(art.path, load_private_key(key))
    settings = Settings(database_url=database_url or f"sqlite:///{work / 'cronium.db'}", data_dir=work / "data",
                        signing_key=key,
                        public_key=pub, runner_path=art.path, payload_dir=work / "payloads",
                        helper_mode="bundled", parallel=64)
    db = Database(settings.database_url)
    db.init()
    settings.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    store = KnownHostsStore(settings.known_hosts)
    ssh_known = work / "ssh_known_hosts"
    lines = []
    ids = []
    for h in hosts:
        kind, b64 = h.host_public_key.split()[:2]
        store.add(host_entry_name(h.address, h.port), paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
        lines.append(h.known_hosts_line())
        ids.append(add_server(db, h.name, address=h.address, port=h.port, username=h.user, ssh_key=h.private_key_text))
    ssh_known.write_text("\n".join(lines) + "\n")
    event = add_event(db, content=content, servers=ids)
    db.dispose()
    return settings, event, ssh_known


def host_phases(settings: Settings) -> tuple[float, float]:
    """Median setup and execution milliseconds of the hosts of the last run (executions rows)."""
    from sqlalchemy import select

    from cronium_fab.db.models import Execution

    db = Database(settings.database_url)
    with db.session() as s:
        last_job = s.scalars(select(Execution.job_id).order_by(Execution.created_at.desc())).first()
        rows = s.scalars(select(Execution).where(Execution.job_id == last_job)).all()
        out = (statistics.median(r.setup_duration or 0 for r in rows),
               statistics.median(r.execution_duration or 0 for r in rows))
    db.dispose()
    return out


def cli_env(settings: Settings) -> dict[str, str]:
    return dict(os.environ, CRONIUM_DATABASE_URL=settings.database_url, CRONIUM_FAB_DATA_DIR=str(settings.data_dir),
                CRONIUM_FAB_SIGNING_KEY=str(settings.signing_key), CRONIUM_FAB_PUBLIC_KEY=str(settings.public_key),
                CRONIUM_FAB_RUNNER=str(settings.runner_path), CRONIUM_FAB_PAYLOAD_DIR=str(settings.payload_dir),
                CRONIUM_FAB_HELPER_MODE="bundled", CRONIUM_FAB_PARALLEL="64")


def start_worker(py: str, env: dict[str, str], work: Path) -> subprocess.Popen[bytes]:
    """A `cronium-fab worker` on ``env``'s socket; it serves every size (each client brings its own env)."""
    log = work / "worker.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([str(Path(py).parent / "cronium-fab"), "worker"], env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def ssh_cmd(h: DevHost, known: Path) -> str:
    return (f"ssh -o BatchMode=yes -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes "
            f"-o GlobalKnownHostsFile=/dev/null -i {h.private_key_path} -p {h.port} {h.user}@{h.address} true")


FABRIC_PROGRAM = """
import sys, fabric
hosts = [a.split('|') for a in sys.argv[1:]]
g = fabric.ThreadingGroup.from_connections([
    fabric.Connection(a, user=u, port=int(p), connect_kwargs={"key_filename": [k], "look_for_keys": False,
                                                              "allow_agent": False})
    for u, a, p, k in hosts])
g.run("true", hide=True, in_stream=False)
g.close()
"""


def fabric_args(hosts: list[DevHost]) -> list[str]:
    return [f"{h.user}|{h.address}|{h.port}|{h.private_key_path}" for h in hosts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="1,10,50")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(x) for x in args.hosts.split(",")]
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="cfab-bench-") as tmp:
        work = Path(tmp)
        pool = DevHostPool(work / "hosts")
        worker: subprocess.Popen[bytes] | None = None
        try:
            all_hosts = pool.add_hosts(max(sizes), ready_timeout=60)
            print(f"# {max(sizes)} local sshd hosts, {args.reps} repetitions, medians in seconds\n")
            print("where the CLI's time goes (1 process):")
            bare = median_of(lambda: timed([py, "-c", "pass"]), args.reps)
            imp = median_of(lambda: timed([py, "-c", "import cronium_fab.execute, cronium_fab.cli"]), args.reps)
            print(f"  interpreter start-up           {bare:.3f}")
            print(f"  + imports (sqlalchemy, fabric)  {imp - bare:.3f}")
            rows = []
            phases: list[tuple[float, ...]] = []
            for n in sizes:
                hosts = all_hosts[:n]
                sub = work / f"n{n}"
                sub.mkdir()
                settings, event, known = setup(sub, hosts)
                env = dict(cli_env(settings), CRONIUM_FAB_WORKER_SOCKET=str(work / "w.sock"))
                cli = [str(Path(py).parent / "cronium-fab"), "run-event", "--id", str(event), "--quiet"]
                if worker is None:
                    worker = start_worker(py, env, work)
                timed(cli, env)  # warm: installs the runner on every host
                t_cli = median_of(lambda: timed(cli, dict(env, CRONIUM_FAB_WORKER="off")), args.reps)  # noqa: B023
                t_wcli = median_of(lambda: timed(cli, env), args.reps)  # noqa: B023
                if n == 1:
                    t_ssh = median_of(lambda: timed(ssh_cmd(hosts[0], known), shell=True), args.reps)  # noqa: B023
                else:
                    script = "\n".join(ssh_cmd(h, known) for h in hosts)
                    listing = sub / "ssh_cmds"
                    listing.write_text(script + "\n")
                    t_ssh = median_of(lambda: timed(f"xargs -P {n} -I{{}} sh -c '{{}}' < {listing}", shell=True),  # noqa: B023
                                      args.reps)
                t_fab = median_of(lambda: timed([py, "-c", FABRIC_PROGRAM, *fabric_args(hosts)]), args.reps)  # noqa: B023

                cpu: dict[str, list[float]] = {"lib": [], "tg": []}

                def lib_run() -> float:
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = run_event(settings, RunRequest(event_id=event), out=None)  # noqa: B023
                    assert r.status == "SUCCESS", r.to_dict()
                    cpu["lib"].append(time.process_time() - c0)  # noqa: B023
                    return time.perf_counter() - t0

                import fabric

                def lib_fab(cmd: str = "true") -> float:
                    t0, c0 = time.perf_counter(), time.process_time()
                    g = fabric.ThreadingGroup.from_connections([
                        fabric.Connection(h.address, user=h.user, port=h.port,
                                          connect_kwargs={"key_filename": [str(h.private_key_path)],
                                                          "look_for_keys": False, "allow_agent": False})
                        for h in hosts])  # noqa: B023
                    g.run(cmd, hide=True, in_stream=False)
                    g.close()
                    if cmd == "true":
                        cpu["tg"].append(time.process_time() - c0)  # noqa: B023
                    return time.perf_counter() - t0

                t_lib = median_of(lib_run, args.reps)
                t_libfab = median_of(lib_fab, args.reps)
                # The floor of ANY Python runner: what starting a bare interpreter on every host costs.
                t_libpy = median_of(lambda: lib_fab("python3 -I -S -c pass"), args.reps)
                rows.append((n, t_cli, t_wcli, t_ssh, t_fab, t_lib, t_libfab, t_libpy))
                phases.append((n, statistics.median(cpu["lib"]), statistics.median(cpu["tg"]),
                               *host_phases(settings)))
            print("\n CLI without a worker (fresh interpreter + imports) and served by `cronium-fab worker`")
            print(" hosts | CLI, no worker | CLI via worker | ssh (xargs -P) | fabric program | no worker vs ssh "
                  "| worker vs ssh | no worker vs fabric | worker vs fabric")
            for n, t_cli, t_wcli, t_ssh, t_fab, *_ in rows:
                print(f" {n:5d} | {t_cli:14.3f} | {t_wcli:14.3f} | {t_ssh:14.3f} | {t_fab:14.3f} | "
                      f"{t_cli / t_ssh:15.2f}x | {t_wcli / t_ssh:12.2f}x | {t_cli / t_fab:18.2f}x | "
                      f"{t_wcli / t_fab:15.2f}x")
            print("\n in one running process: run_event() vs fabric.ThreadingGroup(...).run('true'), and the same group")
            print(" running `python3 -I -S -c pass` (the floor of any Python runner: interpreter start-up on every host;")
            print(" with local hosts, all of them share this machine's cores)")
            print(" hosts | run_event() lib | ThreadingGroup true | lib ratio | TG python3 -c pass | its ratio to true")
            for n, _, _, _, _, t_lib, t_libfab, t_libpy in rows:
                print(f" {n:5d} | {t_lib:15.3f} | {t_libfab:19.3f} | {t_lib / t_libfab:8.2f}x | {t_libpy:18.3f} | "
                      f"{t_libpy / t_libfab:16.2f}x")
            print("\n where a library run's time goes (medians): controller CPU of run_event() vs ThreadingGroup,")
            print(" and per host: set-up (connect + bootstrap until the runner answers) and script execution")
            print(" hosts | controller CPU run_event | controller CPU ThreadingGroup | host set-up | host execution")
            for n, c_lib, c_tg, setup_ms, exec_ms in phases:
                print(f" {n:5d} | {c_lib:24.3f} | {c_tg:29.3f} | {setup_ms / 1000:11.3f} | {exec_ms / 1000:14.3f}")
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=30)
            pool.stop()


if __name__ == "__main__":
    main()
