"""The fault matrix (issue 14): each fault injected on real local sshd hosts, counted per trial.

A trial runs ``cronium-fab run-event --id N --json`` (no worker: the controller is our child, so
``wait4`` gives its peak RSS) with one fault injected before or during the run, then checks:

- **hung**: the run ended within its bound (the fault's: event timeout + set-up limit + grace, or
  for a frozen peer timeout + 10 s, as issue 14 states, over the cell's trivial run); a run that passes ``bound + HARD_LIMIT`` is
  killed and counted hung;
- **wrong state**: every host in the expected typed terminal state, with a reason that names the
  fault (its ``error_kind``, or a word of its error/output);
- **leftovers**: no process of the script left on the host (its marker in argv, and nothing below
  the host's sshd listener), no ``cronium-run-*`` work dir left in the host's TMPDIR;
- **memory**: the controller's peak RSS stayed under the cell's baseline (a trivial run) + 64 MiB;
- **lost rows**: no ``executions``/``logs``/``jobs`` row left non-terminal (for a killed
  controller: after ``cronium-fab recover``, which the next process runs anyway).

A cell ``via="serve"`` runs every trial as a job of one long-lived ``cronium-fab serve`` instead
(Cronium's queue path, with its kept connections: a trial's fault must not reach the next trial
through a connection kept from it): its host result comes from the job's rows, memory is serve's
peak, the sshd sessions of kept connections are not leftovers while serve runs, and none may be
left once it stopped (``close_cell``). The two controller faults are the CLI's (a killed or frozen
``serve`` is tests/run/test_serve.py's: another worker takes over its jobs).

Used by ``bench/faults.py`` (many trials, the table) and ``tests/run/test_faults.py`` (a few each).
Mounts (a read-only cache dir, a 1 MiB work-dir filesystem) need root; without it those two faults
are reported as not run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from ..db.engine import Database
from ..remote.known_hosts import KnownHostsStore, host_entry_name
from ..settings import Settings
from .factories import add_event, add_server
from .hosts import DevHost, DevHostPool, generate_keypair, process_trees
from .procs import procs_with, session_processes, wait_until

CONNECT_TIMEOUT = 5.0
SETUP_TIMEOUT = 15.0
KILL_GRACE = 5.0        # the runner's SIGTERM -> SIGKILL grace
GRACE = 15.0            # controller start-up, DB writes, a connect retry on a loaded machine
HARD_LIMIT = 60.0       # past bound + this, the controller is killed and the trial counted hung
RSS_SLACK_KIB = 64 * 1024
OPEN_ROWS = {"executions": ("queued", "running", "pending"), "logs": ("RUNNING", "PENDING"),
             "jobs": ("queued", "running", "claimed")}


@dataclass
class Cell:
    """One database flavour x helper mode: its own database, known_hosts and settings."""

    db_flavour: str
    mode: str
    settings: Settings
    db: Database
    hosts: dict[str, DevHost]           # role -> host: ok (healthy), bad (host faults), nopy
    pool: DevHostPool
    work: Path
    servers: dict[str, int] = field(default_factory=dict)
    baseline_rss_kib: int = 0
    baseline_s: float = 0.0
    via: str = "cli"                                   # or "serve": trials are jobs of one serve
    serve: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.db_flavour}/{self.mode}" + ("/serve" if self.via == "serve" else "")

    def env(self) -> dict[str, str]:
        s = self.settings
        return dict(os.environ, CRONIUM_DATABASE_URL=s.database_url, CRONIUM_FAB_DATA_DIR=str(s.data_dir),
                    CRONIUM_FAB_SIGNING_KEY=str(s.signing_key), CRONIUM_FAB_PUBLIC_KEY=str(s.public_key),
                    CRONIUM_FAB_RUNNER=str(s.runner_path), CRONIUM_FAB_PAYLOAD_DIR=str(s.payload_dir),
                    CRONIUM_FAB_HELPER_MODE=self.mode, CRONIUM_FAB_WORKER="off",
                    CRONIUM_FAB_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT), CRONIUM_FAB_SETUP_TIMEOUT=str(SETUP_TIMEOUT))

    def trust(self, host: DevHost, key_line: str | None = None, port: int | None = None) -> None:
        import paramiko

        kind, b64 = (key_line or host.host_public_key).split()[:2]
        key = paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
        self.settings.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        KnownHostsStore(self.settings.known_hosts).replace(host_entry_name(host.address, port or host.port), key)

    def server(self, role: str, *, address: str | None = None, port: int | None = None,
               key: str | None = None) -> int:
        name = f"{role}-{address or ''}-{port or ''}-{'k' if key else ''}"
        if name not in self.servers:
            h = self.hosts[role]
            self.servers[name] = add_server(self.db, name, address=address or h.address, port=port or h.port,
                                            username=h.user, ssh_key=key or h.private_key_text)
        return self.servers[name]


@dataclass
class Trial:
    """What one trial found (empty lists: all good)."""

    fault: str
    cell: str
    seconds: float
    bound: float
    hung: bool = False
    wrong_state: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    lost_rows: list[str] = field(default_factory=list)
    rss_kib: int = 0
    rss_over: bool = False
    said: list[str] = field(default_factory=list)   # each host: state, kind, error (what the run said)

    @property
    def ok(self) -> bool:
        return not (self.hung or self.wrong_state or self.leftovers or self.lost_rows or self.rss_over)


@dataclass
class Plan:
    """A fault's trial: the event, what each host must end as, and the injection around the run."""

    event: int
    expect: dict[str, tuple[set[str], tuple[str, ...]]]   # server name -> (states, words naming the fault)
    bound: float
    marker: str
    during: Callable[[subprocess.Popen[str]], None] | None = None   # in a thread once the script runs
    restore: Callable[[], None] | None = None
    kill_controller: str = ""   # "kill": SIGKILL it once the script runs; "freeze": SIGSTOP it
    frozen_for: list[float] = field(default_factory=list)   # "freeze": seconds until the scripts were gone
    hosts: tuple[str, ...] = ("ok",)
    check: Callable[[dict[str, Any]], str | None] | None = None   # more about a host's result: what is wrong


# --- the faults ---------------------------------------------------------------------------------

def _script_marker() -> str:
    return f"cfab-fault-{secrets.token_hex(6)}"


def _event(cell: Cell, role_servers: list[int], script: str, timeout: int) -> int:
    return add_event(cell.db, content=script, servers=role_servers, timeout_value=timeout)


def _names(cell: Cell, ids: list[int]) -> list[str]:
    from ..db.models import Server

    with cell.db.session() as s:
        return [s.get(Server, i).name for i in ids]  # type: ignore[union-attr]


def _bound(timeout: float) -> float:
    return timeout + SETUP_TIMEOUT + KILL_GRACE + GRACE


def _frozen_bound(cell: Cell, timeout: float) -> float:
    """Issue 14: timeout + <= 10 s, over what a trivial run takes here now (the cell's baseline:
    the controller's start-up and its database writes on this machine)."""
    return timeout + 10 + cell.baseline_s


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _host_fault(cell: Cell, server: int, script: str, timeout: int, states: set[str],
                words: tuple[str, ...], bound: float, marker: str, **kw: Any) -> Plan:
    """The event runs on the faulty server and on the healthy host, which must succeed (the
    healthy host only echoes: the script runs on the faulty one)."""
    ok = cell.server("ok")
    bad_name, ok_name = _names(cell, [server, ok])
    script = f'if [ "$CRONIUM_SERVER_NAME" = "{ok_name}" ]; then echo fine; exit 0; fi\n{script}'
    ev = _event(cell, [server, ok], script, timeout)
    return Plan(ev, {bad_name: (states, words), ok_name: ({"success"}, ())}, bound, marker,
                hosts=("ok", "bad"), **kw)


def fault_host_down(cell: Cell) -> Plan:
    """Nothing answers the SYN (a listener whose accept queue is full drops it, as a dead host would)."""
    m = _script_marker()
    lsock = socket.socket()
    lsock.bind((cell.hosts["bad"].address, 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(3):   # fill the accept queue: further SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect((cell.hosts["bad"].address, port))
        fillers.append(s)
    time.sleep(0.1)
    cell.trust(cell.hosts["bad"], port=port)

    def restore() -> None:
        for s in [*fillers, lsock]:
            s.close()

    return _host_fault(cell, cell.server("bad", port=port), f"echo {m}", 5, {"unreachable"},
                       ("timeout", "handshake", "did not answer", "timed out"), _bound(5), m, restore=restore)


def fault_refused(cell: Cell) -> Plan:
    m = _script_marker()
    with socket.socket() as s:   # a port nothing listens on: sshd down
        s.bind((cell.hosts["bad"].address, 0))
        port = s.getsockname()[1]
    return _host_fault(cell, cell.server("bad", port=port), f"echo {m}", 5, {"unreachable"},
                       ("connection-refused",), _bound(5), m)


def fault_sshd_stopped_before(cell: Cell) -> Plan:
    m = _script_marker()
    bad = cell.hosts["bad"]
    cell.trust(bad)
    assert bad.pid
    os.kill(bad.pid, signal.SIGSTOP)
    return _host_fault(cell, cell.server("bad"), f"echo {m}", 5, {"unreachable"},
                       ("timeout", "handshake", "did not answer", "timed out"), _bound(5), m,
                       restore=lambda: os.kill(bad.pid or 0, signal.SIGCONT))


def fault_sshd_stopped_during(cell: Cell) -> Plan:
    """The run's sshd session processes frozen once the script runs (TCP stays up)."""
    m = _script_marker()
    bad = cell.hosts["bad"]
    cell.trust(bad)
    frozen: list[int] = []

    def during(_proc: subprocess.Popen[str]) -> None:
        frozen.extend(session_processes(bad))
        _signal_all(frozen, signal.SIGSTOP)

    return _host_fault(cell, cell.server("bad"), f'echo started; exec -a "{m}" sleep 60', 10, {"unreachable"},
                       ("frozen", "did not answer", "unanswered", "keepalive", "disconnected", "watchdog"),
                       _frozen_bound(cell, 10), m, during=during, restore=lambda: _signal_all(frozen, signal.SIGCONT))


def fault_session_killed(cell: Cell) -> Plan:
    m = _script_marker()
    bad = cell.hosts["bad"]
    cell.trust(bad)
    return _host_fault(cell, cell.server("bad"), f'echo started; exec -a "{m}" sleep 60', 30, {"unreachable"},
                       ("disconnected", "closed", "lost"), _bound(30) - 30, m,
                       during=lambda _p: _signal_all(session_processes(bad), signal.SIGKILL))


def fault_auth_refused(cell: Cell) -> Plan:
    m = _script_marker()
    cell.trust(cell.hosts["bad"])
    wrong, _ = generate_keypair()
    return _host_fault(cell, cell.server("bad", key=wrong), f"echo {m}", 5, {"unreachable"}, ("auth-refused",),
                       _bound(5), m)


def fault_host_key_changed(cell: Cell) -> Plan:
    m = _script_marker()
    bad = cell.hosts["bad"]
    _, other = generate_keypair()
    cell.trust(bad, key_line=other)   # known_hosts holds another key for this host:port
    return _host_fault(cell, cell.server("bad"), f"echo {m}", 5, {"unreachable"}, ("host-key-changed",),
                       _bound(5), m, restore=lambda: cell.trust(bad))


def fault_python_missing(cell: Cell) -> Plan:
    m = _script_marker()
    cell.trust(cell.hosts["nopy"])
    return _host_fault(cell, cell.server("nopy"), f"echo {m}", 5, {"failure"}, ("python-missing",), _bound(5), m)


def _mount_tmpfs(path: Path, opts: str) -> Callable[[], None]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True, capture_output=True)

    def umount() -> None:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    return umount


def fault_cache_not_writable(cell: Cell) -> Plan:
    """The host's cache dir (XDG_CACHE_HOME: where the runner is cached) is a read-only filesystem."""
    m = _script_marker()
    bad = cell.hosts["bad"]
    cell.trust(bad)
    umount = _mount_tmpfs(bad.cache_dir, "ro,size=1m")
    return _host_fault(cell, cell.server("bad"), f"echo {m}", 5, {"failure", "unreachable"},
                       ("runner-install-failed", "Read-only", "not writable", "cache"), _bound(5), m,
                       restore=umount)


def fault_disk_full(cell: Cell) -> Plan:
    """The work dir's filesystem (the host's TMPDIR) is a 1 MiB tmpfs; the script writes 20 MB."""
    m = _script_marker()
    bad = cell.hosts["bad"]
    cell.trust(bad)
    umount = _mount_tmpfs(bad.tmp_dir, "size=1m,mode=0700")
    return _host_fault(cell, cell.server("bad"), f"head -c 20000000 /dev/zero > big || exit 1; echo {m}", 10,
                       {"failure"}, ("No space left", "space"), _bound(10), m, restore=umount)


def _script_fault(cell: Cell, script: str, timeout: int, states: set[str], words: tuple[str, ...], m: str,
                  **kw: Any) -> Plan:
    cell.trust(cell.hosts["ok"])
    ok = cell.server("ok")
    ev = _event(cell, [ok], script, timeout)
    (name,) = _names(cell, [ok])
    return Plan(ev, {name: (states, words)}, kw.pop("bound", _bound(timeout)), m, **kw)


def fault_ignores_sigterm(cell: Cell) -> Plan:
    m = _script_marker()
    return _script_fault(cell, f'trap "" TERM; echo started; exec -a "{m}" sleep 300', 3, {"timeout"},
                         ("timeout", "timed out"), m)


def fault_setsid_daemon(cell: Cell) -> Plan:
    m = _script_marker()
    return _script_fault(cell, f"setsid sh -c 'trap \"\" TERM HUP; exec -a \"{m}\" sleep 300' & echo started",
                         10, {"success"}, ("started",), m)


def fault_flood(cell: Cell) -> Plan:
    m = _script_marker()
    return _script_fault(cell, f"head -c 200000000 /dev/zero | tr '\\0' x; echo; echo {m}", 120, {"success"},
                         ("dropped by output_cap",), m)


def fault_never_ends(cell: Cell) -> Plan:
    m = _script_marker()
    return _script_fault(cell, f'echo started; exec -a "{m}" sleep 100000', 3, {"timeout"},
                         ("timeout", "timed out"), m)


def fault_helper_flood(cell: Cell) -> Plan:
    """200 helper calls at once (in API mode: 200 concurrent requests to the helper API)."""
    m = _script_marker()
    # names of this trial's own: a host reports the variables it CHANGED, and an earlier trial of
    # the cell already stored the same values under fixed names
    v = f"v{secrets.token_hex(4)}_"
    script = f'for i in $(seq 200); do cronium.setVariable "{v}$i" "$i" & done; wait; echo {m}'

    def all_set(host: dict[str, Any]) -> str | None:
        got = host.get("variables") or {}
        lost = [i for i in range(1, 201) if got.get(f"{v}{i}") != i]
        return f"{len(lost)} of 200 variables lost ({v}{lost[0]}...)" if lost else None

    return _script_fault(cell, script, 120, {"success"}, (m,), m, check=all_set)


def fault_controller_killed(cell: Cell) -> Plan:
    m = _script_marker()
    cell.trust(cell.hosts["bad"])
    ok = cell.server("ok")
    bad = cell.server("bad")
    ev = _event(cell, [ok, bad], f'echo started; exec -a "{m}" sleep 60', 120)
    names = _names(cell, [ok, bad])
    # the controller's end is never recorded: `recover` closes the rows (checked by _check_rows)
    return Plan(ev, {n: ({"killed"}, ()) for n in names}, 10 + GRACE, m, kill_controller="kill", hosts=("ok", "bad"))


def fault_controller_frozen(cell: Cell) -> Plan:
    """The controller SIGSTOPped once the scripts run: the runners stop them (no answer from the
    controller), within 10 s; then it is killed and `recover` closes its rows."""
    plan = fault_controller_killed(cell)
    plan.kill_controller, plan.bound = "freeze", _frozen_bound(cell, 0)

    def during(proc: subprocess.Popen[str]) -> None:
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_until(lambda: not procs_with(plan.marker), plan.bound + 5, 0.1)
        plan.frozen_for.append(time.monotonic() - t0)
        proc.kill()

    plan.during = during
    return plan


FAULTS: dict[str, Callable[[Cell], Plan]] = {
    "host down": fault_host_down,
    "connection refused": fault_refused,
    "sshd stopped before": fault_sshd_stopped_before,
    "sshd stopped during": fault_sshd_stopped_during,
    "session killed": fault_session_killed,
    "auth refused": fault_auth_refused,
    "host key changed": fault_host_key_changed,
    "python3 missing": fault_python_missing,
    "cache not writable": fault_cache_not_writable,
    "disk full": fault_disk_full,
    "ignores SIGTERM": fault_ignores_sigterm,
    "setsid daemon": fault_setsid_daemon,
    "200 MB output": fault_flood,
    "never ends": fault_never_ends,
    "controller killed": fault_controller_killed,
    "controller frozen": fault_controller_frozen,
    "helper flood": fault_helper_flood,
}
NEEDS_ROOT = {"cache not writable", "disk full"}
CONTROLLER_FAULTS = {"controller killed", "controller frozen"}   # CLI cells only


# --- a cell and a trial ----------------------------------------------------------------------------

@contextlib.contextmanager
def hosts_pool(base: Path) -> Iterator[DevHostPool]:
    """The hosts every cell shares: ``ok`` (healthy), ``bad`` (faults are done to it), ``nopy``."""
    pool = DevHostPool(base)
    try:
        pool.add_hosts(2)
        pool.add_hosts(1, python3="")
        yield pool
    finally:
        pool.stop()


def roles(pool: DevHostPool) -> dict[str, DevHost]:
    return dict(zip(("ok", "bad", "nopy"), pool.hosts, strict=True))


def open_cell(db_flavour: str, mode: str, url: str, pool: DevHostPool, work: Path, runner: Path,
              keys: tuple[Path, Path], via: str = "cli") -> Cell:
    work.mkdir(parents=True, exist_ok=True)
    settings = Settings(database_url=url, data_dir=work / "data", signing_key=keys[0], public_key=keys[1],
                        runner_path=runner, payload_dir=work / "payloads", helper_mode=mode)
    db = Database(url)
    db.init()
    cell = Cell(db_flavour, mode, settings, db, roles(pool), pool, work, via=via)
    cell.trust(cell.hosts["ok"])
    if via == "serve":
        start_serve(cell)
    ev = _event(cell, [cell.server("ok")], "echo baseline", 30)
    for _ in range(2):   # the first one installs the runner
        proc, seconds, rss, out = _run(cell, ev, 120)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline run failed ({proc.returncode}): {out[-2000:]}")
    cell.baseline_rss_kib, cell.baseline_s = rss, seconds
    return cell


def start_serve(cell: Cell) -> None:
    log = cell.work / "serve.log"
    with log.open("ab") as f:
        proc = cell.serve = subprocess.Popen([sys.executable, "-m", "cronium_fab", "serve", "--poll", "0.1"],
                                             env=cell.env(), stdout=subprocess.DEVNULL, stderr=f, cwd=cell.work)
    if not wait_until(lambda: "serving" in log.read_text(errors="replace") or proc.poll() is not None, 60):
        raise RuntimeError(f"serve did not start: {log.read_text(errors='replace')[-2000:]}")


def close_cell(cell: Cell) -> list[str]:
    """Stop the cell's serve (SIGTERM: it drains and closes its kept connections, and says so);
    what it left."""
    problems: list[str] = []
    if cell.serve is not None and cell.serve.poll() is None:
        cell.serve.send_signal(signal.SIGTERM)
        try:
            if cell.serve.wait(90) != 0:
                problems.append(f"serve exited {cell.serve.returncode}")
        except subprocess.TimeoutExpired:
            cell.serve.kill()
            problems.append("serve did not stop within 90 s of SIGTERM")
        said = (cell.work / "serve.log").read_text(errors="replace")
        if "kept connection(s)" not in said.rsplit("serving (", 1)[-1]:
            problems.append("serve did not close kept connections when it stopped")
        pids = {h.name: h.pid for h in cell.hosts.values() if h.pid}
        if not wait_until(lambda: all(process_trees([p]) == [p] for p in pids.values()), 10, 0.1):
            problems.append("sshd sessions left on the hosts after serve stopped: "
                            + ", ".join(f"{n}: {len(process_trees([p])) - 1}" for n, p in pids.items()))
    cell.db.dispose()
    return problems


def _peak_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _job_result(cell: Cell, job_id: str) -> str:
    """The run's JSON document as ``run-event --json`` prints it, from the job's rows (stdout from
    ``executions.output``)."""
    with cell.db.engine.connect() as conn:
        result = conn.execute(text("SELECT result FROM jobs WHERE id = :j"), {"j": job_id}).scalar()
        outputs: dict[str, str | None] = dict(conn.execute(text("SELECT id, output FROM executions WHERE job_id = :j"), {"j": job_id}).all())
    doc = json.loads(result) if isinstance(result, str) else dict(result or {})
    for h in doc.get("hosts", []):
        h["stdout"] = outputs.get(h.get("execution_id")) or ""
    return json.dumps(doc)


class _Done:
    """Stands for the controller process of a CLI trial in a serve trial (its job ended)."""

    returncode = 0


def _run_job(cell: Cell, event: int, limit: float, during: Callable[[subprocess.Popen[str]], None] | None,
             marker: str) -> tuple[Any, float, int, str]:
    from ..jobqueue import enqueue

    assert cell.serve is not None
    t0 = time.monotonic()
    job_id = enqueue(cell.db, event)[0]
    injector = None
    if during is not None:
        def inject() -> None:
            if wait_until(lambda: bool(procs_with(marker)), limit, 0.02):
                during(cell.serve)  # type: ignore[arg-type]
        injector = threading.Thread(target=inject, daemon=True)
        injector.start()

    def status() -> str:
        with cell.db.engine.connect() as conn:
            return str(conn.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id}).scalar())
    ended = wait_until(lambda: status() in ("completed", "failed", "cancelled"), limit, 0.02)
    seconds = time.monotonic() - t0
    if injector is not None:
        injector.join(5)
    if not ended:   # hung: this serve is done for; the next one recovers its rows
        cell.serve.kill()
        cell.serve.wait()
        start_serve(cell)
        return _Done(), seconds, _peak_rss_kib(cell.serve.pid), "{}"
    return _Done(), seconds, _peak_rss_kib(cell.serve.pid), _job_result(cell, job_id)


def _run(cell: Cell, event: int, limit: float, *, kill_when: Callable[[], bool] | None = None,
         during: Callable[[subprocess.Popen[str]], None] | None = None, marker: str = "",
         ) -> tuple[subprocess.Popen[str], float, int, str]:
    """Run the CLI; returns (process, seconds, peak RSS KiB, stdout). Killed past ``limit``.
    In a serve cell: a job of its serve (``kill_when`` has no meaning there)."""
    if cell.via == "serve":
        return _run_job(cell, event, limit, during, marker)
    out_path = cell.work / f"out-{secrets.token_hex(4)}.json"
    t0 = time.monotonic()
    with out_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cronium_fab", "run-event", "--id", str(event), "--json"],
                                env=cell.env(), stdout=out, stderr=subprocess.DEVNULL, text=True, cwd=cell.work)
    injector = None
    if during is not None or kill_when is not None:
        def inject() -> None:
            if not wait_until(lambda: bool(procs_with(marker)) or proc.poll() is not None, limit, 0.02):
                return
            if proc.poll() is None:
                if during is not None:
                    during(proc)
                if kill_when is not None:
                    proc.kill()
        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
    rss = 0
    deadline = t0 + limit
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            rss = usage.ru_maxrss
            break
        if time.monotonic() > deadline:
            proc.kill()
            continue
        time.sleep(0.02)
    seconds = time.monotonic() - t0
    if injector is not None:
        injector.join(5)
    text_out = out_path.read_text()
    out_path.unlink()
    return proc, seconds, rss, text_out


def _check_rows(cell: Cell) -> list[str]:
    lost = []
    with cell.db.engine.connect() as conn:
        for table, states in OPEN_ROWS.items():
            marks = ", ".join(f"'{s}'" for s in states)
            n = conn.execute(text(f"SELECT count(*) FROM {table} WHERE status IN ({marks})")).scalar()
            if n:
                lost.append(f"{n} {table} row(s) left open")
    return lost


def _leftovers(cell: Cell, plan: Plan) -> list[str]:
    """Processes of the script (its marker) or anything below the hosts' listeners; work dirs."""
    hosts = [cell.hosts[r] for r in plan.hosts]

    def found() -> list[str]:
        left = [f"process {pid} with the script's marker" for pid in procs_with(plan.marker)]
        for h in hosts:
            if h.pid:
                left += [f"{h.name}: process {p} below sshd" for p in process_trees([h.pid])
                         if p != h.pid and not (cell.via == "serve" and _is_sshd(p))]
                if cell.via == "serve":   # one kept connection per host at most (one job at a time)
                    conns = [p for p in _children(h.pid) if _is_sshd(p)]
                    if len(conns) > 1:
                        left.append(f"{h.name}: {len(conns)} sshd connections (serve keeps one)")
            with contextlib.suppress(OSError):
                left += [f"{h.name}: work dir {d}" for d in os.listdir(h.tmp_dir) if d.startswith("cronium-run-")]
        return left

    wait_until(lambda: not found(), 10, 0.1)   # the runner's kill grace and clean-up
    return found()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _is_sshd(pid: int) -> bool:
    """An sshd process: serve's kept connection (its commands are not sshd)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("sshd")
    except OSError:
        return True   # gone


def _check_states(plan: Plan, result: dict[str, Any]) -> list[str]:
    wrong = []
    hosts = {h["name"]: h for h in result.get("hosts", [])}
    if not hosts:
        return [f"no host results: {json.dumps(result)[:300]}"]
    for name, (states, words) in plan.expect.items():
        h = hosts.get(name)
        if h is None:
            wrong.append(f"{name}: no result")
            continue
        if h["status"] not in states:
            wrong.append(f"{name}: {h['status']} (want {'/'.join(sorted(states))}): {h.get('error_kind')} "
                         f"{(h.get('error') or '')[:200]}")
            continue
        said = " ".join(str(h.get(k) or "") for k in ("error_kind", "error", "stderr"))
        said += " " + (h.get("stdout") or "")
        if words and not any(w.lower() in said.lower() for w in words):
            wrong.append(f"{name}: {h['status']}, but the reason names none of {words}: "
                         f"{h.get('error_kind')} {(h.get('error') or '')[:200]}")
        elif plan.check is not None and (problem := plan.check(h)):
            wrong.append(f"{name}: {problem}")
    return wrong


def _recover(cell: Cell) -> str:
    rec = subprocess.run([sys.executable, "-m", "cronium_fab", "recover"], env=cell.env(), capture_output=True,
                         text=True, cwd=cell.work, timeout=120)
    return rec.stderr


def run_trial(cell: Cell, fault: str) -> Trial:
    plan = FAULTS[fault](cell)
    trial = Trial(fault, cell.name, 0.0, plan.bound)
    try:
        proc, seconds, rss, out = _run(cell, plan.event, plan.bound + HARD_LIMIT, during=plan.during,
                                       kill_when=(lambda: True) if plan.kill_controller == "kill" else None,
                                       marker=plan.marker)
    finally:
        if plan.restore is not None:
            plan.restore()
    trial.seconds, trial.rss_kib = seconds, rss
    trial.rss_over = rss > cell.baseline_rss_kib + RSS_SLACK_KIB
    if plan.kill_controller:
        # bound: the remote scripts are gone within it of the kill (the runners noticed)
        t_kill = time.monotonic()
        wait_until(lambda: not procs_with(plan.marker), plan.bound + HARD_LIMIT, 0.1)
        trial.seconds = plan.frozen_for[0] if plan.frozen_for else time.monotonic() - t_kill
        trial.hung = trial.seconds > plan.bound or proc.returncode != -signal.SIGKILL
        said = _recover(cell)
        if "closed 1 run(s)" not in said:
            trial.wrong_state.append(f"recover: {said.strip()[-300:]}")
        with cell.db.engine.connect() as conn:
            errors = [r[0] for r in conn.execute(text(
                "SELECT error FROM executions WHERE job_id = (SELECT job_id FROM executions ORDER BY created_at DESC "
                "LIMIT 1)"))]
        if not errors or not all(e and e.startswith("controller lost") for e in errors):
            trial.wrong_state.append(f"executions not closed as 'controller lost': {errors}")
    else:
        trial.hung = seconds > plan.bound
        try:
            result = json.loads(out)
        except ValueError:
            result = {}
            trial.wrong_state.append(f"exit {proc.returncode}, no JSON result: {out[-300:]!r}")
        if result:
            trial.wrong_state += _check_states(plan, result)
            trial.said = [f"{h.get('name')}: {h.get('status')} {h.get('error_kind')} {(h.get('error') or '')[:160]}"
                          for h in result.get("hosts", [])]
        if trial.hung and cell.via == "cli":   # killed at bound + HARD_LIMIT: its rows are the next process's
            _recover(cell)
    trial.leftovers = _leftovers(cell, plan)
    trial.lost_rows = _check_rows(cell)
    return trial


def can_mount() -> bool:
    return os.geteuid() == 0


def summarize(trials: list[Trial]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for t in trials:
        r = rows.setdefault(t.fault, {"fault": t.fault, "trials": 0, "hung": 0, "wrong_state": 0, "leftovers": 0,
                                      "lost_rows": 0, "rss_over": 0, "max_s": 0.0, "bound_s": t.bound,
                                      "max_rss_mib": 0.0, "examples": []})
        r["trials"] += 1
        r["hung"] += t.hung
        r["wrong_state"] += bool(t.wrong_state)
        r["leftovers"] += bool(t.leftovers)
        r["lost_rows"] += bool(t.lost_rows)
        r["rss_over"] += t.rss_over
        r["max_s"] = max(r["max_s"], t.seconds)
        r["max_rss_mib"] = max(r["max_rss_mib"], t.rss_kib / 1024)
        if not t.ok and len(r["examples"]) < 3:
            r["examples"].append({"cell": t.cell, "seconds": round(t.seconds, 1), "hung": t.hung,
                                  "wrong_state": t.wrong_state, "leftovers": t.leftovers[:5],
                                  "lost_rows": t.lost_rows, "rss_kib": t.rss_kib, "said": t.said})
    return list(rows.values())

