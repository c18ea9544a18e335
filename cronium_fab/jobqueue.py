"""Cronium's job queue (the ``jobs`` table) as the coordination engine of several workers.

A worker claims due jobs the way Cronium's job service defines them (``queued``, no
``orchestrator_id``, ``scheduled_for <= now``, highest ``priority`` first, then oldest), only
those that run over SSH, with ``SELECT ... FOR UPDATE SKIP LOCKED`` in a short transaction on
PostgreSQL (on SQLite the write lock serializes claims; one worker per file). Each claim carries a
lease in ``jobs.metadata.lease`` (``{worker, token, until}``; we never alter Cronium's tables),
renewed by a heartbeat that also watches the row: a row set to ``cancelled`` (Cronium's UI) or a
lease taken over by someone else stops the run. Rows are written only while the lease is ours.

A lease that runs out (the worker was killed or frozen) is reaped by any worker: the job is
re-queued as a new attempt, never before the lost attempt's scripts are certainly dead (the runner
on each host stops its script when the worker has been silent for the heartbeat timeout the lease
records, or at the event's timeout), or failed with a clear ``last_error`` when
its attempts are used up. A failed attempt is retried the same way when the event has ``retries``
left, on the hosts that did not succeed, after a backoff.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from .db.engine import Database
from .db.models import Event, Execution, Job, Log, utcnow
from .db.queries import SCRIPT_TYPES, event_timeout_seconds
from .errors import ConfigError
from .records import QueueClaim, holds_lease, job_lease, merge_metadata, new_job_id, note_attempt
from .settings import KILL_GRACE

log = logging.getLogger(__name__)

CHANNEL = "cronium_fab_jobs"     # NOTIFY channel of `enqueue` (Cronium's app does not notify: we also poll)


def _requeue_margin() -> float:
    """Seconds after a lost attempt's scripts must have ended before it runs again (clock skew, slow hosts)."""
    raw = os.environ.get("CRONIUM_FAB_REQUEUE_MARGIN")
    try:
        return float(raw) if raw else 10.0
    except ValueError:
        raise ConfigError(f"CRONIUM_FAB_REQUEUE_MARGIN={raw!r} is not a number of seconds") from None


def default_worker_id() -> str:
    """A stable id (the same after a restart): ``CRONIUM_FAB_WORKER_ID``, else user@host."""
    import getpass

    return os.environ.get("CRONIUM_FAB_WORKER_ID") or f"cronium-fab:{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class QueueSettings:
    worker_id: str = field(default_factory=default_worker_id)
    lease_s: float = 30.0          # a claim lives this long without a heartbeat
    poll_s: float = 1.0            # look for due jobs this often (at once on NOTIFY)
    jobs: int = 1                  # jobs at once
    retry_backoff_s: float = 5.0   # before retry n: backoff * 2**(n-1), at most 300 s
    silence_s: float | None = None  # our runners stop their scripts after this long without our heartbeat

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, min(self.lease_s / 3, 5.0))


@dataclass(frozen=True)
class Claim:
    job_id: str
    event_id: int
    token: str
    attempt: int            # 1 for the first
    max_attempts: int       # 1 + the event's retries
    input: Any
    hosts: list[str] | None  # a retry: only the hosts that did not succeed

    def for_run(self, qs: QueueSettings) -> QueueClaim:
        return QueueClaim(qs.worker_id, self.token, self.attempt, self.max_attempts, qs.retry_backoff_s)


def _ssh_jobs(query: Any) -> Any:
    """Only jobs that run over SSH: script jobs of a REMOTE event, or whose payload targets a server."""
    target = Job.payload["target"]["serverId"]
    return query.join(Event, Event.id == Job.event_id).where(
        Job.type == "SCRIPT", or_(Event.run_location == "REMOTE", target.as_string().is_not(None)))


def claim(db: Database, qs: QueueSettings, limit: int) -> list[Claim]:
    """Claim up to ``limit`` due jobs for this worker, in one short transaction."""
    if limit < 1:
        return []
    now = utcnow()
    query = _ssh_jobs(select(Job)).where(
        Job.status == "queued", Job.orchestrator_id.is_(None), Job.scheduled_for <= now
    ).order_by(Job.priority.desc(), Job.created_at, Job.id).limit(limit)
    # PostgreSQL: row locks, skipping rows another worker holds; SQLite: BEGIN IMMEDIATE (db.engine)
    query = query.with_for_update(skip_locked=db.dialect == "postgresql", of=Job)
    claims: list[Claim] = []
    with db.session() as s:
        for job in s.scalars(query):
            event = s.get(Event, job.event_id)
            if event is None or (event.type or "").upper() not in SCRIPT_TYPES:
                continue
            token = secrets.token_hex(8)
            job.status = "claimed"
            job.orchestrator_id = qs.worker_id
            job.updated_at = now
            lease: dict[str, Any] = {"worker": qs.worker_id, "token": token,
                                     "until": (now + timedelta(seconds=qs.lease_s)).isoformat()}
            if qs.silence_s is not None:
                lease["silence_s"] = qs.silence_s
            merge_metadata(job, lease=lease)
            payload = job.payload if isinstance(job.payload, dict) else {}
            retry_hosts = payload.get("retryHosts")
            claims.append(Claim(job.id, job.event_id, token, (job.attempts or 0) + 1, 1 + (event.retries or 0),
                                payload.get("input"), list(retry_hosts) if retry_hosts else None))
    return claims


class LeaseKeeper:
    """Renews one claim's lease every ``heartbeat_s`` and watches its row: Cronium's UI cancelling
    the job, or the lease gone to someone else, sets ``cancel`` (with the reason)."""

    def __init__(self, db: Database, qs: QueueSettings, c: Claim, on_stop: Callable[[str], None]) -> None:
        self.db, self.qs, self.claim, self.on_stop = db, qs, c, on_stop
        self.lost: str | None = None
        self._done = threading.Event()
        self._once = threading.Lock()
        self._held_until = time.monotonic() + qs.lease_s   # the lease surely holds until then
        self._thread = threading.Thread(target=self._loop, name=f"lease-{c.job_id}", daemon=True)
        # a database call that hangs (a cut network: TCP retries for minutes) must not keep the run
        # going past the lease, when another worker may re-queue the job: a clock of its own
        self._deadline = threading.Thread(target=self._watch_deadline, name=f"lease-deadline-{c.job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        self._deadline.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)
        self._deadline.join(10)

    def _stop(self, reason: str) -> None:
        with self._once:
            if self.lost is not None or self._done.is_set():
                return
            self.lost = reason
        self._done.set()
        self.on_stop(reason)

    def _watch_deadline(self) -> None:
        while not self._done.wait(0.5):
            if time.monotonic() > self._held_until:
                self._stop(f"worker {self.qs.worker_id} lost its lease on the job (the database did not answer "
                           f"for {self.qs.lease_s:g} s)")
                return

    def _loop(self) -> None:
        interval = min(self.qs.heartbeat_s, 0.5)   # cancel within a second; the lease renews less often
        next_renew = 0.0
        while not self._done.wait(interval):
            try:
                t = time.monotonic()
                renew = t >= next_renew
                reason = self._check(renew=renew)
                if renew:
                    self._held_until = t + self.qs.lease_s
            except Exception as exc:   # the database is away for a moment: the lease may still hold
                log.warning("job %s: heartbeat failed: %s", self.claim.job_id, exc)
                if time.monotonic() < self._held_until:
                    continue
                # it may have run out: another worker may re-queue the job, so our run stops
                reason = f"worker {self.qs.worker_id} lost its lease on the job (the database was away: {exc})"
            if reason:
                self._stop(reason)
                return
            next_renew = time.monotonic() + self.qs.heartbeat_s if time.monotonic() >= next_renew else next_renew

    def _check(self, *, renew: bool) -> str | None:
        with self.db.session() as s:
            job = s.get(Job, self.claim.job_id, with_for_update=renew)
            if job is None:
                return "the job's row is gone"
            if job.status == "cancelled":
                return "cancelled in Cronium (jobs.status = cancelled)"
            history = (job.metadata_ or {}).get("attempts") or [] if isinstance(job.metadata_, dict) else []
            last = history[-1] if history and isinstance(history[-1], dict) else {}
            if not job_lease(job) and last.get("attempt") == self.claim.attempt and last.get("status") != "LOST":
                self._done.set()   # our own run recorded its end and released the lease
                return None
            if not holds_lease(job, self.claim.token):
                return f"worker {self.qs.worker_id} lost its lease on the job (another worker took it over)"
            until = datetime.fromisoformat(job_lease(job)["until"])
            if until < utcnow():
                return f"worker {self.qs.worker_id} lost its lease on the job (it ran out)"
            if renew:
                merge_metadata(job, lease=dict(job_lease(job), until=(utcnow() + timedelta(seconds=self.qs.lease_s)).isoformat()))
        return None


def release(db: Database, c: Claim, why: str) -> None:
    """Give back a claim that never started (a draining worker): queued again, unclaimed."""
    with db.session() as s:
        job = s.get(Job, c.job_id, with_for_update=True)
        if job is not None and holds_lease(job, c.token) and job.status == "claimed":
            job.status, job.orchestrator_id = "queued", None
            merge_metadata(job, lease=None)
            job.last_error = why


def reap_expired(db: Database, qs: QueueSettings, *, own_only: bool = False) -> list[str]:
    """Jobs whose lease ran out (their worker was killed or frozen): re-queued as a new attempt, no
    earlier than the lost attempt's scripts must have ended, or failed when attempts are used up.
    ``own_only``: only this worker id's (a restarted worker's orphans, at once). Returns job ids."""
    now = utcnow()
    reaped: list[str] = []
    query = select(Job).where(Job.status.in_(("claimed", "running"))).with_for_update(
        skip_locked=db.dialect == "postgresql")
    with db.session() as s:
        for job in s.scalars(query):
            lease = job_lease(job)
            if not lease:
                continue
            try:
                expired = datetime.fromisoformat(lease["until"]) < now
            except (KeyError, TypeError, ValueError):
                expired = True
            if own_only:
                expired = lease.get("worker") == qs.worker_id
            if not expired:
                continue
            event = s.get(Event, job.event_id)
            retries = (event.retries or 0) if event is not None else 0
            who = lease.get("worker", "?")
            why = f"worker {who} lost (its lease on the job ran out: killed, frozen or cut off)"
            _close_attempt(s, job, why, now)
            history = list((job.metadata_ or {}).get("attempts") or [])
            history.append({"attempt": job.attempts or 1, "status": "LOST", "worker": who, "finished_at": now.isoformat()})
            merge_metadata(job, lease=None, attempts=history)
            # a claim that never started goes back at once; a lost attempt is run again (at least
            # once: losing a worker is not the script's failure) while attempts remain
            if job.status == "claimed" or (job.attempts or 0) < max(2, 1 + retries):
                safe = _lost_scripts_dead(job, event, lease, now)
                job.status, job.orchestrator_id = "queued", None
                job.scheduled_for = max(now, safe) if job.started_at else now
                job.last_error = why + "; re-queued"
                _note(s, job, why + f"; re-queued for {job.scheduled_for.isoformat(timespec='seconds')}")
            else:
                job.status, job.completed_at = "failed", now
                job.last_error = why + f"; no attempts left ({job.attempts} of {max(2, 1 + retries)})"
                _fail_log(s, job, job.last_error, now)
            job.updated_at = now
            reaped.append(job.id)
    return reaped


def _lost_scripts_dead(job: Job, event: Event | None, lease: dict[str, Any], now: datetime) -> datetime:
    """When every script of a lost attempt is surely dead: its runners stop a script when the
    worker has been silent for the ``silence_s`` its lease records (the worker was silent from
    the lease's end at the latest: a live worker that cannot renew stops its own run), and at the
    event's timeout in any case. Each bound adds the kill grace and the re-queue margin."""
    margin = KILL_GRACE + _requeue_margin()
    timeout = event_timeout_seconds(event.timeout_value, event.timeout_unit) if event else 30.0
    safe = (job.started_at or now) + timedelta(seconds=timeout + margin)
    silence = lease.get("silence_s")
    if isinstance(silence, int | float) and not isinstance(silence, bool):
        try:
            until = datetime.fromisoformat(lease["until"])
        except (KeyError, TypeError, ValueError):
            return safe
        safe = min(safe, until + timedelta(seconds=float(silence) + margin))
    return safe


def _note(s: Session, job: Job, line: str) -> None:
    log_id = (job.payload or {}).get("executionLogId") if isinstance(job.payload, dict) else None
    note_attempt(job, s.get(Log, int(log_id)) if log_id not in (None, "") else None, line)


def _fail_log(s: Session, job: Job, why: str, now: datetime) -> None:
    log_id = (job.payload or {}).get("executionLogId") if isinstance(job.payload, dict) else None
    row = s.get(Log, int(log_id)) if log_id not in (None, "") else None
    if row is not None and row.status in ("PENDING", "RUNNING"):
        row.status, row.error, row.end_time, row.successful = "FAILURE", why, now, False


def _close_attempt(s: Session, job: Job, why: str, now: datetime) -> None:
    """The rows a lost attempt left open end ``failed`` with the reason."""
    for row in s.scalars(select(Execution).where(Execution.job_id == job.id,
                                                 Execution.status.in_(("queued", "running")))):
        row.status, row.error, row.completed_at = "failed", why, now


def enqueue(db: Database, event_id: int, *, input_data: Any = None, at: datetime | None = None,
            priority: int = 1, triggered_by: str = "manual") -> tuple[str, int]:
    """Write a job (and its ``logs`` row, ``PENDING``) as Cronium's app does; wake the workers."""
    from .db.queries import resolve_event
    from .records import hand_run_payload

    with db.session() as s:
        event = resolve_event(s, event_id, require_servers=True)
        location = (s.get(Event, event_id).run_location or "").upper()   # type: ignore[union-attr]
        if location != "REMOTE":
            raise ConfigError(f"event {event_id} ({event.name!r}) runs {location or 'LOCAL'} (in Cronium's containers), "
                              "not over SSH: set its run location to REMOTE (Cronium's editor) to queue it here")
        now = utcnow()
        log_row = Log(event_id=event.id, status="PENDING", start_time=now, event_name=event.name,
                      event_type=event.type, user_id=event.user_id)
        s.add(log_row)
        s.flush()
        payload = hand_run_payload(event, [x.id for x in event.servers], input_data, None)
        payload["executionLogId"] = log_row.id
        job = Job(id=new_job_id(), event_id=event.id, user_id=event.user_id, type="SCRIPT", status="queued",
                  priority=priority, payload=payload, scheduled_for=at or now,
                  metadata_={"eventName": event.name, "triggeredBy": triggered_by, "logId": log_row.id},
                  attempts=0, created_at=now, updated_at=now)
        s.add(job)
        s.flush()
        log_row.job_id = job.id
        job_id, log_id = job.id, log_row.id
    notify(db)
    return job_id, log_id


def notify(db: Database) -> None:
    if db.dialect == "postgresql":
        with db.autocommit.connect() as conn:
            conn.execute(text(f"NOTIFY {CHANNEL}"))


@contextmanager
def wakeups(db: Database) -> Iterator[Callable[[float], bool]]:
    """``wait(seconds)``: True as soon as an ``enqueue`` notifies (PostgreSQL ``LISTEN``), else
    after ``seconds`` (False). One idle connection; no query while idle."""
    if db.dialect != "postgresql":
        def nap(seconds: float) -> bool:
            time.sleep(seconds)
            return False

        yield nap
        return
    import psycopg

    dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute(f"LISTEN {CHANNEL}")

        def wait(seconds: float) -> bool:
            got = False
            for _ in conn.notifies(timeout=seconds, stop_after=1):
                got = True
            return got

        yield wait
    finally:
        conn.close()


def jobs_table(db: Database, limit: int = 50, *, statuses: list[str] | None = None, event_id: int | None = None,
               worker: str | None = None) -> list[dict[str, Any]]:
    """The latest jobs, for `cronium-fab jobs` (only those in ``statuses``, of ``event_id``, claimed
    by ``worker``, when given)."""
    query = select(Job)
    if statuses:
        query = query.where(Job.status.in_(statuses))
    if event_id is not None:
        query = query.where(Job.event_id == event_id)
    if worker is not None:
        query = query.where(Job.orchestrator_id == worker)
    with db.session() as s:
        rows = s.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)).all()
        return [{"id": j.id, "event_id": j.event_id, "status": j.status, "priority": j.priority,
                 "worker": j.orchestrator_id, "attempts": j.attempts,
                 "scheduled_for": j.scheduled_for.isoformat(timespec="seconds") if j.scheduled_for else None,
                 "last_error": j.last_error} for j in rows]


def sqlite_worker_lock(db: Database) -> int | None:
    """On SQLite, one worker per database file: an exclusive lock beside it (fd to keep), else ConfigError."""
    import fcntl

    path = db.sqlite_path
    if path is None:
        return None
    fd = os.open(f"{path}.serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another `cronium-fab serve` already works on {path}: the embedded SQLite database takes "
                          "one worker; for several, share a PostgreSQL database (CRONIUM_DATABASE_URL)") from None
    return fd
