"""Reading Cronium's data: one event with its servers, env vars and the user's variables; a job's
payload; past runs (``logs`` with their ``executions``) for ``runs``, ``show`` and ``rerun``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ..errors import EventNotFound, EventNotRunnable, NoServers
from .crypto import decrypt, load_key
from .models import EnvVar, Event, EventServer, Execution, Job, Log, Server, UserVariable

SCRIPT_TYPES = {"BASH": "bash", "PYTHON": "python", "NODEJS": "node", "NODE": "node"}
REFUSED_TYPES = {"HTTP_REQUEST", "TOOL_ACTION"}
TIMEOUT_UNITS = {"SECONDS": 1, "MINUTES": 60, "HOURS": 3600, "DAYS": 86400}


@dataclass(frozen=True)
class ResolvedServer:
    """A server with its credentials decrypted (never log ``private_key`` or ``password``)."""

    id: int
    name: str
    address: str
    port: int
    username: str
    private_key: str | None = field(repr=False)
    password: str | None = field(repr=False)


@dataclass(frozen=True)
class SkippedServer:
    id: int
    name: str
    reason: str


@dataclass(frozen=True)
class ResolvedEvent:
    id: int
    user_id: str
    name: str
    type: str
    content: str
    timeout_seconds: float
    payload_version: int
    servers: list[ResolvedServer]
    skipped: list[SkippedServer]
    env: dict[str, str] = field(repr=False)
    timeout_value: int = 30
    timeout_unit: str = "SECONDS"
    retries: int = 0

    @property
    def interpreter(self) -> str:
        return SCRIPT_TYPES[self.type]


def event_timeout_seconds(value: int | None, unit: str | None) -> float:
    factor = TIMEOUT_UNITS.get((unit or "SECONDS").upper())
    if factor is None:
        raise EventNotRunnable(f"timeout unit {unit!r} is not one of {', '.join(TIMEOUT_UNITS)}")
    return float((value if value is not None else 30) * factor)


def check_script_event(event: Event) -> None:
    """Refuse events that must never run on SSH targets, with a reason the user can act on."""
    etype = (event.type or "").upper()
    if etype in REFUSED_TYPES:
        raise EventNotRunnable(
            f"event {event.id} ({event.name!r}) is of type {etype}: only BASH, PYTHON and NODEJS "
            "events run on SSH servers (HTTP requests and tool actions run in Cronium itself)"
        )
    if etype not in SCRIPT_TYPES:
        raise EventNotRunnable(f"event {event.id} has unknown type {event.type!r}; expected BASH, PYTHON or NODEJS")


def get_event(session: Session, event_id: int) -> Event:
    event = session.get(Event, event_id)
    if event is None:
        raise EventNotFound(event_id)
    return event


def server_credentials(server: Server, key: bytes | None) -> ResolvedServer:
    label = f"server {server.name!r} (id {server.id})"
    return ResolvedServer(
        id=server.id,
        name=server.name,
        address=server.address,
        port=server.port or 22,
        username=server.username or "root",
        private_key=decrypt(server.ssh_key, key, what=f"ssh_key of {label}"),
        password=decrypt(server.password, key, what=f"password of {label}"),
    )


def event_servers(session: Session, event: Event) -> tuple[list[Server], list[SkippedServer]]:
    """The event's servers: its event_servers links, else events.server_id; archived ones skipped."""
    linked = session.scalars(
        select(Server)
        .join(EventServer, EventServer.server_id == Server.id)
        .where(EventServer.event_id == event.id)
        .order_by(EventServer.id)
    ).all()
    candidates = list(linked)
    if not candidates and event.server_id is not None:
        legacy = session.get(Server, event.server_id)
        if legacy is not None:
            candidates = [legacy]
    usable: list[Server] = []
    skipped: list[SkippedServer] = []
    seen: set[int] = set()
    for server in candidates:
        if server.id in seen:
            continue
        seen.add(server.id)
        if server.is_archived:
            skipped.append(SkippedServer(server.id, server.name, "server is archived"))
        else:
            usable.append(server)
    return usable, skipped


def find_server(session: Session, value: str, *, user_id: str | None = None) -> Server | None:
    """The server a user means by ``value``: its name or its address, never an archived one, the
    user's own when ``user_id`` is given (the oldest first when several match)."""
    query = select(Server).where(Server.is_archived.is_(False), or_(Server.name == value, Server.address == value))
    if user_id is not None:
        query = query.where(Server.user_id == user_id)
    return session.scalars(query.order_by(Server.id)).first()


def server_names(session: Session, user_id: str) -> list[str]:
    """The names of the user's servers (not archived), for suggestions."""
    return list(session.scalars(select(Server.name).where(Server.user_id == user_id, Server.is_archived.is_(False))
                                .order_by(Server.name)))


def event_env(session: Session, event_id: int, key: bytes | None) -> dict[str, str]:
    rows = session.scalars(select(EnvVar).where(EnvVar.event_id == event_id).order_by(EnvVar.id)).all()
    env: dict[str, str] = {}
    for row in rows:
        value = decrypt(row.value, key, what=f"env var {row.key!r} of event {event_id}")
        env[row.key] = value or ""
    return env


def resolve_event(session: Session, event_id: int, *, require_servers: bool = True) -> ResolvedEvent:
    """Resolve an event to everything a run needs: script, timeout, servers with credentials, env.

    Raises EventNotFound, EventNotRunnable (HTTP_REQUEST / TOOL_ACTION / unknown type),
    NoServers (nothing usable; the message lists the skipped ones and why) and CredentialError.
    """
    event = get_event(session, event_id)
    check_script_event(event)
    key = load_key()
    servers, skipped = event_servers(session, event)
    if require_servers and not servers:
        why = "; ".join(f"{s.name} (id {s.id}): {s.reason}" for s in skipped)
        raise NoServers(
            f"event {event.id} ({event.name!r}) has no server to run on"
            + (f" (skipped: {why})" if why else "")
            + ": link servers with `cronium-fab load` or Cronium's event editor, or pass -H"
        )
    return ResolvedEvent(
        id=event.id,
        user_id=event.user_id,
        name=event.name,
        type=event.type.upper(),
        content=event.content or "",
        timeout_seconds=event_timeout_seconds(event.timeout_value, event.timeout_unit),
        payload_version=event.payload_version or 1,
        servers=[server_credentials(s, key) for s in servers],
        skipped=skipped,
        env=event_env(session, event.id, key),
        timeout_value=event.timeout_value if event.timeout_value is not None else 30,
        timeout_unit=(event.timeout_unit or "SECONDS").upper(),
        retries=event.retries or 0,
    )


def decode_variable(text: str | None) -> Any:
    """Stored variable text → JSON value: JSON documents decode, anything else stays a string."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def encode_variable(value: Any) -> str:
    """JSON value → stored text: strings as they are (Cronium shows them), others JSON-encoded."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def user_variables(session: Session, user_id: str) -> dict[str, Any]:
    rows = session.scalars(select(UserVariable).where(UserVariable.user_id == user_id)).all()
    return {row.key: decode_variable(row.value) for row in rows}


def get_server(session: Session, server_id: int) -> Server | None:
    return session.get(Server, server_id)


def job_payload(session: Session, job_id: str) -> Any:
    """A job's ``payload`` (None when there is no such job: the run's start reports that)."""
    return session.scalars(select(Job.payload).where(Job.id == job_id)).first()


# -- past runs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredHost:
    """One ``executions`` row of a past run. ``host_status`` is the exact state we recorded
    (None in rows others wrote: then only ``exec_status`` tells)."""

    execution_id: str
    server_id: int | None
    name: str
    address: str | None
    exec_status: str
    host_status: str | None
    exit_code: int | None
    error: str | None
    error_kind: str | None
    output: str | None
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None
    index: int | None
    batch: int | None
    connect_attempts: int | None


@dataclass(frozen=True)
class StoredRun:
    """One ``logs`` row (a run) with its job's run status and input and, when asked, its hosts."""

    log_id: int
    event_id: int | None
    event_name: str | None
    log_status: str
    run_status: str | None  # jobs.result.status: ours, finer than logs.status (STOPPED, CANCELLED)
    job_id: str | None
    start_time: datetime | None
    end_time: datetime | None
    duration_ms: int | None
    error: str | None
    input: Any
    rerun_of: int | None
    hosts: list[StoredHost] = field(default_factory=list)
    # (executions.status, recorded host_status) of each host, for counting (``stored_runs``)
    states: list[tuple[str, str | None]] = field(default_factory=list)


_RUN_COLUMNS = (Log.id, Log.event_id, Log.event_name, Log.status, Job.result["status"].as_string(), Log.job_id,
                Log.start_time, Log.end_time, Log.duration, Log.error, Job.payload["input"],
                Job.metadata_["rerunOf"].as_string())


def _run_of(row: Any) -> StoredRun:
    rerun = row[11]
    return StoredRun(log_id=row[0], event_id=row[1], event_name=row[2], log_status=row[3], run_status=row[4],
                     job_id=row[5], start_time=row[6], end_time=row[7], duration_ms=row[8], error=row[9],
                     input=row[10], rerun_of=int(rerun) if rerun and str(rerun).isdigit() else None)


def stored_runs(session: Session, *, event_id: int | None = None, limit: int = 20) -> list[StoredRun]:
    """The latest runs (newest first), each with the states of its hosts (no output read)."""
    query = select(*_RUN_COLUMNS).outerjoin(Job, Job.id == Log.job_id).order_by(Log.id.desc()).limit(limit)
    if event_id is not None:
        query = query.where(Log.event_id == event_id)
    runs = [_run_of(row) for row in session.execute(query)]
    by_job = {r.job_id: r for r in runs if r.job_id}
    if by_job:
        states = select(Execution.job_id, Execution.status, Execution.execution_metadata["host_status"].as_string())
        for job_id, status, host_status in session.execute(states.where(Execution.job_id.in_(list(by_job)))):
            by_job[job_id].states.append((status, host_status))
    return runs


def stored_run(session: Session, log_id: int) -> StoredRun | None:
    """One run with all its hosts, in the run's host order (the order they were listed in)."""
    row = session.execute(select(*_RUN_COLUMNS).outerjoin(Job, Job.id == Log.job_id).where(Log.id == log_id)).first()
    if row is None:
        return None
    run = _run_of(row)
    if run.job_id is None:
        return run
    for e in session.scalars(select(Execution).where(Execution.job_id == run.job_id)):
        meta, live = dict(e.metadata_ or {}), dict(e.execution_metadata or {})
        run.hosts.append(StoredHost(
            execution_id=e.id, server_id=e.server_id, name=e.server_name or e.id, address=meta.get("host"),
            exec_status=e.status, host_status=live.get("host_status"), exit_code=e.exit_code, error=e.error,
            error_kind=live.get("error_kind"), output=e.output, started_at=e.started_at, completed_at=e.completed_at,
            duration_ms=e.total_duration, index=meta.get("index"), batch=live.get("batch", meta.get("batch")),
            connect_attempts=live.get("connect_attempts")))
    run.hosts.sort(key=lambda h: (h.index is None, h.index if h.index is not None else 0, h.server_id or 0, h.name))
    return run
