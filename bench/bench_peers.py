"""Benchmark against the peers (issue 13): the same work on N local sshd hosts, tool by tool, in one run.

Run by hand (not a test)::

    .venv/bin/python bench/bench_peers.py [--hosts 1,20,100,300] [--rounds 3] [--works python,true]

Every tool runs the same thing on every host; each cell is the median wall seconds of ``--rounds``
rounds. Within a round the tools take turns (the order rotates round by round), so the noise of a
shared 2-core machine falls on all of them alike; compare ratios, not seconds across runs.

- OpenSSH parallel: ``ssh -o BatchMode=yes host python3 -c pass``, all hosts at once (``xargs -P N``).
- Fabric ThreadingGroup: ``ThreadingGroup(...).run('python3 -c pass')`` as a program (``python -c``),
  so it pays interpreter start-up and imports like our CLI does.
- pyinfra exec: ``pyinfra inventory.py exec -y -- python3 -c pass``.
- Ansible ad-hoc: ``ansible all -i inventory -m raw -a 'python3 -c pass'`` (forks = N, pipelining).
- cronium-fab CLI: ``cronium-fab run-event --id N --quiet`` of a PYTHON event ``pass`` (BASH ``true``
  for the ``true`` work), without a worker (``CRONIUM_FAB_WORKER=off``) and served by a running
  ``cronium-fab worker``; default settings, runner already cached on the hosts. Through the worker
  twice: with its default, a run process that keeps the hosts' connections from the previous run
  serves the next (docs/WORKER.md; the untimed warm-up run opened them), and with
  ``CRONIUM_FAB_KEEP_CONNECTIONS=0`` (a fork and fresh connections every run: what a first run costs).
- cronium-fab serve: the same event as a job of the queue (Cronium's path), run by a running
  ``cronium-fab serve`` with default settings, so with the hosts' connections kept from its previous
  run (``--keep-connections`` 300 s): wall from the enqueue to the job's end as seen by polling its
  row every 5 ms (serve looks for jobs every 20 ms here: SQLite has no NOTIFY; on PostgreSQL
  ``enqueue`` wakes it at once); controller CPU = the serve process's CPU over that window. The
  table says how many hosts' runs reused a connection.

Every tool checks host keys against the hosts' real keys (OpenSSH/Ansible: a known_hosts file with
``StrictHostKeyChecking=yes``; Fabric: the host's key in the client and a RejectPolicy; pyinfra:
``ssh_known_hosts_file`` + ``ssh_strict_host_key_checking``; cronium-fab: its strict store), and
every tool but ``serve`` and the default worker opens fresh connections every run (no ControlMaster).

``--rtt MS`` puts a network round trip in front of every host, for every tool alike (a relay in its
own process, ``bench/latency.py``: this kernel has no ``netem``); ``--parallel N`` sets our tools'
``CRONIUM_FAB_PARALLEL`` (the peers keep their defaults: Fabric all hosts at once, pyinfra 20 per
core, Ansible forks = hosts). Our package is byte-compiled first, as installing it does (the peers'
venv is): an editable checkout under ``PYTHONDONTWRITEBYTECODE`` would compile it at every run.

The peers (fabric, pyinfra, ansible-core) are installed from the package registry into a scratch
venv under the bench's temp dir, never into the project's venv (``--peers-venv DIR`` reuses one).
The hosts and the temp dir are removed on exit, on Ctrl-C and on SIGTERM.

Also printed: the controller's CPU (user+sys of the tool's process tree, from ``wait4``; via the
worker: the client plus the worker's run processes, reaped or kept) per host, its peak RSS; the hosts' CPU per host
(every sshd listener and all it reaped: sessions, shells, the runner, the script; read from
/proc/PID/stat before and after each run) and the machine's total per host; and the runner's CPU per
run on a target against a bare ``python3 -I -S -c pass`` and against the work alone as a shell runs
it (``--runner-cpu N`` iterations, 0 to skip; ``--runner-cpu-only`` for just that, no hosts and no peers).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import latency  # noqa: E402  (bench/, beside this file)

from cronium_fab.build import build_runner  # noqa: E402
from cronium_fab.testing.hosts import DevHost, DevHostPool  # noqa: E402

PEERS = ("fabric", "pyinfra", "ansible-core")
TOOLS = ("ssh", "fabric", "pyinfra", "ansible", "cli", "worker-fresh", "worker", "serve")
HEADINGS = {"ssh": "OpenSSH parallel", "fabric": "Fabric ThreadingGroup", "pyinfra": "pyinfra exec",
            "ansible": "Ansible ad-hoc", "cli": "cronium-fab CLI",
            "worker-fresh": "cronium-fab via worker, fresh connections",
            "worker": "cronium-fab via worker (default: kept connections)",
            "serve": "cronium-fab serve, kept connections"}
OURS = ("cli", "worker-fresh", "worker", "serve")
WORKS = {  # work -> (shell command for the peers, cronium-fab event type, event content)
    "python": ("python3 -c pass", "PYTHON", "pass"),
    "true": ("true", "BASH", "true"),
}
# The work alone, as Fabric runs it through a shell: what the runner's rows are compared with.
WORK_ALONE = {"BASH": ("sh -c true (the BASH work, as Fabric runs it)", ["sh", "-c", "true"]),
              "PYTHON": ("sh -c 'python3 -c pass' (the PYTHON work, as Fabric runs it)", ["sh", "-c", "python3 -c pass"])}
WORK_LABEL = {"python": "`python3 -c pass` / PYTHON event `pass`", "true": "`true` / BASH event `true`"}
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"


@dataclass
class Sample:
    wall: float
    cpu: float        # seconds of user+sys of the controller (its whole reaped process tree)
    rss_kb: int       # peak RSS of the largest process of that tree (0: not known)
    host_cpu: float = 0.0   # seconds of user+sys on the hosts: every sshd listener and all it reaped


# A small wrapper times the tool: wait4 gives a child's CPU and peak RSS, but a child forked from
# this (large) process starts with our RSS as its high-water mark; the wrapper's child starts small.
MEASURE = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write("%r %r %d" % (wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(st) & 255)
"""


def run_measured(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 extra_cpu: Callable[[], float] | None = None, host_cpu: Callable[[], float] | None = None) -> Sample:
    """Run ``argv`` to the end under the wrapper: wall, CPU and peak RSS of its tree (failures raise);
    ``host_cpu()`` (read before and after) gives the CPU the hosts spent on it."""
    fd, report = tempfile.mkstemp(prefix="cfab-measure-")
    os.close(fd)
    try:
        hosts_before = host_cpu() if host_cpu else 0.0
        before = extra_cpu() if extra_cpu else 0.0
        proc = subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", MEASURE, report, *argv], env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} ... exited {proc.returncode}:\n"
                               f"{proc.stdout.decode(errors='replace')[-3000:]}")
        wall, cpu, rss = Path(report).read_text().split()
    finally:
        os.unlink(report)
    extra = (extra_cpu() - before) if extra_cpu else 0.0
    on_hosts = (host_cpu() - hosts_before) if host_cpu else 0.0
    return Sample(float(wall), float(cpu) + extra, int(rss), on_hosts)


def children_cpu(pid: int, own: bool = False) -> float:
    """CPU seconds of the reaped children of ``pid`` (cutime + cstime in /proc/PID/stat; with ``own``
    its own utime + stime too), once the children it has (the worker's forks: it reaps them a moment
    after they answered; an sshd listener its sessions, which reap their shells) are reaped."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                if not f.read().strip():
                    break
        except OSError:
            break
        time.sleep(0.005)
    return _reaped_ticks(pid, own) / os.sysconf("SC_CLK_TCK")


def _reaped_ticks(pid: int, own: bool = False) -> int:
    """cutime + cstime of ``pid`` (with ``own``, its utime + stime too)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14]) + ((int(fields[11]) + int(fields[12])) if own else 0)


def worker_cpu(pid: int) -> float:
    """CPU seconds of a worker's run processes: those it reaped, and those it keeps (a run process
    that holds connections for the next command lives on). Waits (up to 5 s) until each live one
    waits for a command or has ended, and reads again if one ended while it read."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_kept_and_idle(k) for k in _children(pid)):
        time.sleep(0.005)
    while True:
        kids = _children(pid)
        ticks = _reaped_ticks(pid) + sum(_all_cpu_ticks(k) for k in kids)
        if _children(pid) == kids:
            return ticks / os.sysconf("SC_CLK_TCK")


def _kept_and_idle(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"for the next command" in f.read()
    except OSError:
        return True   # gone


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _all_cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])


def listener_cpu(pid: int) -> float:
    """CPU seconds of an sshd listener and everything under it: what it reaped, and its live
    connections (a connection ``serve`` keeps is a live child whose commands it reaped). Waits
    (up to 5 s) until no connection still runs a command, and reads again if a connection ended
    while it read."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _busy(pid):
        time.sleep(0.005)
    while True:
        tree = _descendants(pid)
        ticks = sum(_all_cpu_ticks(k) for k in tree) + _all_cpu_ticks(pid)
        if _descendants(pid) == tree:
            return ticks / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        k = todo.pop()
        out.append(k)
        todo.extend(_children(k))
    return sorted(out)


def _busy(pid: int) -> bool:
    """Something under the listener is not an sshd process (a shell, the runner, a script): a
    command is still running or not yet reaped."""
    for k in _descendants(pid):
        try:
            with open(f"/proc/{k}/comm") as f:
                if not f.read().startswith("sshd"):
                    return True
        except OSError:
            pass
    return False


def hosts_cpu(hosts: list[DevHost]) -> float:
    """CPU seconds spent on ``hosts`` so far: each sshd listener, the sessions it forked, and what
    they ran (shells, the runner, the script): everything a real host would spend."""
    return sum(listener_cpu(h.pid) for h in hosts if h.pid)


# --- the peers' scratch venv -----------------------------------------------------------------
def peers_venv(tmp: Path, reuse: str | None) -> Path:
    if reuse:
        venv = Path(reuse)
        if not (venv / "bin" / "python").exists():
            raise SystemExit(f"--peers-venv {venv}: no bin/python there")
        return venv
    venv = tmp / "peers-venv"
    base = getattr(sys, "_base_executable", None) or sys.executable
    print(f"# installing {', '.join(PEERS)} into a scratch venv ({venv}) ...", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          *PEERS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if pip.returncode != 0:
        raise SystemExit(f"pip install {' '.join(PEERS)} failed:\n{pip.stdout.decode(errors='replace')[-3000:]}")
    return venv


def peer_versions(venv: Path) -> str:
    code = ("import importlib.metadata as m, sys; print(' '.join(f'{p} {m.version(p)}' for p in sys.argv[1:]))")
    return subprocess.run([str(venv / "bin" / "python"), "-c", code, *PEERS, "paramiko"], check=True,
                          capture_output=True, text=True).stdout.strip()


# --- per tool set-up -------------------------------------------------------------------------
FABRIC_PROGRAM = """
import base64, sys, fabric, paramiko
cmd = sys.argv[1]
conns = []
for spec in sys.argv[2:]:
    u, a, p, k, kind, b64 = spec.split("|")
    c = fabric.Connection(a, user=u, port=int(p), connect_kwargs={"key_filename": [k], "look_for_keys": False,
                                                                 "allow_agent": False})
    c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    name = a if int(p) == 22 else "[%s]:%s" % (a, p)
    c.client.get_host_keys().add(name, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
    conns.append(c)
g = fabric.ThreadingGroup.from_connections(conns)
try:
    g.run(cmd, hide=True, in_stream=False)
finally:
    g.close()
"""


def fabric_specs(hosts: list[DevHost]) -> list[str]:
    out = []
    for h in hosts:
        kind, b64 = h.host_public_key.split()[:2]
        out.append(f"{h.user}|{h.address}|{h.port}|{h.private_key_path}|{kind}|{b64}")
    return out


def ssh_options(known: Path) -> list[str]:
    return ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-F", "/dev/null"]


def write_ssh_list(path: Path, hosts: list[DevHost], command: str) -> None:
    path.write_text("".join(f"-i {h.private_key_path} -p {h.port} {h.user}@{h.address} {command}\n" for h in hosts))


def write_pyinfra_inventory(path: Path, hosts: list[DevHost], known: Path) -> None:
    lines = ["hosts = ["]
    for h in hosts:
        data = {"ssh_port": h.port, "ssh_user": h.user, "ssh_key": str(h.private_key_path),
                "ssh_known_hosts_file": str(known), "ssh_strict_host_key_checking": "yes",
                "ssh_allow_agent": False, "ssh_look_for_keys": False}
        lines.append(f"    ({h.address!r}, {data!r}),")
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


def write_ansible(d: Path, hosts: list[DevHost], known: Path) -> tuple[Path, dict[str, str]]:
    d.mkdir(parents=True, exist_ok=True)
    inv = d / "inventory.ini"
    inv.write_text("[all]\n" + "".join(
        f"h{i} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user} "
        f"ansible_ssh_private_key_file={h.private_key_path}\n" for i, h in enumerate(hosts)))
    cfg = d / "ansible.cfg"
    ssh_args = " ".join(ssh_options(known)[:-2])  # without -F (ansible passes its own options)
    cfg.write_text(
        "[defaults]\n"
        f"forks = {max(len(hosts), 1)}\n"
        "host_key_checking = True\n"
        "gathering = explicit\n"
        "retry_files_enabled = False\n"
        f"interpreter_python = {SYSTEM_PYTHON}\n"
        f"local_tmp = {d / 'tmp'}\n"
        "[ssh_connection]\n"
        "pipelining = True\n"
        f"ssh_args = {ssh_args}\n"
    )
    env = dict(os.environ, ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOME=str(d / "home"), LANG="C.UTF-8",
               ANSIBLE_NOCOLOR="1", ANSIBLE_DEPRECATION_WARNINGS="0")
    return inv, env


# --- cronium-fab -----------------------------------------------------------------------------
@dataclass
class Ours:
    env: dict[str, str]
    events: dict[str, int]   # work -> event id


def setup_ours(work: Path, hosts: list[DevHost], keys: tuple[Path, Path], runner: Path,
               socket_path: Path) -> Ours:
    import paramiko

    from cronium_fab.db.engine import Database
    from cronium_fab.remote.known_hosts import KnownHostsStore, host_entry_name
    from cronium_fab.testing.factories import add_event, add_server

    data_dir = work / "data"
    db_url = f"sqlite:///{work / 'cronium.db'}"
    db = Database(db_url)
    db.init()
    (data_dir).mkdir(parents=True, exist_ok=True)
    store = KnownHostsStore(data_dir / "known_hosts")
    ids = []
    for h in hosts:
        kind, b64 = h.host_public_key.split()[:2]
        store.add(host_entry_name(h.address, h.port), paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
        ids.append(add_server(db, h.name, address=h.address, port=h.port, username=h.user, ssh_key=h.private_key_text))
    events = {w: add_event(db, name=f"bench-{w}", type=t, content=c, servers=ids) for w, (_, t, c) in WORKS.items()}
    db.dispose()
    env = dict(os.environ, CRONIUM_DATABASE_URL=db_url, CRONIUM_FAB_DATA_DIR=str(data_dir),
               CRONIUM_FAB_SIGNING_KEY=str(keys[0]), CRONIUM_FAB_PUBLIC_KEY=str(keys[1]),
               CRONIUM_FAB_RUNNER=str(runner), CRONIUM_FAB_PAYLOAD_DIR=str(work / "payloads"),
               CRONIUM_FAB_HELPER_MODE="bundled", CRONIUM_FAB_WORKER_SOCKET=str(socket_path))
    for k in ("CRONIUM_FAB_PARALLEL", "CRONIUM_FAB_WORKER", "CRONIUM_FAB_HOST_KEY_POLICY"):
        env.pop(k, None)    # default settings
    return Ours(env, events)


def start_serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "cronium-fab"), "serve", "--poll", "0.02"],
                                env=dict(env, CRONIUM_FAB_WORKER="off"), stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.monotonic() + 60
    while "serving" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"serve did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def process_cpu(pid: int) -> float:
    return _all_cpu_ticks(pid) / os.sysconf("SC_CLK_TCK")


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def run_job(db_url: str, event_id: int, serve_pid: int, host_cpu: Callable[[], float],
            reused: list[int]) -> Sample:
    """One job of ``event_id`` through the running ``serve``: enqueue, wait for its end (its row,
    read every 5 ms with sqlite3). Appends to ``reused`` how many of its hosts reused a connection."""
    import json
    import sqlite3

    from cronium_fab.db.engine import Database
    from cronium_fab.jobqueue import enqueue

    db = Database(db_url)
    try:
        hosts_before, cpu_before = host_cpu(), process_cpu(serve_pid)
        t0 = time.perf_counter()
        job_id = enqueue(db, event_id)[0]
    finally:
        db.dispose()
    con = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        while True:
            row = con.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row and row[0] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        if row[0] != "completed":
            raise RuntimeError(f"serve: job {job_id} {row[0]}")
        metas = con.execute("SELECT execution_metadata FROM executions WHERE job_id = ?", (job_id,)).fetchall()
    finally:
        con.close()
    reused.append(sum(1 for (m,) in metas if m and json.loads(m).get("connection_reused")))
    cpu = process_cpu(serve_pid) - cpu_before
    return Sample(wall, cpu, peak_rss_kb(serve_pid), host_cpu() - hosts_before)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "cronium-fab"), "worker"], env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


# --- the runner's CPU on a target ------------------------------------------------------------
def runner_cpu(work: Path, runners: list[tuple[str, Path, str, Callable[..., str]]],
               n: int) -> list[tuple[str, float, float]]:
    """CPU and wall ms per run (medians): bare interpreters vs the bootstrap + runner as over SSH, for
    each ``(label, runner pyz, sha256, bootstrap command of that sha)``; every runner has its own
    target home (and caches)."""
    from cronium_fab.payloads import build_payload_content
    from cronium_fab.remote.protocol import encode_input
    from cronium_fab.remote.runner_cache import runner_file_name

    envs: dict[str, dict[str, str]] = {}
    for label, runner, sha, _ in runners:
        home = work / f"target-{len(envs)}"
        cache = home / "cache" / "cronium"
        cache.mkdir(parents=True, mode=0o700)
        (home / "tmp").mkdir(mode=0o700)
        shutil.copy(runner, cache / runner_file_name(sha))
        (cache / runner_file_name(sha)).chmod(0o600)
        envs[label] = {"PATH": f"{os.path.dirname(SYSTEM_PYTHON)}:/usr/bin:/bin", "HOME": str(home),
                       "XDG_CACHE_HOME": str(home / "cache"), "TMPDIR": str(home / "tmp"), "LANG": "C.UTF-8"}
    bare_env = next(iter(envs.values()))

    def stdin_for(etype: str, content: str) -> bytes:
        pc = build_payload_content(1, etype, content)
        header = {"protocol": 2, "manifest": pc.manifest, "manifest_sha256": pc.manifest_sha256,
                  "job_id": "bench", "execution_id": 1, "event_id": 1, "event_name": "bench", "server_id": 1,
                  "server_name": "bench", "user_id": "u1", "trigger": "MANUAL", "helper_mode": "bundled",
                  "env": {}, "variables": {}, "input": None, "timeout": 30, "kill_grace": 5.0, "limits": {},
                  "output_cap": None, "keep_workdir": False}
        return encode_input(header, pc.data)

    ways: dict[str, tuple[list[str], bytes | None, dict[str, str]]] = {
        "python3 -I -S -c pass (bare)": ([SYSTEM_PYTHON, "-I", "-S", "-c", "pass"], None, bare_env),
        "python3 -c pass": ([SYSTEM_PYTHON, "-c", "pass"], None, bare_env),
        **{label: (argv, None, bare_env) for label, argv in WORK_ALONE.values()},
    }
    for label, _, sha, bootstrap_command in runners:
        boot = ["sh", "-c", bootstrap_command(sha)]
        ways[f"{label}, BASH event `true`"] = (boot, stdin_for("BASH", "true"), envs[label])
        ways[f"{label}, PYTHON event `pass`"] = (boot, stdin_for("PYTHON", "pass"), envs[label])

    def once(argv: list[str], data: bytes | None, env: dict[str, str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE)
        if data is not None and proc.stdin:
            proc.stdin.write(data)
            proc.stdin.flush()
        out = proc.stdout.read() if proc.stdout else b""
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdin:
            proc.stdin.close()
        if proc.stdout:
            proc.stdout.close()
        if data is not None and b'"status":"success"' not in out:
            raise RuntimeError(f"runner run failed: {out[-500:]!r}")
        return (ru.ru_utime + ru.ru_stime) * 1000, (time.perf_counter() - t0) * 1000

    for way in ways.values():   # warm: the first run fills the runner's caches
        once(*way)
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    for _ in range(n):          # interleaved, so drift affects every way alike
        for k, way in ways.items():
            got[k].append(once(*way))
    return [(k, statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in got.items()]


def print_runner_cpu(rows: list[tuple[str, float, float]], n: int) -> None:
    bare = rows[0][1]
    print(f"\n## Runner on a target: CPU per run (bootstrap + runner, as over SSH; {SYSTEM_PYTHON}; "
          f"median of {n})\n")
    # what the runner adds to the work itself (Fabric pays the work too, through the login shell)
    cpu_of = {k: cpu for k, cpu, _ in rows}
    work = {kind: cpu_of[label] for kind, (label, _) in WORK_ALONE.items()}
    print("| way | CPU ms | above bare | above the work alone | wall ms |")
    print("|---|---|---|---|---|")
    for k, cpu, wall in rows:
        kind = "BASH" if "BASH event" in k else "PYTHON" if "PYTHON event" in k else None
        above_work = f"{cpu - work[kind]:+.1f}" if kind else ""
        print(f"| {k} | {cpu:.1f} | {cpu - bare:+.1f} | {above_work} | {wall:.1f} |")
    sys.stdout.flush()


# --- main ------------------------------------------------------------------------------------
def compile_ours() -> None:
    """Byte-compile cronium_fab as installing it does: pip compiles a wheel's modules, and the
    peers' venv was installed so, but this checkout is an editable install whose modules are
    compiled on first import, never if PYTHONDONTWRITEBYTECODE is set (as on these machines,
    where every CLI run then compiled ~30 modules from source: ~0.1 s of CPU)."""
    import compileall
    if not compileall.compile_dir(str(ROOT / "cronium_fab"), quiet=1, workers=1):
        raise SystemExit("compileall cronium_fab failed")


def _stop_on_signals() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.wall for s in samples), statistics.median(s.cpu for s in samples),
                  int(statistics.median(s.rss_kb for s in samples)), statistics.median(s.host_cpu for s in samples))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="1,20,100,300", help="host counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--works", default="python,true", help="python and/or true")
    ap.add_argument("--tools", default=",".join(TOOLS), help="subset of " + ",".join(TOOLS))
    ap.add_argument("--peers-venv", help="an existing venv with fabric, pyinfra and ansible-core (else: installed)")
    ap.add_argument("--runner-cpu", type=int, default=20, help="iterations of the runner CPU measurement (0: skip)")
    ap.add_argument("--runner-cpu-only", action="store_true", help="only the runner CPU measurement")
    ap.add_argument("--runner-revs", help="git revisions whose runner (and bootstrap) is measured too (comma-separated)")
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--rtt", type=float, default=0.0,
                    help="network round trip in ms put in front of every host for every tool (bench/latency.py)")
    ap.add_argument("--parallel", type=int, default=0,
                    help="CRONIUM_FAB_PARALLEL for our tools (0: our default); the peers keep theirs")
    args = ap.parse_args()
    sizes = sorted(int(x) for x in args.hosts.split(","))
    works = [w for w in args.works.split(",") if w]
    tools = [t for t in args.tools.split(",") if t]
    for w in works:
        if w not in WORKS:
            raise SystemExit(f"unknown work {w!r}")
    for t in tools:
        if t not in TOOLS:
            raise SystemExit(f"unknown tool {t!r}")
    _stop_on_signals()
    tmp = Path(tempfile.mkdtemp(prefix="cfab-peers-"))
    pool: DevHostPool | None = None
    worker: subprocess.Popen[bytes] | None = None
    worker_fresh: subprocess.Popen[bytes] | None = None
    relay: subprocess.Popen[bytes] | None = None
    serving: list[subprocess.Popen[bytes]] = []
    reused: dict[tuple[int, str], list[int]] = {}
    try:
        from cronium_fab.signing import generate_keypair, load_private_key, sign_file

        keys = (tmp / "keys" / "cosign.key", tmp / "keys" / "cosign.pub")
        generate_keypair(*keys)
        art = build_runner(ROOT / "runner", tmp / "dist")
        sign_file(art.path, load_private_key(keys[0]))
        if args.runner_cpu or args.runner_cpu_only:
            from cronium_fab.remote.runner_cache import bootstrap_command
            runners = [("runner", art.path, art.sha256, bootstrap_command)]
            for rev in filter(None, (args.runner_revs or "").split(",")):
                src = tmp / f"src-{len(runners)}"
                src.mkdir()
                tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "runner",
                                      "cronium_fab/remote/runner_cache.py"], check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
                old = build_runner(src / "runner", src / "dist")
                ns: dict[str, Any] = {"__name__": "runner_cache_at_rev"}   # that revision's bootstrap too
                exec(compile((src / "cronium_fab/remote/runner_cache.py").read_text(), "runner_cache", "exec"), ns)
                runners.append((f"runner@{rev}", old.path, old.sha256, ns["bootstrap_command"]))
            n_cpu = max(args.runner_cpu, 1)
            print_runner_cpu(runner_cpu(tmp, runners, n_cpu), n_cpu)
        if args.runner_cpu_only:
            return
        venv = peers_venv(tmp, args.peers_venv)
        vpy = str(venv / "bin" / "python")
        print(f"# peers: {peer_versions(venv)}; controller python {sys.version.split()[0]}; "
              f"target python3 {SYSTEM_PYTHON}", flush=True)
        pool = DevHostPool(tmp / "hosts")
        t0 = time.monotonic()
        all_hosts = pool.add_hosts(max(sizes), ready_timeout=args.ready_timeout)
        print(f"# {len(all_hosts)} local sshd hosts up in {time.monotonic() - t0:.1f} s; {args.rounds} rounds; "
              f"{os.cpu_count()} cores", flush=True)
        if args.rtt:   # every tool connects through the relay, so every tool pays the same round trips
            relay, ports = latency.start(args.rtt, [(h.address, h.port) for h in all_hosts])
            all_hosts = [replace(h, port=p) for h, p in zip(all_hosts, ports, strict=True)]
            print(f"# every host behind a relay of {args.rtt:g} ms round trip (bench/latency.py)", flush=True)
        compile_ours()
        known = tmp / "ssh_known_hosts"
        known.write_text("".join(h.known_hosts_line() + "\n" for h in all_hosts))
        sock = tmp / "w.sock"
        cli = str(Path(sys.executable).parent / "cronium-fab")
        results: dict[tuple[int, str, str], Sample] = {}
        for n in sizes:
            hosts = all_hosts[:n]
            sub = tmp / f"n{n}"
            sub.mkdir()
            ours = setup_ours(sub, hosts, keys, art.path, sock)
            if args.parallel:
                ours.env["CRONIUM_FAB_PARALLEL"] = str(args.parallel)
            if worker is None and "worker" in tools:
                worker = start_worker(ours.env, tmp / "worker.log")
            fresh_env = dict(ours.env, CRONIUM_FAB_WORKER_SOCKET=str(tmp / "wf.sock"))
            if worker_fresh is None and "worker-fresh" in tools:
                worker_fresh = start_worker(dict(fresh_env, CRONIUM_FAB_KEEP_CONNECTIONS="0"),
                                            tmp / "worker-fresh.log")
            serve = start_serve(ours.env, sub / "serve.log") if "serve" in tools else None
            if serve is not None:
                serving.append(serve)
            runs: dict[tuple[str, str], Callable[[], Sample]] = {}

            def hc(hosts: list[DevHost] = hosts) -> float:
                return hosts_cpu(hosts)
            for w in works:
                cmd = WORKS[w][0]
                lst = sub / f"ssh-{w}.txt"
                write_ssh_list(lst, hosts, cmd)
                inv = sub / "pyinfra_inventory.py"
                write_pyinfra_inventory(inv, hosts, known)
                ainv, aenv = write_ansible(sub / "ansible", hosts, known)
                ev = ours.events[w]
                runs[("ssh", w)] = lambda lst=lst, n=n: run_measured(  # type: ignore[misc]
                    ["sh", "-c", f"xargs -P {n} -L 1 ssh {' '.join(ssh_options(known))} < {lst}"], host_cpu=hc)
                runs[("fabric", w)] = lambda cmd=cmd, hosts=hosts: run_measured(  # type: ignore[misc]
                    [vpy, "-c", FABRIC_PROGRAM, cmd, *fabric_specs(hosts)], host_cpu=hc)
                runs[("pyinfra", w)] = lambda cmd=cmd, inv=inv, sub=sub: run_measured(  # type: ignore[misc]
                    [str(venv / "bin" / "pyinfra"), str(inv), "exec", "-y", "--", *cmd.split()], cwd=sub, host_cpu=hc)
                runs[("ansible", w)] = lambda cmd=cmd, ainv=ainv, aenv=aenv, sub=sub: run_measured(  # type: ignore[misc]
                    [str(venv / "bin" / "ansible"), "all", "-i", str(ainv), "-m", "raw", "-a", cmd], env=aenv, cwd=sub,
                    host_cpu=hc)
                argv = [cli, "run-event", "--id", str(ev), "--quiet"]
                runs[("cli", w)] = lambda argv=argv, env=ours.env: run_measured(  # type: ignore[misc]
                    argv, env=dict(env, CRONIUM_FAB_WORKER="off"), host_cpu=hc)
                wpid = worker.pid if worker else 0
                runs[("worker", w)] = lambda argv=argv, env=ours.env, wpid=wpid: run_measured(  # type: ignore[misc]
                    argv, env=env, extra_cpu=lambda: worker_cpu(wpid), host_cpu=hc)
                fpid = worker_fresh.pid if worker_fresh else 0
                runs[("worker-fresh", w)] = lambda argv=argv, env=fresh_env, fpid=fpid: run_measured(  # type: ignore[misc]
                    argv, env=env, extra_cpu=lambda: children_cpu(fpid), host_cpu=hc)
                if serve is not None:
                    kept = reused.setdefault((n, w), [])
                    runs[("serve", w)] = lambda ev=ev, url=ours.env["CRONIUM_DATABASE_URL"], spid=serve.pid, \
                        kept=kept: run_job(url, ev, spid, hc, kept)  # type: ignore[misc]
                # warm: installs the runner on every host (and checks each tool works once)
                run_measured(argv, env=dict(ours.env, CRONIUM_FAB_WORKER="off"))
            for t in tools:
                for w in works:
                    runs[(t, w)]()   # one untimed run each: caches, first-connection effects
            got: dict[tuple[str, str], list[Sample]] = {k: [] for k in runs if k[0] in tools}
            t_size = time.monotonic()
            for r in range(args.rounds):
                order = tools[r % len(tools):] + tools[:r % len(tools)]
                for w in works:
                    for t in order:
                        got[(t, w)].append(runs[(t, w)]())
            for (t, w), samples in got.items():
                results[(n, w, t)] = median_sample(samples)
            for w in works:   # the warm-up run opened the connections: only the measured runs count
                if (n, w) in reused:
                    reused[(n, w)][:] = reused[(n, w)][1:]
            if serve is not None:
                serve.terminate()
                serve.wait(timeout=60)
            print(f"# {n} hosts measured in {time.monotonic() - t_size:.0f} s", flush=True)
            print_tables(results, [s for s in sizes if s <= n], works, tools, reused)
        print("\n# final")
        print_tables(results, sizes, works, tools, reused)
        if relay is not None:
            print(f"\n# the latency relay used {process_cpu(relay.pid):.1f} s of CPU over the whole bench "
                  f"(a load on the same 2 cores for every tool alike)")
    except KeyboardInterrupt as e:
        print(f"\n# interrupted ({e or 'Ctrl-C'}): cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for proc in [p for p in (worker, worker_fresh) if p is not None] + ([relay] if relay is not None else []) + serving:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if pool is not None:
            pool.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(results: dict[tuple[int, str, str], Sample], sizes: list[int], works: list[str],
          cols: list[str]) -> Iterator[tuple[int, str, dict[str, Sample]]]:
    """``(hosts, work, {tool: sample})`` of every measured row, in table order."""
    for n in sizes:
        for w in works:
            if (n, w, cols[0]) in results:
                yield n, w, {t: results[(n, w, t)] for t in cols}


def print_tables(results: dict[tuple[int, str, str], Sample], sizes: list[int], works: list[str],
                 tools: list[str], reused: dict[tuple[int, str], list[int]] | None = None) -> None:
    cols = [t for t in TOOLS if t in tools]
    ratios = [(a, b) for a in OURS for b in ("fabric", "pyinfra", "ssh") if a in cols and b in cols]
    print("\n## Wall seconds (median of rounds)\n")
    print("| hosts | work | " + " | ".join(HEADINGS[t] for t in cols) + " | "
          + " | ".join(f"{'CLI' if a == 'cli' else a} / {b}" for a, b in ratios) + " |")
    print("|" + "---|" * (2 + len(cols) + len(ratios)))
    for n, w, r in _rows(results, sizes, works, cols):
        print(f"| {n} | {WORK_LABEL[w]} | " + " | ".join(f"{r[t].wall:.3f}" for t in cols) + " | "
              + " | ".join(f"{r[a].wall / r[b].wall:.2f}×" for a, b in ratios) + " |")
    for (n, w), counts in sorted((reused or {}).items()):
        if n in sizes and counts:
            print(f"\nserve, {n} hosts, {w}: hosts that reused a kept connection in the measured runs: "
                  f"{', '.join(f'{c}/{n}' for c in counts)}")
    print("\n## Controller: CPU ms per host (user+sys of the tool's process tree / hosts; in brackets the")
    print("marginal cost of one more host against the smallest count) and peak RSS MB (the largest single")
    print("process of the tree; the worker's fork is not measured for RSS; serve: its peak since it started)\n")
    rss_cols = [t for t in cols if not t.startswith("worker")]
    print("| hosts | work | " + " | ".join(f"{HEADINGS[t]} CPU" for t in cols) + " | "
          + " | ".join(f"{HEADINGS[t]} RSS" for t in rss_cols) + " |")
    print("|" + "---|" * (2 + len(cols) + len(rss_cols)))
    for n, w, r in _rows(results, sizes, works, cols):
        n0 = sizes[0]
        cells = []
        for t in cols:
            cell = f"{r[t].cpu * 1000 / n:.1f}"
            if n > n0 and (n0, w, t) in results:
                cell += f" [{(r[t].cpu - results[(n0, w, t)].cpu) * 1000 / (n - n0):.1f}]"
            cells.append(cell)
        print(f"| {n} | {w} | " + " | ".join(cells) + " | "
              + " | ".join(f"{r[t].rss_kb / 1024:.0f}" for t in rss_cols) + " |")
    print("\n## Hosts: CPU ms per host (user+sys of every sshd listener and all it reaped: the sessions, the")
    print("shells, what they ran) and the whole machine's CPU per host (controller + hosts), whose sum over the")
    print("hosts divided by the cores bounds the wall time on this machine\n")
    print("| hosts | work | " + " | ".join(f"{HEADINGS[t]} hosts" for t in cols) + " | "
          + " | ".join(f"{HEADINGS[t]} total" for t in cols) + " |")
    print("|" + "---|" * (2 + 2 * len(cols)))
    for n, w, r in _rows(results, sizes, works, cols):
        print(f"| {n} | {w} | " + " | ".join(f"{r[t].host_cpu * 1000 / n:.1f}" for t in cols) + " | "
              + " | ".join(f"{(r[t].cpu + r[t].host_cpu) * 1000 / n:.1f}" for t in cols) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
