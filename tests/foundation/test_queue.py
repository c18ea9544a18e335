"""The job queue's database side on each flavour, no hosts needed: claims against a concurrent
writer (what a claim read is what it writes over: PostgreSQL row locks and SKIP LOCKED; SQLite
takes the write lock before it reads) and `cronium-fab jobs`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from cronium_fab.db.engine import Database
from cronium_fab.db.models import Job
from cronium_fab.jobqueue import QueueSettings, claim, enqueue
from cronium_fab.testing.factories import add_event, add_server


def _raw_writer(db: Database):  # type: ignore[no-untyped-def]
    """A connection of another process's kind (no SQLAlchemy), in an open write transaction."""
    if db.dialect == "sqlite":
        conn = sqlite3.connect(str(db.sqlite_path), timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        return conn
    import psycopg

    url = db.engine.url.set(drivername="postgresql")
    conn = psycopg.connect(url.render_as_string(hide_password=False))   # a transaction opens with the first statement
    return conn


def test_a_cancel_written_while_a_worker_claims_is_never_overwritten(db: Database) -> None:
    ev = add_event(db, servers=[add_server(db)])
    job_id, _ = enqueue(db, ev)
    writer = _raw_writer(db)   # Cronium's UI cancels the job; its transaction is still open
    writer.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s" if db.dialect == "postgresql"
                   else "UPDATE jobs SET status = 'cancelled' WHERE id = ?", (job_id,))
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(claim(db, QueueSettings(worker_id="w1"), 5)))
    worker.start()
    time.sleep(0.5)            # the claim reaches the row (or the lock) meanwhile
    writer.commit()
    writer.close()
    worker.join(30)
    assert got == [[]]         # nothing claimed: the job is cancelled, not taken
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.status, row.orchestrator_id) == ("cancelled", None)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)   # PostgreSQL: the row locks of the test above
def test_a_read_for_update_on_sqlite_takes_the_write_lock(db: Database) -> None:
    """A claim and another writer never interleave between the claim's read and its write."""
    ev = add_event(db, servers=[add_server(db)])
    enqueue(db, ev)
    with db.session() as s:
        s.get(Job, "nope", with_for_update=True)      # a read that asks for the lock, as claims do
        other = sqlite3.connect(str(db.sqlite_path), timeout=0.2)
        try:
            other.execute("BEGIN IMMEDIATE")
            taken = False
        except sqlite3.OperationalError as exc:
            taken = "locked" in str(exc)
        finally:
            other.close()
    assert taken


def test_jobs_lists_by_status_event_and_worker(db: Database, tmp_path: Path) -> None:
    ev1 = add_event(db, name="a", servers=[add_server(db)])
    ev2 = add_event(db, name="b", servers=[add_server(db, "web2")])
    queued, _ = enqueue(db, ev1)
    done, _ = enqueue(db, ev2)
    with db.session() as s:
        row = s.get(Job, queued)
        assert row is not None and row.created_at is not None
        s.execute(update(Job).where(Job.id == done).values(status="completed", orchestrator_id="w1",
                                                           created_at=row.created_at + timedelta(seconds=1)))
    env = dict(os.environ, CRONIUM_DATABASE_URL=db.url, CRONIUM_FAB_DATA_DIR=str(tmp_path), CRONIUM_FAB_WORKER="off")

    def jobs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cronium_fab", "jobs", *args], env=env, capture_output=True,
                              text=True, cwd=tmp_path, timeout=60)

    def ids(*args: str) -> list[str]:
        out = jobs("--json", *args)
        assert out.returncode == 0, out.stderr
        return [j["id"] for j in json.loads(out.stdout)]

    assert ids() == [done, queued]
    assert ids("--status", "queued") == [queued]
    assert ids("--status", "completed,failed", "--worker", "w1") == [done]
    assert ids("--event", str(ev1)) == [queued]
    assert ids("--limit", "1") == [done]
    assert ids("--worker", "w2") == []
    bad = jobs("--status", "done")
    assert bad.returncode == 2 and "queued, claimed, running, completed, failed, cancelled" in bad.stderr


def test_a_lease_check_that_hangs_stops_the_run_when_the_lease_may_have_run_out(db: Database) -> None:
    """A cut network can leave a query hanging for minutes: the run must stop once the lease may
    have run out (another worker may then re-queue the job), whatever the hung call does."""
    from cronium_fab.jobqueue import LeaseKeeper
    from cronium_fab.testing.procs import wait_until

    ev = add_event(db, servers=[add_server(db)])
    enqueue(db, ev)
    qs = QueueSettings(worker_id="w1", lease_s=1.0)
    (c,) = claim(db, qs, 1)
    stopped: list[str] = []
    release = threading.Event()
    keeper = LeaseKeeper(db, qs, c, stopped.append)
    keeper._check = lambda *, renew: release.wait(60) and None   # type: ignore[method-assign]   # the database hangs
    with keeper:
        assert wait_until(lambda: stopped, 20)
        release.set()
    assert len(stopped) == 1 and "did not answer" in stopped[0] and keeper.lost == stopped[0]
