"""What a run produced: one ``HostResult`` per host, the run's ``RunResult``, and the rule that
turns host states into the run's status. Plain data and pure functions: ``execute`` fills these,
``records`` shapes rows from them, the CLI prints them (``to_dict`` is the ``--json`` document).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_STOPPED, EXIT_TIMEOUT

# ``skipped``: never started, because the failure budget stopped the run (the reason is its error)
HostStatus = Literal["success", "failure", "timeout", "unreachable", "cancelled", "skipped"]
# ``STOPPED``: the failure budget kept hosts from starting (some ended ``skipped``)
RunStatus = Literal["SUCCESS", "FAILURE", "PARTIAL", "TIMEOUT", "CANCELLED", "STOPPED"]
HelperMode = Literal["api", "bundled"]
HOST_STATES: tuple[HostStatus, ...] = get_args(HostStatus)
RUN_STATES: tuple[RunStatus, ...] = get_args(RunStatus)

RUN_EXIT_CODES: dict[RunStatus, int] = {
    "SUCCESS": EXIT_OK, "FAILURE": EXIT_FAILURE, "PARTIAL": EXIT_PARTIAL, "TIMEOUT": EXIT_TIMEOUT,
    "CANCELLED": EXIT_CANCELLED, "STOPPED": EXIT_STOPPED,
}
# worst first: the order of the summary and of `show`
STATE_ORDER: dict[str, int] = {s: i for i, s in enumerate(
    ("failure", "timeout", "unreachable", "cancelled", "skipped", "success"))}


@dataclass
class HostResult:
    server_id: int | None
    name: str
    host: str
    execution_id: str
    status: HostStatus = "cancelled"
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    output: Any = None
    variables: dict[str, Any] = field(default_factory=dict)
    condition: bool | None = None
    helper_mode: HelperMode | None = None  # None: the host was never reached
    helper_mode_note: str | None = None
    runner_cached: bool | None = None
    duration_ms: int = 0
    error: str | None = None
    error_kind: str | None = None  # remote.errors.ErrorKind, or a kind the runner reported
    batch: int = 1  # which batch the host belongs to (1-based)
    connect_attempts: int = 0  # 0: never tried (skipped, cancelled before start), or a kept connection
    connection_reused: bool = False  # ran on a connection kept from an earlier run (serve)

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_id": self.server_id, "name": self.name, "host": self.host,
            "execution_id": self.execution_id, "status": self.status, "exit_code": self.exit_code,
            "signal": self.signal, "stdout": self.stdout, "stderr": self.stderr, "output": self.output,
            "variables": self.variables, "condition": self.condition, "helper_mode": self.helper_mode,
            "helper_mode_note": self.helper_mode_note, "runner_cached": self.runner_cached,
            "duration_ms": self.duration_ms, "error": self.error, "error_kind": self.error_kind,
            "batch": self.batch, "connect_attempts": self.connect_attempts,
            "connection_reused": self.connection_reused,
        }


@dataclass
class RunResult:
    status: RunStatus
    event_id: int
    event_name: str
    job_id: str
    log_id: int
    hosts: list[HostResult]
    skipped: list[dict[str, Any]]
    duration_ms: int
    payload_version: int
    stopped: str | None = None  # why the failure budget stopped new starts (None: it did not)
    batches: int = 1
    rerun_of: int | None = None  # the log id of the run this one reran

    @property
    def exit_code(self) -> int:
        return RUN_EXIT_CODES[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "event_id": self.event_id, "event_name": self.event_name,
            "job_id": self.job_id, "log_id": self.log_id, "payload_version": self.payload_version,
            "duration_ms": self.duration_ms, "stopped": self.stopped, "batches": self.batches,
            "rerun_of": self.rerun_of, "counts": state_counts(self.hosts), "skipped": self.skipped,
            "hosts": [h.to_dict() for h in self.hosts],
        }


def state_counts(hosts: list[HostResult]) -> dict[str, int]:
    """How many hosts ended in each state (states no host is in are left out), worst first."""
    counts: dict[str, int] = {}
    for h in sorted(hosts, key=lambda h: STATE_ORDER.get(h.status, -1)):
        counts[h.status] = counts.get(h.status, 0) + 1
    return counts


def aggregate_status(states: list[HostStatus], cancelled: bool = False, stopped: bool = False) -> RunStatus:
    """CANCELLED a signal stopped it · STOPPED the failure budget kept hosts from starting ·
    SUCCESS all succeeded · PARTIAL some did · TIMEOUT none did and one timed out · FAILURE none did."""
    if cancelled:
        return "CANCELLED"
    if stopped and "skipped" in states:
        return "STOPPED"
    if states and all(s == "success" for s in states):
        return "SUCCESS"
    if any(s == "success" for s in states):
        return "PARTIAL"
    if any(s == "timeout" for s in states):
        return "TIMEOUT"
    return "FAILURE"


def failure_reason(exit_code: int | None, signal: int | None, stderr: str) -> str:
    """Why a script failed, in one line: its exit code (or signal) and the last line it wrote to stderr."""
    why = f"killed by signal {signal}" if signal else f"exit code {exit_code}"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"{why}: {last[:300]}" if last else why


@dataclass(frozen=True)
class OutputGroup:
    """Hosts whose output (stdout and stderr) is identical, byte for byte."""

    hosts: tuple[HostResult, ...]
    stdout: str
    stderr: str

    def label(self, max_names: int = 8) -> str:
        states = state_counts(list(self.hosts))
        status = ", ".join(s if len(states) == 1 else f"{n} {s}" for s, n in states.items())
        if len(self.hosts) == 1:
            return f"{self.hosts[0].name} ({status})"
        names = ", ".join(h.name for h in self.hosts[:max_names])
        more = f", ... (+{len(self.hosts) - max_names} more)" if len(self.hosts) > max_names else ""
        return f"{len(self.hosts)} hosts: same output ({status}): {names}{more}"


def output_groups(hosts: list[HostResult]) -> list[OutputGroup]:
    """Hosts that printed something, grouped by identical output; a group with a failed host
    comes first (worst state first), then bigger groups, then the run's host order."""
    groups: dict[tuple[str, str], list[HostResult]] = {}
    first: dict[tuple[str, str], int] = {}
    for i, h in enumerate(hosts):
        if h.stdout or h.stderr:
            groups.setdefault((h.stdout, h.stderr), []).append(h)
            first.setdefault((h.stdout, h.stderr), i)
    ordered = sorted(groups.items(), key=lambda kv: (min(STATE_ORDER.get(h.status, -1) for h in kv[1]),
                                                      -len(kv[1]), first[kv[0]]))
    return [OutputGroup(tuple(members), out, err) for (out, err), members in ordered]


def tail_lines(text: str, mark: str, n: int) -> tuple[list[str], int]:
    """The last ``n`` lines of ``text`` marked (``|`` stdout, ``!`` stderr), and how many were left out."""
    lines = text.rstrip("\n").split("\n") if text else []
    return [f"{mark} {line}" for line in lines[-n:]], max(0, len(lines) - n)


# The summary stays readable at hundreds of hosts: every host that did not succeed has its row,
# successful hosts beyond this many are counted in one line (all of them are in `show`).
SUMMARY_SUCCESS_ROWS = 20
SUMMARY_OUTPUT_LINES = 5


def summary_table(result: RunResult) -> str:
    """The end of a run for a person: a row per host (failures first), errors, hosts that did
    not start, the output grouped (identical output once, failures first), the verdict."""
    hosts = sorted(result.hosts, key=lambda h: STATE_ORDER.get(h.status, -1))
    shown = [h for h in hosts if h.status not in ("success", "skipped")]
    succeeded = [h for h in hosts if h.status == "success"]
    shown += succeeded[:SUMMARY_SUCCESS_ROWS]
    rows = [("HOST", "STATUS", "EXIT", "DURATION", "RUNNER", "HELPERS")]
    for h in shown:
        cached = "-" if h.runner_cached is None else ("cached" if h.runner_cached else "installed")
        rows.append((h.name, h.status, "-" if h.exit_code is None else str(h.exit_code),
                     f"{h.duration_ms / 1000:.2f}s", cached,
                     (h.helper_mode or "-") + ("*" if h.helper_mode_note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(succeeded) > SUMMARY_SUCCESS_ROWS:
        lines.append(f"... and {len(succeeded) - SUMMARY_SUCCESS_ROWS} more hosts succeeded "
                     f"(`cronium-fab show {result.log_id}` lists them all)")
    errors = [f"  {h.name}: {h.error}" for h in shown if h.error]
    errors += [f"  {h.name}: * {h.helper_mode_note}" for h in shown if h.helper_mode_note]
    skipped = [f"  skipped {s['name']}: {s['reason']}" for s in result.skipped]
    never: dict[str, list[str]] = {}
    for h in hosts:
        if h.status == "skipped":
            never.setdefault(h.error or "not started", []).append(h.name)
    for reason, names in never.items():
        listed = ", ".join(names[:8]) + (f", ... (+{len(names) - 8} more)" if len(names) > 8 else "")
        skipped.append(f"  {len(names)} host{'s' if len(names) != 1 else ''} skipped ({listed}): {reason}")
    output: list[str] = []
    groups = output_groups(result.hosts)
    if groups:
        output.append("output (identical output once, failures first):")
    for g in groups:
        output.append(f"  {g.label()}:")
        for text, mark in ((g.stdout, "|"), (g.stderr, "!")):
            shown_lines, left = tail_lines(text, mark, SUMMARY_OUTPUT_LINES)
            if left:
                output.append(f"    ... {left} earlier line{'s' if left != 1 else ''} "
                              f"(`cronium-fab show {result.log_id} --host {g.hosts[0].name}`)")
            output += [f"    {line}" for line in shown_lines]
    counts = state_counts(result.hosts)
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "success")
    tail = [f"stopped: {result.stopped}"] if result.stopped else []
    tail.append(f"{result.status}: {counts.get('success', 0)}/{len(result.hosts)} hosts succeeded"
                + (f" ({others})" if others else "")
                + f" in {result.duration_ms / 1000:.2f}s (job {result.job_id}, log {result.log_id})")
    return "\n".join(["", *lines, *errors, *skipped, *output, *tail])


# -- run-event --plan: what a run would do, host by host ---------------------------------------

@dataclass
class HostCheck:
    """One host as ``--plan`` found it. ``host_key``: ``known``, ``unknown`` (a run records it
    under accept-new, refuses it under strict), ``changed`` (always refused) or ``-`` (not reached)."""

    name: str
    host: str
    server_id: int | None
    batch: int
    ready: bool = False
    reachable: bool = False
    host_key: str = "-"
    python: str | None = None
    runner: str | None = None  # cached | install (the run would upload it)
    error: str | None = None
    error_kind: str | None = None
    connect_attempts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "server_id": self.server_id, "batch": self.batch,
                "ready": self.ready, "reachable": self.reachable, "host_key": self.host_key, "python": self.python,
                "runner": self.runner, "error": self.error, "error_kind": self.error_kind,
                "connect_attempts": self.connect_attempts}


@dataclass
class FleetPlan:
    """``run-event --plan``: the hosts, their batches and checks; nothing ran, no row was written.
    ``status`` READY (every host would run), PARTIAL (some), FAILURE (none): the exit codes of a run."""

    event_id: int
    event_name: str
    event_type: str
    payload: str  # what the payload is and what a run would do with it
    hosts: list[HostCheck]
    control: dict[str, Any]  # RunControl.to_payload()
    parallel: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rerun_of: int | None = None

    @property
    def status(self) -> str:
        ready = sum(h.ready for h in self.hosts)
        return "READY" if ready == len(self.hosts) else "PARTIAL" if ready else "FAILURE"

    @property
    def exit_code(self) -> int:
        return {"READY": EXIT_OK, "PARTIAL": EXIT_PARTIAL}.get(self.status, EXIT_FAILURE)

    def batches(self) -> list[list[HostCheck]]:
        out: dict[int, list[HostCheck]] = {}
        for h in self.hosts:
            out.setdefault(h.batch, []).append(h)
        return [out[k] for k in sorted(out)]

    def to_dict(self) -> dict[str, Any]:
        return {"plan": True, "status": self.status, "event_id": self.event_id, "event_name": self.event_name,
                "event_type": self.event_type, "payload": self.payload, "control": self.control,
                "parallel": self.parallel, "rerun_of": self.rerun_of, "skipped": self.skipped,
                "batches": [[h.name for h in b] for b in self.batches()], "hosts": [h.to_dict() for h in self.hosts]}

    def text(self) -> str:
        batches = self.batches()
        control = ", ".join(f"{k} {v}" for k, v in self.control.items()) or "no failure budget, one batch"
        lines = [f"plan: event {self.event_id} ({self.event_name}, {self.event_type})"
                 + (f", rerun of run {self.rerun_of}" if self.rerun_of else "")
                 + f": {len(self.hosts)} hosts in {len(batches)} batch{'es' if len(batches) != 1 else ''}, "
                 f"at most {self.parallel} at once ({control}); payload {self.payload}"]
        for n, b in enumerate(batches, 1):
            names = ", ".join(h.name for h in b[:12]) + (f", ... (+{len(b) - 12} more)" if len(b) > 12 else "")
            lines.append(f"  batch {n} ({len(b)} host{'s' if len(b) != 1 else ''}): {names}")
        rows = [("HOST", "READY", "SSH", "HOST KEY", "PYTHON", "RUNNER")]
        for h in sorted(self.hosts, key=lambda h: h.ready):
            rows.append((h.name, "yes" if h.ready else "NO", "ok" if h.reachable else (h.error_kind or "no"),
                         h.host_key, h.python or "-", {"install": "would install"}.get(h.runner or "", h.runner or "-")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines += [f"  {h.name}: {h.error}" for h in self.hosts if h.error]
        lines += [f"  skipped {s['name']}: {s['reason']}" for s in self.skipped]
        ready = sum(h.ready for h in self.hosts)
        lines.append(f"{self.status}: {ready}/{len(self.hosts)} hosts would run the script (nothing was run)")
        return "\n".join(lines)
