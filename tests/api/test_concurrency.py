"""Many hosts at once: every request succeeds, each execution's last write wins, the in-memory state the
run records agrees with the database."""

from __future__ import annotations

import threading
from typing import Any

from cronium_fab.db.engine import Database
from cronium_fab.helper_api import HelperAPI
from cronium_fab.testing.factories import add_event, add_user
from tests.api.conftest import Client, add_job_with_executions, context

THREADS = 8
REQUESTS = 50


def test_eight_hosts_times_fifty_requests_all_succeed_and_last_write_wins(db: Database) -> None:
    user = add_user(db, "u1")
    event_id = add_event(db, user_id=user)
    execs = [f"exec_job_c_{i}_1" for i in range(THREADS)]
    add_job_with_executions(db, user, event_id, "job_c", *execs)
    with HelperAPI(db) as api:
        tokens = [api.register_execution(context(e, "job_c", event_id, user, f"web{i}")) for i, e in enumerate(execs)]
        failures: list[Any] = []
        start = threading.Barrier(THREADS)

        def host(i: int) -> None:
            client = Client(api.port, timeout=60)
            start.wait()
            try:
                for n in range(REQUESTS):
                    base = f"/executions/{execs[i]}"
                    calls: list[tuple[str, str, Any]] = [
                        ("PUT", f"{base}/variables/own{i}", {"value": {"n": n}}),
                        ("PUT", f"{base}/variables/shared", {"value": [i, n]}),
                        ("GET", f"{base}/variables/shared", ...),
                        ("POST", f"{base}/output", {"data": n}),
                        ("GET", f"{base}/input", ...),
                    ]
                    method, path, body = calls[n % len(calls)]
                    r = client.call(method, path, tokens[i], body)
                    if r.status != 200:
                        failures.append((i, n, method, r.status, r.body))
                # the final write of each thread, after its loop, so the last one is known per thread
                r = client.call("PUT", f"/executions/{execs[i]}/variables/own{i}", tokens[i], {"value": {"n": "last"}})
                if r.status != 200:
                    failures.append((i, "last", r.status, r.body))
            except Exception as exc:  # reported below, with the thread
                failures.append((i, repr(exc)))
            finally:
                client.close()

        threads = [threading.Thread(target=host, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:5]

        for i, e in enumerate(execs):
            state = api.state(e)
            assert state.variables_set[f"own{i}"] == {"n": "last"}
            assert state.output_set and state.output == REQUESTS - 2 and state.calls == REQUESTS + 1
        reader = Client(api.port)
        try:
            for i, e in enumerate(execs):
                r = reader.call("GET", f"/executions/{e}/variables/own{i}", tokens[i])
                assert r.body["data"]["value"] == {"n": "last"}
            # the shared key holds one of the values written to it; then serial writes: the last one wins
            shared = reader.call("GET", f"/executions/{execs[0]}/variables/shared", tokens[0]).body["data"]["value"]
            assert shared[0] in range(THREADS)
            for i in (3, 5, 1):
                reader.call("PUT", f"/executions/{execs[i]}/variables/shared", tokens[i], {"value": f"from {i}"})
            assert reader.call("GET", f"/executions/{execs[7]}/variables/shared",
                               tokens[7]).body["data"]["value"] == "from 1"
        finally:
            reader.close()


def test_concurrent_first_inserts_of_one_key_do_not_fail(db: Database) -> None:
    """Two hosts creating the same new variable at the same moment: both succeed (upsert), one value stays."""
    user = add_user(db, "u1")
    event_id = add_event(db, user_id=user)
    execs = [f"exec_job_i_{i}_1" for i in range(THREADS)]
    add_job_with_executions(db, user, event_id, "job_i", *execs)
    with HelperAPI(db, rate_per_s=None) as api:
        tokens = [api.register_execution(context(e, "job_i", event_id, user)) for e in execs]
        for round_ in range(5):
            barrier = threading.Barrier(THREADS)
            codes: list[int] = []

            def put(i: int, key: str = f"fresh{round_}", barrier: threading.Barrier = barrier,
                    codes: list[int] = codes) -> None:
                c = Client(api.port, timeout=60)
                try:
                    barrier.wait()
                    codes.append(c.call("PUT", f"/executions/{execs[i]}/variables/{key}", tokens[i],
                                        {"value": i}).status)
                finally:
                    c.close()

            ts = [threading.Thread(target=put, args=(i,)) for i in range(THREADS)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert codes == [200] * THREADS
            c = Client(api.port)
            try:
                value = c.call("GET", f"/executions/{execs[0]}/variables/fresh{round_}", tokens[0]).body["data"]["value"]
            finally:
                c.close()
            assert value in range(THREADS)
