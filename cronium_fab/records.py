"""Every row a run writes, in one place: jobs, executions, logs, user_variables, runner_deployments,
events counters. Bundled mode (results at the end) and API mode (live helper calls) both write
variables, output and condition through the functions here, so there is one implementation of each.

Rows move forward only (queued → running → terminal); a run that fails half-way still leaves every
row in a terminal state (see ``RunRecorder.abort``).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db.engine import Database
from .db.models import Event, Execution, Job, Log, RunnerDeployment, UserVariable, utcnow
from .db.queries import ResolvedEvent, encode_variable
from .errors import CroniumFabError
from .results import HostResult, HostStatus, RunResult, RunStatus

ExecStatus = Literal["queued", "running", "completed", "failed", "timeout", "cancelled", "skipped"]
JobStatus = Literal["queued", "claimed", "running", "completed", "failed", "cancelled"]
LogStatus = Literal["PENDING", "RUNNING", "SUCCESS", "FAILURE", "TIMEOUT", "PARTIAL"]

# host state -> executions.status (a varchar in Cronium: ``skipped`` is ours, for hosts the
# failure budget kept from starting); the exact host state is also in execution_metadata.host_status
EXEC_STATUS: dict[HostStatus, ExecStatus] = {
    "success": "completed", "failure": "failed", "timeout": "timeout", "unreachable": "failed", "cancelled": "cancelled",
    "skipped": "skipped"}
# run status -> jobs.status and logs.status, as Cronium maps them (logs.status has no CANCELLED and
# no STOPPED: a run the failure budget stopped did not do what it was asked, so it is a FAILURE,
# and logs.error says why)
JOB_STATUS: dict[RunStatus, JobStatus] = {
    "SUCCESS": "completed", "PARTIAL": "completed", "FAILURE": "failed", "TIMEOUT": "failed", "CANCELLED": "cancelled",
    "STOPPED": "failed"}
LOG_STATUS: dict[RunStatus, LogStatus] = {
    "SUCCESS": "SUCCESS", "PARTIAL": "PARTIAL", "FAILURE": "FAILURE", "TIMEOUT": "TIMEOUT", "CANCELLED": "FAILURE",
    "STOPPED": "FAILURE"}
# executions.status -> host state, for rows that do not record host_status (written by others)
HOST_STATE_OF_EXEC: dict[str, HostStatus] = {
    "completed": "success", "failed": "failure", "timeout": "timeout", "cancelled": "cancelled", "skipped": "skipped"}


_EXECUTIONS: Table = Execution.__table__  # type: ignore[assignment]
_DEPLOYMENTS: Table = RunnerDeployment.__table__  # type: ignore[assignment]
_PHASES = ("setup_started_at", "setup_completed_at", "execution_started_at", "execution_completed_at",
           "cleanup_started_at", "cleanup_completed_at")
# The per-host writes as Core statements built once, executed with parameters: the ORM's
# get/flush and per-call .values() cost ~1-2 ms of CPU per host (measured, 100 hosts).
_HOSTS_RUNNING = (update(_EXECUTIONS).where(_EXECUTIONS.c.id.in_(bindparam("ids", expanding=True)),
                                            _EXECUTIONS.c.status == "queued")
                  .values(status="running", started_at=bindparam("now"), setup_started_at=bindparam("now"),
                          updated_at=bindparam("now")))
# what a host's end needs from its row (locked: API-mode helpers merge into execution_metadata)
_FINISH_READ = (select(_EXECUTIONS.c.status, _EXECUTIONS.c.started_at, _EXECUTIONS.c.execution_metadata,
                       *(_EXECUTIONS.c[k] for k in _PHASES))
                .where(_EXECUTIONS.c.id == bindparam("eid")).with_for_update())
_FINISH_WRITE = update(_EXECUTIONS).where(_EXECUTIONS.c.id == bindparam("eid"))
_DEPLOYMENT_WHERE = (_DEPLOYMENTS.c.server_id == bindparam("sid"), _DEPLOYMENTS.c.checksum == bindparam("sum"))
_DEPLOYMENT_USED = update(_DEPLOYMENTS).where(*_DEPLOYMENT_WHERE)
# the run's end: host rows still open (a bug, an abort) closed in one statement
_CLOSE_OPEN = (update(_EXECUTIONS).where(_EXECUTIONS.c.id.in_(bindparam("ids", expanding=True)),
                                         _EXECUTIONS.c.status.in_(("queued", "running")))
               .values(status=bindparam("to_status"), error=bindparam("reason"), completed_at=bindparam("now")))

def host_state_of(exec_status: str, recorded: object) -> str:
    """A stored host's state: the ``host_status`` we recorded, else read from executions.status
    (``queued``/``running`` stay as they are: that host has not ended)."""
    if isinstance(recorded, str) and recorded:
        return recorded
    return HOST_STATE_OF_EXEC.get(exec_status, exec_status)


class JobNotFound(CroniumFabError):
    pass


JOB_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_job_id() -> str:
    """An id like the app's own: ``job_`` and 12 characters of [0-9A-Za-z] (its nanoid alphabet)."""
    return "job_" + "".join(secrets.choice(JOB_ID_ALPHABET) for _ in range(12))


def hand_run_payload(event: ResolvedEvent, server_ids: Sequence[int | None], input_data: Any,
                     timeout_s: float | None, fleet: dict[str, Any] | None = None) -> dict[str, Any]:
    """``jobs.payload`` for a run that no Cronium job asked for, shaped as the app's job payload
    builder makes it, so Cronium's UI shows the job like its own. ``target.serverId`` is the first
    server, as the app writes it; ``target.serverIds`` lists them all (ours: the app has no
    multi-server shape). Env var values are left out: a job row is no place for secrets. ``fleet``:
    the run control that differs from the defaults (``control.RunControl.to_payload``)."""
    registered = [sid for sid in server_ids if sid is not None]
    target: dict[str, Any] = {"serverId": registered[0]} if registered else {}
    if len(server_ids) > 1 or len(registered) < len(server_ids):
        target["serverIds"] = registered
    if timeout_s is None:
        timeout = {"value": event.timeout_value, "unit": event.timeout_unit}
    else:
        timeout = {"value": timeout_s, "unit": "SECONDS"}
    payload: dict[str, Any] = {
        "input": {} if input_data is None else input_data,
        "script": {"type": event.type, "content": event.content},
        "target": target,
        "timeout": timeout,
    }
    if event.retries:
        payload["retries"] = event.retries
    if fleet:
        payload["fleet"] = fleet
    return payload


def execution_id_for(job_id: str, server_key: str | int) -> str:
    """Cronium's ``exec_<jobId>_<serverId>_<unix>`` plus a random suffix: a retry of the same job in
    the same second, or the same server named twice, never collides."""
    return f"exec_{job_id}_{server_key}_{int(time.time())}_{secrets.token_hex(3)}"[-100:]


MAX_KEY_LEN = 255  # user_variables.key is varchar(255)


def clean_text(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL: a script that prints one must not lose its whole record."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def clean_json(value: Any) -> Any:
    """``clean_text`` through a JSON value (jsonb refuses \\u0000 too)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    return value


def ms_between(a: datetime | None, b: datetime | None) -> int | None:
    if a is None or b is None:
        return None
    return max(0, int((b - a).total_seconds() * 1000))


def set_variable(session: Session, user_id: str, key: str, value: Any) -> None:
    """Upsert one of the user's variables (the only implementation; API and bundled mode use it)."""
    if len(key) > MAX_KEY_LEN:
        raise CroniumFabError(f"variable key of {len(key)} characters: at most {MAX_KEY_LEN} are stored")
    text = clean_text(encode_variable(value)) or ""
    key = clean_text(key) or key
    row = session.scalars(
        select(UserVariable).where(UserVariable.user_id == user_id, UserVariable.key == key).with_for_update()
    ).first()
    if row is None:
        try:
            with session.begin_nested():
                session.add(UserVariable(user_id=user_id, key=key, value=text))
            return
        except IntegrityError:  # another writer inserted it meanwhile: update theirs
            row = session.scalars(
                select(UserVariable).where(UserVariable.user_id == user_id, UserVariable.key == key)
            ).one()
    row.value = text
    row.updated_at = utcnow()


_GET_VARIABLE = select(UserVariable.value).where(
    UserVariable.user_id == bindparam("user_id"), UserVariable.key == bindparam("key")
)


def get_variable(session: Session | Connection, user_id: str, key: str) -> str | None:
    """The stored text of one of the user's variables (a Session, or a plain Connection for speed)."""
    return session.execute(_GET_VARIABLE, {"user_id": user_id, "key": key}).scalar()


def read_variable(db: Database, user_id: str, key: str) -> str | None:
    """``get_variable`` on a pooled connection without an ORM session or a transaction (the API's
    hot path: one statement, one round trip)."""
    with db.autocommit.connect() as conn:
        return get_variable(conn, user_id, key)


def set_output(session: Session, execution_id: str, data: Any) -> None:
    _merge_execution_metadata(session, execution_id, {"output": data, "output_set": True})


def set_condition(session: Session, execution_id: str, condition: bool) -> None:
    _merge_execution_metadata(session, execution_id, {"condition": bool(condition)})


def _merge_execution_metadata(session: Session, execution_id: str, values: dict[str, Any]) -> None:
    row = session.get(Execution, execution_id, with_for_update=True)
    if row is None:
        raise CroniumFabError(f"execution {execution_id} not found")
    meta = dict(row.execution_metadata or {})
    meta.update(clean_json(values))
    row.execution_metadata = meta
    row.updated_at = utcnow()


@dataclass(frozen=True)
class Deployment:
    """Which runner a server used in this run (a ``runner_deployments`` row)."""

    server_id: int
    runner_version: str
    runner_path: str
    checksum: str
    installed: bool
    ok: bool


@dataclass(frozen=True)
class QueueClaim:
    """A run for a job a ``serve`` worker claimed: rows are written only while ``token`` holds the
    job's lease; a failed attempt with attempts left goes back to ``queued`` (after a backoff, on
    the hosts that did not succeed) in the same transaction that records it."""

    worker_id: str
    token: str
    attempt: int
    max_attempts: int
    retry_backoff_s: float = 5.0


def job_lease(job: Job) -> dict[str, Any]:
    """``jobs.metadata.lease`` of a job a serve worker claimed ({} when none)."""
    meta = job.metadata_ if isinstance(job.metadata_, dict) else {}
    lease = meta.get("lease")
    return lease if isinstance(lease, dict) else {}


def holds_lease(job: Job, token: str) -> bool:
    return job_lease(job).get("token") == token


def merge_metadata(job: Job, **changes: Any) -> None:
    """Set (or, with None, remove) keys of ``jobs.metadata``, keeping the app's own."""
    meta = dict(job.metadata_ if isinstance(job.metadata_, dict) else {})
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    job.metadata_ = meta


@dataclass
class JobContext:
    job_id: str
    log_id: int
    input: Any
    created: bool


class RunRecorder:
    """Writes one run's rows. Thread-safe: hosts finish in worker threads.

    ``lease``: the token of a queue claim (``serve``): the job's and log's rows are written only
    while ``jobs.metadata.lease.token`` is still ours (a worker that lost its lease records nothing)."""

    def __init__(self, db: Database, claim: QueueClaim | None = None) -> None:
        self.db = db
        self.claim = claim
        self.lease = claim.token if claim is not None else None
        self._lock = threading.Lock()

    def _ours(self, job: Job | None) -> bool:
        if job is None:
            return False
        return self.lease is None or holds_lease(job, self.lease)

    # -- start -----------------------------------------------------------------------------
    def start(self, *, event_id: int, event_name: str, event_type: str, user_id: str,
              job_id: str | None, input_data: Any, new_job_payload: dict[str, Any] | None = None,
              triggered_by: str = "manual", metadata: dict[str, Any] | None = None) -> JobContext:
        """The run's ``jobs`` row (Cronium's, with ``job_id``; else a new one, as the app writes
        it: payload ``new_job_payload``, metadata ``{eventName, triggeredBy, logId}`` plus
        ``metadata``, e.g. ``rerunOf``) and its ``logs`` row, both ``running``/``RUNNING``."""
        now = utcnow()
        with self.db.session() as s:
            if job_id is not None:
                job = s.get(Job, job_id, with_for_update=True)
                if job is None:
                    raise JobNotFound(f"job {job_id!r} not found in the jobs table: check --job")
                if job.event_id is not None and job.event_id != event_id:
                    raise JobNotFound(f"job {job_id!r} belongs to event {job.event_id}, not {event_id}")
                if not self._ours(job):
                    raise JobNotFound(f"job {job_id!r}: this worker's claim on it is gone (lease lost)")
                if job.status == "cancelled":
                    raise JobNotFound(f"job {job_id!r} was cancelled before it started")
                payload = job.payload or {}
                if input_data is None:
                    input_data = payload.get("input")
                created = False
            else:
                job_id = new_job_id()
                payload = dict(new_job_payload or {"input": input_data, "script": {"type": event_type}})
                job = Job(id=job_id, event_id=event_id, user_id=user_id, type="SCRIPT", status="queued",
                          payload=payload,
                          metadata_={"eventName": event_name, "triggeredBy": triggered_by, **(metadata or {})},
                          scheduled_for=now, created_at=now)
                s.add(job)
                created = True
            job.status = "running"
            job.started_at = now
            job.attempts = (job.attempts or 0) + 1
            job.updated_at = now
            if self.claim is None:   # who runs it, so that the next cronium-fab can tell when we are gone
                merge_metadata(job, owner=this_process())
            s.flush()
            log_id = payload.get("executionLogId") if isinstance(payload, dict) else None
            log = s.get(Log, int(log_id)) if log_id not in (None, "") else None
            if log is None:
                log = Log(event_id=event_id, job_id=job_id, user_id=user_id, event_name=event_name,
                          event_type=event_type, created_at=now)
                s.add(log)
            log.status = "RUNNING"
            log.start_time = now
            log.job_id = job_id
            log.updated_at = now
            s.flush()
            if created:
                meta = dict(job.metadata_ or {})
                meta["logId"] = log.id
                job.metadata_ = meta
                job.payload = dict(payload, executionLogId=log.id)
            return JobContext(job_id, log.id, input_data, created)

    def add_executions(self, job_id: str, rows: list[tuple[str, int | None, str, dict[str, Any]]]) -> None:
        """One ``queued`` executions row per host, all in one transaction: (id, server_id, name, metadata)."""
        now = utcnow()
        with self.db.session() as s:
            s.add_all(
                Execution(id=eid, job_id=job_id, server_id=sid, server_name=name, status="queued",
                          metadata_=meta, created_at=now, updated_at=now)
                for eid, sid, name, meta in rows
            )

    def hosts_running(self, execution_ids: list[str]) -> None:
        """``queued`` -> ``running`` for hosts that start now, in one UPDATE (one transaction for
        all the hosts that start at once)."""
        if not execution_ids:
            return
        now = utcnow()
        # Core, one statement, no transaction of its own: a host's start is the run's most frequent
        # write (the ORM's bulk UPDATE cost ~1 ms of CPU per call)
        with self._lock, self.db.autocommit.connect() as c:
            c.execute(_HOSTS_RUNNING, {"ids": list(execution_ids), "now": now})

    def hosts_not_started(self, execution_ids: list[str], status: HostStatus, reason: str) -> None:
        """Hosts that never started (``skipped`` by the failure budget, ``cancelled`` before their
        turn) end in one UPDATE, whatever their number."""
        if not execution_ids:
            return
        now = utcnow()
        with self._lock, self.db.session() as s:
            s.execute(update(Execution).where(Execution.id.in_(execution_ids), Execution.status == "queued")
                      .values(status=EXEC_STATUS[status], error=clean_text(reason), completed_at=now, updated_at=now,
                              execution_metadata={"host_status": status, "connect_attempts": 0}))

    # -- per host --------------------------------------------------------------------------
    def host_finished(self, res: HostResult, *, phases: dict[str, datetime | None], user_id: str,
                      write_variables: bool, deployment: Deployment | None = None) -> None:
        """Terminal state of one host, the variables it set (bundled mode: written now) and which
        runner it used, in one transaction."""
        now = utcnow()
        metadata: dict[str, Any] = {
            "runner_cached": res.runner_cached, "helper_mode": res.helper_mode,
            "helper_mode_note": res.helper_mode_note, "output": res.output, "condition": res.condition,
            "variables": res.variables, "signal": res.signal, "error_kind": res.error_kind,
            "host_status": res.status, "batch": res.batch, "connect_attempts": res.connect_attempts,
            "connection_reused": res.connection_reused,
        }
        variables = res.variables
        # Core statements on the session's connection: the ORM's get/flush cost ~2 ms of CPU per host
        with self._lock, self.db.session() as s:
            c = s.connection()
            if deployment is not None:
                self._record_deployment(c, deployment, now)
            row = c.execute(_FINISH_READ, {"eid": res.execution_id}).mappings().first()
            if row is None or row["status"] not in ("queued", "running"):
                return   # closed once: a lost attempt's row (reaped, recovered) keeps its reason
            live = dict(row["execution_metadata"] or {})
            times = {**{k: row[k] for k in _PHASES}, **phases}
            refused = [k for k in variables if len(k) > MAX_KEY_LEN]
            if refused:
                metadata = dict(metadata, refused_variables=[k[:64] + "..." for k in refused],
                                variables={k: v for k, v in metadata.get("variables", {}).items() if k not in refused})
            live.update(clean_json(metadata))
            c.execute(_FINISH_WRITE, dict(
                times, eid=res.execution_id, status=EXEC_STATUS[res.status], exit_code=res.exit_code,
                output=clean_text(res.stdout + (("\n--- stderr ---\n" + res.stderr) if res.stderr else "")),
                error=clean_text(res.error), completed_at=now,
                setup_duration=ms_between(times["setup_started_at"], times["setup_completed_at"]),
                execution_duration=ms_between(times["execution_started_at"], times["execution_completed_at"]),
                cleanup_duration=ms_between(times["cleanup_started_at"], times["cleanup_completed_at"]),
                total_duration=ms_between(row["started_at"], now),
                execution_metadata=live, updated_at=now))
            if write_variables:
                for key, value in variables.items():
                    if key not in refused:
                        set_variable(s, user_id, key, value)

    @staticmethod
    def _record_deployment(c: Connection, d: Deployment, now: datetime) -> None:
        values: dict[str, Any] = {"runner_path": d.runner_path, "last_used": now, "status": "active" if d.ok else "failed"}
        if d.installed:
            values["deployed_at"] = now
        if not c.execute(_DEPLOYMENT_USED, dict(values, sid=d.server_id, sum=d.checksum)).rowcount:
            c.execute(insert(_DEPLOYMENTS), dict(values, server_id=d.server_id, checksum=d.checksum,
                                                 runner_version=d.runner_version, deployed_at=now))

    # -- end -------------------------------------------------------------------------------
    def host_failed(self, execution_id: str, error: str) -> None:
        """The fallback when recording a host's result failed: status and error only, own transaction."""
        with self._lock, self.db.session() as s:
            row = s.get(Execution, execution_id)
            if row is not None and row.status in ("queued", "running"):
                row.status = "failed"
                row.error = clean_text(error)
                row.completed_at = utcnow()

    def finish(self, ctx: JobContext, result: RunResult) -> None:
        """The run's end: ``logs`` (status, output of every host), ``jobs`` (status, result),
        the event's counters; a host row a bug left open is closed as failed."""
        now = utcnow()
        hosts = result.hosts
        status = result.status
        output = clean_text(log_output(hosts)) or ""
        error = clean_text(run_error(result))
        open_executions = [r.execution_id for r in hosts]
        duration_ms, setup_ms = result.duration_ms, None
        execution_ms = max((r.duration_ms for r in hosts), default=0)
        exit_code = run_exit_code(hosts)
        job_result = clean_json(job_result_of(result))
        with self._lock, self.db.session() as s:
            if open_executions:  # a host row a bug left open must not stay "running"
                s.connection().execute(_CLOSE_OPEN, {"ids": open_executions, "to_status": "failed",
                                                     "reason": "not recorded (internal error)", "now": now})
            job = s.get(Job, ctx.job_id, with_for_update=self.lease is not None)
            if not self._ours(job):   # a worker that lost its lease: its host rows only
                return
            log = s.get(Log, ctx.log_id)
            history = (job.metadata_ or {}).get("log_history") if job is not None and isinstance(job.metadata_, dict) else None
            if log is not None:
                log.status = LOG_STATUS[status]
                log.output = "\n".join([*(f"--- {h}" for h in history or []), output]) if history else output
                log.end_time = now
                log.duration = duration_ms
                log.setup_duration = setup_ms
                log.execution_duration = execution_ms
                log.successful = status == "SUCCESS"
                log.exit_code = exit_code
                log.error = error
                log.updated_at = now
            if job is not None:
                job.status = JOB_STATUS[status]
                job.completed_at = now
                job.result = job_result
                job.last_error = error
                job.updated_at = now
                if self.claim is not None:
                    self._end_attempt(job, log, result, now)
            event = s.get(Event, result.event_id, with_for_update=True)
            if event is not None:
                event.last_run_at = now
                event.execution_count = (event.execution_count or 0) + 1
                if status == "SUCCESS":
                    event.success_count = (event.success_count or 0) + 1
                else:
                    event.failure_count = (event.failure_count or 0) + 1

    def _end_attempt(self, job: Job, log: Log | None, result: RunResult, now: datetime) -> None:
        """A claimed job's attempt ends: recorded in its history, then retried or released."""
        claim = self.claim
        assert claim is not None
        failed = [h.name for h in result.hosts if h.status != "success"]
        history = list((job.metadata_ or {}).get("attempts") or [])
        history.append({"attempt": claim.attempt, "status": result.status, "worker": claim.worker_id,
                        "finished_at": now.isoformat(), "failed_hosts": failed})
        job.result = dict(job.result or {}, attempts=history)
        merge_metadata(job, lease=None, attempts=history)
        if result.status in ("SUCCESS", "CANCELLED") or claim.attempt >= claim.max_attempts or not failed:
            return
        delay = min(300.0, claim.retry_backoff_s * 2 ** (claim.attempt - 1))
        line = (f"attempt {claim.attempt} of {claim.max_attempts}: {result.status}; retry {claim.attempt + 1} in "
                f"{delay:g} s on {', '.join(failed)}")
        job.status, job.orchestrator_id, job.completed_at = "queued", None, None
        job.scheduled_for = now + timedelta(seconds=delay)
        job.payload = dict(job.payload or {}, retryHosts=failed)
        job.last_error = clean_text(f"{line}: {job.last_error}" if job.last_error else line)
        note_attempt(job, log, line)

    def abort(self, ctx: JobContext, execution_ids: list[str], reason: str) -> None:
        """Bring every row still open to a terminal state (used on errors and interrupts)."""
        now = utcnow()
        with self._lock, self.db.session() as s:
            if execution_ids:
                s.connection().execute(_CLOSE_OPEN, {"ids": list(execution_ids), "to_status": "cancelled",
                                                     "reason": clean_text(reason), "now": now})
            job = s.get(Job, ctx.job_id)
            if not self._ours(job):
                return
            log = s.get(Log, ctx.log_id)
            if log is not None and log.status in ("PENDING", "RUNNING"):
                log.status = "FAILURE"
                log.error = clean_text(reason)
                log.end_time = now
                log.successful = False
            if job is not None and job.status in ("queued", "claimed", "running"):
                job.status = "cancelled"
                job.last_error = clean_text(reason)
                job.completed_at = now


def run_exit_code(results: list[HostResult]) -> int:
    """``logs.exit_code``: 0 when every host succeeded, else the first failing host's own code."""
    codes = [r.exit_code for r in results if r.status != "success"]
    if not codes:
        return 0
    return next((c for c in codes if c), 1)


def run_error(result: RunResult) -> str | None:
    """``logs.error`` / ``jobs.last_error``: why the budget stopped the run, each host that failed
    and why, and the hosts that never started (once, however many)."""
    parts = [f"stopped: {result.stopped}"] if result.stopped else []
    parts += [f"{r.name}: {r.error or r.status}" for r in result.hosts if r.status not in ("success", "skipped")]
    skipped = [r.name for r in result.hosts if r.status == "skipped"]
    if skipped:
        parts.append(f"{len(skipped)} skipped (never started): {', '.join(skipped)}")
    return "; ".join(parts) or None


def log_output(results: list[HostResult]) -> str:
    """``logs.output``: every host's output under a header line with its state."""
    parts = []
    for r in results:
        parts.append(f"=== {r.name} ({r.host}): {r.status}" + (f" exit {r.exit_code}" if r.exit_code is not None else "")
                     + (f" [helpers: {r.helper_mode}]" if r.helper_mode else ""))
        if r.helper_mode_note:
            parts.append(f"--- {r.helper_mode_note}")
        if r.stdout:
            parts.append(r.stdout.rstrip("\n"))
        if r.stderr:
            parts.append("--- stderr ---\n" + r.stderr.rstrip("\n"))
        if r.error:
            parts.append(f"--- error: {r.error}")
    return "\n".join(parts)


def job_result_of(result: RunResult) -> dict[str, Any]:
    """``jobs.result``: the run's JSON document without the hosts' output (that is in executions/logs)."""
    d = result.to_dict()
    for h in d["hosts"]:
        h.pop("stdout", None)
        h.pop("stderr", None)
    return d


def note_attempt(job: Job, log: Log | None, line: str) -> None:
    """An attempt that will be followed by another: its outcome stays in the job's ``logs`` row
    (``PENDING`` again, as Cronium shows a queued job) above what the next attempt writes."""
    history = list((job.metadata_ or {}).get("log_history") or [])
    history.append(line)
    merge_metadata(job, log_history=history)
    if log is not None:
        log.status = "PENDING"
        log.retries = (log.retries or 0) + 1
        log.output = ((log.output or "") + ("\n" if log.output else "") + f"--- {line}").strip()
        log.updated_at = utcnow()


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def this_process() -> dict[str, Any]:
    """This controller, as ``jobs.metadata.owner``: host, pid and start time (a pid can be reused)."""
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "since": _start_ticks(os.getpid())}


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the controller ``owner`` still runs: None when it ran on another host (we cannot
    tell: a serve worker's lease covers that case)."""
    import socket

    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    return isinstance(pid, int) and _start_ticks(pid) is not None and _start_ticks(pid) == owner.get("since")


def recover_lost_runs(db: Database) -> list[str]:
    """Close the rows of runs whose controller is gone (killed with SIGKILL, the machine rebooted):
    on this host, ``running`` jobs whose owner process no longer exists end ``failed``, with their
    open ``executions`` and their ``logs`` row, "controller lost". Never a run whose controller is
    alive, nor another host's, nor a serve worker's claimed job (its lease covers it). Returns the
    job ids closed."""
    closed: list[str] = []
    now = utcnow()
    query = select(Job).where(Job.status == "running")
    if db.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True)
    with db.session() as s:
        for job in s.scalars(query):
            meta = job.metadata_ if isinstance(job.metadata_, dict) else {}
            owner = meta.get("owner")
            if meta.get("lease") or not isinstance(owner, dict) or owner_alive(owner) is not False:
                continue
            why = (f"controller lost: cronium-fab (pid {owner.get('pid')} on {owner.get('host')}) ended without "
                   "recording the run's end (killed?)")
            job.status, job.completed_at, job.last_error, job.updated_at = "failed", now, why, now
            for row in s.scalars(select(Execution).where(Execution.job_id == job.id,
                                                         Execution.status.in_(("queued", "running")))):
                row.status, row.error, row.completed_at, row.updated_at = "failed", why, now, now
            for log in s.scalars(select(Log).where(Log.job_id == job.id, Log.status.in_(("PENDING", "RUNNING")))):
                log.status, log.error, log.end_time, log.successful, log.updated_at = "FAILURE", why, now, False, now
            closed.append(job.id)
    return closed
