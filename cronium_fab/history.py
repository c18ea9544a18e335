"""Past runs read back: ``cronium-fab runs`` (the latest runs, with host counts) and
``cronium-fab show LOG_ID`` (one run's hosts and their output). A run is a ``logs`` row; its hosts
are the ``executions`` rows of its job (docs/CRONIUM.md §1). Rows we wrote record each host's exact
state (``execution_metadata.host_status``) and the run's (``jobs.result.status``: ``STOPPED``,
``CANCELLED``, which ``logs.status`` cannot say); rows others wrote are read from their statuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from .db.engine import Database
from .db.queries import StoredHost, StoredRun, stored_run, stored_runs
from .errors import CroniumFabError
from .records import host_state_of
from .results import STATE_ORDER, HostResult, HostStatus, output_groups


class RunNotFound(CroniumFabError):
    pass


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(sep=" ", timespec="seconds") if t else None


def _counts(states: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in sorted(states, key=lambda s: STATE_ORDER.get(s, -1)):
        counts[s] = counts.get(s, 0) + 1
    return counts


@dataclass(frozen=True)
class RunView:
    """One past run as ``runs`` and ``show`` present it."""

    run: StoredRun
    states: list[str]

    @property
    def status(self) -> str:
        return self.run.run_status or self.run.log_status

    def to_dict(self) -> dict[str, Any]:
        r = self.run
        return {"log_id": r.log_id, "event_id": r.event_id, "event_name": r.event_name, "status": self.status,
                "log_status": r.log_status, "job_id": r.job_id, "start_time": _iso(r.start_time),
                "end_time": _iso(r.end_time), "duration_ms": r.duration_ms, "error": r.error,
                "rerun_of": r.rerun_of, "host_count": len(self.states), "counts": _counts(self.states)}


def list_runs(db: Database, *, event_id: int | None = None, limit: int = 20) -> list[RunView]:
    with db.session() as s:
        runs = stored_runs(s, event_id=event_id, limit=limit)
    return [RunView(r, [host_state_of(status, recorded) for status, recorded in r.states]) for r in runs]


def runs_table(views: list[RunView]) -> str:
    """``cronium-fab runs``: one line per run, newest first."""
    rows = [("LOG", "STARTED (UTC)", "STATUS", "EVENT", "HOSTS")]
    for v in views:
        counts = ", ".join(f"{n} {s}" for s, n in _counts(v.states).items())
        rows.append((str(v.run.log_id), _iso(v.run.start_time) or "-", v.status,
                     f"{v.run.event_id} {v.run.event_name or ''}".strip(),
                     f"{len(v.states)}" + (f": {counts}" if counts else "")
                     + (f" (rerun of {v.run.rerun_of})" if v.run.rerun_of else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _host_result(h: StoredHost) -> HostResult:
    """A stored host as a HostResult (its stored output, stdout and stderr as one, in ``stdout``)."""
    state = cast(HostStatus, host_state_of(h.exec_status, h.host_status))
    return HostResult(server_id=h.server_id, name=h.name, host=h.address or "", execution_id=h.execution_id,
                      status=state, exit_code=h.exit_code, stdout=h.output or "", duration_ms=h.duration_ms or 0,
                      error=h.error, error_kind=h.error_kind, batch=h.batch or 1,
                      connect_attempts=h.connect_attempts or 0)


@dataclass(frozen=True)
class RunDetail:
    """``cronium-fab show``: a run and (all or one of) its hosts, with their output."""

    view: RunView
    hosts: list[HostResult]
    stored: list[StoredHost]

    def to_dict(self) -> dict[str, Any]:
        d = self.view.to_dict()
        d["hosts"] = [
            {"execution_id": h.execution_id, "server_id": h.server_id, "name": h.name, "host": h.host,
             "status": h.status, "exec_status": s.exec_status, "exit_code": h.exit_code,
             "started_at": _iso(s.started_at), "completed_at": _iso(s.completed_at), "duration_ms": s.duration_ms,
             "batch": s.batch, "connect_attempts": s.connect_attempts, "error": h.error, "error_kind": h.error_kind,
             "output": s.output or ""}
            for h, s in zip(self.hosts, self.stored, strict=True)]
        return d

    def text(self) -> str:
        v, r = self.view, self.view.run
        counts = ", ".join(f"{n} {s}" for s, n in _counts(v.states).items())
        lines = [f"run {r.log_id}: event {r.event_id} ({r.event_name or '-'}) · {v.status}"
                 + (f" (logs.status {r.log_status})" if v.status != r.log_status else "")
                 + f" · started {_iso(r.start_time) or '-'} UTC"
                 + (f" · {r.duration_ms / 1000:.2f}s" if r.duration_ms is not None else "")
                 + f" · job {r.job_id or '-'}" + (f" · rerun of {r.rerun_of}" if r.rerun_of else ""),
                 f"{len(v.states)} hosts" + (f": {counts}" if counts else "")]
        if r.error:
            lines.append(f"error: {r.error}")
        order = sorted(range(len(self.hosts)), key=lambda i: STATE_ORDER.get(self.hosts[i].status, -1))
        rows = [("HOST", "STATUS", "EXIT", "DURATION", "BATCH", "ERROR")]
        for i in order:
            h, s = self.hosts[i], self.stored[i]
            rows.append((h.name, h.status, "-" if h.exit_code is None else str(h.exit_code),
                         "-" if s.duration_ms is None else f"{s.duration_ms / 1000:.2f}s",
                         "-" if s.batch is None else str(s.batch), (h.error or "").replace("\n", " ")[:200]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines += ["  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
                  for row in rows]
        groups = output_groups(self.hosts)
        if groups:
            lines.append("output (identical output once, failures first):")
        for g in groups:
            lines.append(f"--- {g.label()}:")
            lines.append(g.stdout.rstrip("\n"))
        return "\n".join(lines)


def show_run(db: Database, log_id: int, *, host: str | None = None) -> RunDetail:
    """Run ``log_id`` with all its hosts, or only the one named ``host`` (name, address or
    execution id). Raises RunNotFound / CroniumFabError saying what exists."""
    with db.session() as s:
        run = stored_run(s, log_id)
    if run is None:
        raise RunNotFound(f"run {log_id} not found: give a log id (`cronium-fab runs` lists them)")
    stored = list(run.hosts)
    view = RunView(run, [host_state_of(h.exec_status, h.host_status) for h in stored])
    if host is not None:
        stored = [h for h in stored if host in (h.name, h.address, h.execution_id)]
        if not stored:
            names = ", ".join(h.name for h in run.hosts[:20]) + (", ..." if len(run.hosts) > 20 else "")
            raise CroniumFabError(f"run {log_id} has no host {host!r}; its hosts: {names or 'none'}")
    return RunDetail(view, [_host_result(h) for h in stored], stored)
