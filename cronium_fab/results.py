"""What a run produced: one ``HostResult`` per host, the run's ``RunResult``, and the rule that
turns host states into the run's status. Plain data and pure functions: ``execute`` fills these,
``records`` shapes rows from them, the CLI prints them (``to_dict`` is the ``--json`` document).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_TIMEOUT

HostStatus = Literal["success", "failure", "timeout", "unreachable", "cancelled"]
RunStatus = Literal["SUCCESS", "FAILURE", "PARTIAL", "TIMEOUT", "CANCELLED"]
HelperMode = Literal["api", "bundled"]
HOST_STATES: tuple[HostStatus, ...] = get_args(HostStatus)
RUN_STATES: tuple[RunStatus, ...] = get_args(RunStatus)

RUN_EXIT_CODES: dict[RunStatus, int] = {
    "SUCCESS": EXIT_OK, "FAILURE": EXIT_FAILURE, "PARTIAL": EXIT_PARTIAL, "TIMEOUT": EXIT_TIMEOUT,
    "CANCELLED": EXIT_CANCELLED,
}


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_id": self.server_id, "name": self.name, "host": self.host,
            "execution_id": self.execution_id, "status": self.status, "exit_code": self.exit_code,
            "signal": self.signal, "stdout": self.stdout, "stderr": self.stderr, "output": self.output,
            "variables": self.variables, "condition": self.condition, "helper_mode": self.helper_mode,
            "helper_mode_note": self.helper_mode_note, "runner_cached": self.runner_cached,
            "duration_ms": self.duration_ms, "error": self.error, "error_kind": self.error_kind,
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

    @property
    def exit_code(self) -> int:
        return RUN_EXIT_CODES[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "event_id": self.event_id, "event_name": self.event_name,
            "job_id": self.job_id, "log_id": self.log_id, "payload_version": self.payload_version,
            "duration_ms": self.duration_ms, "skipped": self.skipped,
            "hosts": [h.to_dict() for h in self.hosts],
        }


def aggregate_status(states: list[HostStatus], cancelled: bool = False) -> RunStatus:
    """SUCCESS all succeeded · PARTIAL some did · TIMEOUT none did and one timed out · FAILURE none did."""
    if cancelled:
        return "CANCELLED"
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


def summary_table(result: RunResult) -> str:
    rows = [("HOST", "STATUS", "EXIT", "DURATION", "RUNNER", "HELPERS")]
    for h in result.hosts:
        cached = "-" if h.runner_cached is None else ("cached" if h.runner_cached else "installed")
        rows.append((h.name, h.status, "-" if h.exit_code is None else str(h.exit_code),
                     f"{h.duration_ms / 1000:.2f}s", cached,
                     (h.helper_mode or "-") + ("*" if h.helper_mode_note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    errors = [f"  {h.name}: {h.error}" for h in result.hosts if h.error]
    errors += [f"  {h.name}: * {h.helper_mode_note}" for h in result.hosts if h.helper_mode_note]
    skipped = [f"  skipped {s['name']}: {s['reason']}" for s in result.skipped]
    tail = [f"{result.status}: {sum(h.status == 'success' for h in result.hosts)}/{len(result.hosts)} hosts "
            f"succeeded in {result.duration_ms / 1000:.2f}s (job {result.job_id}, log {result.log_id})"]
    return "\n".join(["", *lines, *errors, *skipped, *tail])
