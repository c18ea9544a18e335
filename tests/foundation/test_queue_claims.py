"""Claims against a concurrent writer, on each database flavour: what a claim read is what it
writes over (PostgreSQL: row locks and SKIP LOCKED; SQLite: the claim takes the write lock
before it reads)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from cronium_fab.db.engine import Database
from cronium_fab.db.models import Job
from cronium_fab.jobqueue import QueueSettings, claim, enqueue
from tests.factories import add_event, add_server


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
