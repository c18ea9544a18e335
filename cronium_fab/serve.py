"""``cronium-fab serve``: a long-running worker of Cronium's job queue (see ``jobqueue``).

It claims due SSH jobs, runs each exactly as ``run-event --job`` does (one code path: ``run_event``
with the claim's lease), at most ``jobs`` at once, all their hosts sharing one bound on connections
(``Settings.parallel``). New jobs start at once when ``enqueue`` notifies; jobs Cronium's app writes
are found by a short poll. On SIGTERM/SIGINT it claims nothing more, lets the running jobs finish
for ``drain_timeout`` seconds, then cancels them; claims not started are given back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import IO

from .db.engine import Database
from .db.models import Job, utcnow
from .errors import CroniumFabError
from .execute import Cancel, RunRequest, run_event
from .jobqueue import (
    Claim,
    LeaseKeeper,
    QueueSettings,
    claim,
    reap_expired,
    release,
    sqlite_worker_lock,
    wakeups,
)
from .records import holds_lease, recover_lost_runs
from .remote.pool import ConnectionPool, hosts_at_once_for_fds, max_idle_for_fds
from .results import RunResult
from .settings import Settings

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, qs: QueueSettings, *, out: IO[str] | None = None) -> None:
        # the lease says how long our runners wait for a silent worker (the reaper's bound)
        self.settings, self.qs, self.out = settings, replace(qs, silence_s=settings.heartbeat_timeout), out
        self.db = Database(settings.database_url)
        self.stopping = threading.Event()
        self.parallel = hosts_at_once_for_fds(settings.parallel)   # connections at once, over all jobs
        self.slots = threading.BoundedSemaphore(self.parallel)
        # every job of this process shares the hosts' kept connections (remote/pool.py)
        self.connections = (ConnectionPool(idle_s=settings.keep_connections, max_idle=max_idle_for_fds())
                            if settings.keep_connections > 0 else None)
        self.active: dict[str, tuple[Future[None], Cancel]] = {}
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        if self.out is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{stamp} cronium-fab serve[{self.qs.worker_id}]: {message}", file=self.out, flush=True)

    def serve(self, drain_timeout: float = 60.0) -> int:
        self.db.check()
        lock = sqlite_worker_lock(self.db)
        try:
            lost = recover_lost_runs(self.db)   # hand runs of this host whose controller was killed
            if lost:
                self.say(f"closed {len(lost)} run(s) whose controller is gone: {', '.join(lost)}")
            orphans = reap_expired(self.db, self.qs, own_only=True)   # our jobs from before a restart
            if orphans:
                self.say(f"took back {len(orphans)} job(s) left by this worker id before: {', '.join(orphans)}")
            keep = (f", idle connections kept {self.settings.keep_connections:g} s" if self.connections is not None
                    else ", no connection kept between runs")
            self.say(f"serving ({self.qs.jobs} job(s) at once, {self.parallel} connections{keep})")
            with ThreadPoolExecutor(max_workers=self.qs.jobs, thread_name_prefix="cronium-job") as pool, \
                    wakeups(self.db) as wait:
                next_reap = 0.0
                while not self.stopping.is_set():
                    if time.monotonic() >= next_reap:
                        next_reap = time.monotonic() + max(1.0, self.qs.lease_s / 3)
                        for job_id in reap_expired(self.db, self.qs):
                            self.say(f"job {job_id}: its worker's lease ran out; re-queued or failed")
                    self._forget_finished()
                    if self.connections is not None:
                        self.connections.sweep()
                    free = self.qs.jobs - len(self.active)
                    claims = claim(self.db, self.qs, free) if free > 0 else []
                    for c in claims:
                        self._start(pool, c)
                    if not claims:
                        wait(self.qs.poll_s)
                self._drain(drain_timeout)
        finally:
            if self.connections is not None:
                closed = self.connections.close()
                if closed:
                    self.say(f"closed {closed} kept connection(s)")
            if lock is not None:
                os.close(lock)
            self.db.dispose()
        self.say("stopped")
        return 0

    def _start(self, pool: ThreadPoolExecutor, c: Claim) -> None:
        cancel = Cancel()
        with self._lock:
            self.active[c.job_id] = (pool.submit(self._run, c, cancel), cancel)
        self.say(f"job {c.job_id}: claimed (event {c.event_id}, attempt {c.attempt} of {c.max_attempts})")

    def _forget_finished(self) -> None:
        with self._lock:
            for job_id in [j for j, (f, _c) in self.active.items() if f.done()]:
                del self.active[job_id]

    def _run(self, c: Claim, cancel: Cancel) -> None:
        if self.stopping.is_set():
            release(self.db, c, f"worker {self.qs.worker_id} stopped before starting it")
            return
        result: RunResult | None = None
        error: str | None = None
        with LeaseKeeper(self.db, self.qs, c, on_stop=cancel.stop) as keeper:
            try:
                result = run_event(self.settings, RunRequest(event_id=c.event_id, job_id=c.job_id, hosts=c.hosts,
                                                             claim=c.for_run(self.qs)),
                                   out=None, cancel=cancel, connection_slots=self.slots,
                                   connections=self.connections)
            except CroniumFabError as exc:   # the event cannot run (deleted, no servers, ...): the job fails
                error = str(exc)
            except Exception as exc:         # a bug: the job must not stay claimed
                log.exception("job %s", c.job_id)
                error = f"internal error: {type(exc).__name__}: {exc}"
        if keeper.lost and result is None and error is None:
            self.say(f"job {c.job_id}: stopped: {keeper.lost}")
            return
        if error is not None:
            self._fail(c, error)
            self.say(f"job {c.job_id}: failed: {error}")
            return
        assert result is not None
        after = self._job(c.job_id)
        self.say(f"job {c.job_id}: attempt {c.attempt}: {result.status}" + (f" ({keeper.lost})" if keeper.lost else "")
                 + (f"; {after.status}" if after is not None else "")
                 + (f" again, due {after.scheduled_for:%H:%M:%S}" if after is not None and after.status == "queued" else ""))

    def _job(self, job_id: str) -> Job | None:
        with self.db.session() as s:
            return s.get(Job, job_id)

    def _fail(self, c: Claim, error: str) -> None:
        with self.db.session() as s:
            job = s.get(Job, c.job_id, with_for_update=True)
            if job is not None and holds_lease(job, c.token) and job.status in ("claimed", "running"):
                job.status, job.completed_at, job.last_error = "failed", utcnow(), error[:2000]
                meta = dict(job.metadata_ or {})
                meta.pop("lease", None)
                job.metadata_ = meta

    def _drain(self, drain_timeout: float) -> None:
        with self._lock:
            running = list(self.active.items())
        if not running:
            return
        self.say(f"draining: {len(running)} job(s) still running (up to {drain_timeout:g} s, then cancelled)")
        deadline = time.monotonic() + drain_timeout
        for job_id, (future, cancel) in running:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                cancel.stop(f"worker {self.qs.worker_id} stopped (SIGTERM) and its drain timeout passed")
                self.say(f"job {job_id}: cancelled after the drain timeout")
            except Exception:   # already logged by _run
                pass
        for _job_id, (future, _cancel) in running:
            with contextlib.suppress(Exception):
                future.result(timeout=120)


def serve(settings: Settings, qs: QueueSettings, *, drain_timeout: float = 60.0, out: IO[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT/SIGHUP (then drain)."""
    from .signals import catch_stop_signals, restore_signals

    worker = Worker(settings, qs, out=out)
    previous = catch_stop_signals(lambda signum, frame: worker.stopping.set())
    try:
        return worker.serve(drain_timeout)
    finally:
        restore_signals(previous)
