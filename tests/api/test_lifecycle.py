"""Start and stop: ephemeral ports, nothing left behind, nothing secret in the logs."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from cronium_fab.db.engine import Database
from cronium_fab.helper_api import HelperAPI
from tests.api.conftest import Client, Setup, make_setup


def api_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cronium-helper-api")]


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_listens_on_loopback_with_an_ephemeral_port(db: Database) -> None:
    with HelperAPI(db) as a, HelperAPI(db) as b:
        assert a.port != b.port and a.port > 0
        assert a.url == f"http://127.0.0.1:{a.port}"
        assert a._server is not None and a._server.server_address[0] == "127.0.0.1"


def test_stop_leaves_no_thread_and_closes_the_port(db: Database) -> None:
    before = api_threads()
    for s in make_setup(db):
        port = s.api.port
        idle = Client(port)  # a keep-alive client that never sends its next request
        assert idle.call("GET", "/health").status == 200
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"GET /health HTTP/1.1\r\n")  # half a request
        time.sleep(0.1)
        assert len(api_threads()) >= 3
        t0 = time.monotonic()
        s.api.stop()
        assert time.monotonic() - t0 < 3
        assert api_threads() == before
        assert port_is_closed(port)
        stalled.close()
        idle.close()
        with pytest.raises(RuntimeError):
            _ = s.api.port


def test_stop_is_idempotent_and_no_threads_leak_over_many_runs(db: Database) -> None:
    before = len(threading.enumerate())
    for _ in range(30):
        with HelperAPI(db) as api:
            c = Client(api.port)
            assert c.call("GET", "/health").status == 200
            c.close()
        api.stop()
    assert len(threading.enumerate()) == before and api_threads() == []


def test_state_survives_unregister_for_the_final_records(setup: Setup) -> None:
    setup.client.call("PUT", setup.path(setup.exec_a, "variables/k"), setup.token_a, {"value": 1})
    setup.client.call("POST", setup.path(setup.exec_a, "condition"), setup.token_a, {"condition": False})
    final = setup.api.unregister(setup.exec_a)
    assert final.variables_set == {"k": 1} and final.condition is False and not final.output_set
    assert setup.api.state(setup.exec_a) == final
    with pytest.raises(KeyError):
        setup.api.state("exec_never_registered")


def test_state_is_a_copy(setup: Setup) -> None:
    setup.client.call("PUT", setup.path(setup.exec_a, "variables/k"), setup.token_a, {"value": [1]})
    setup.api.state(setup.exec_a).variables_set["k"].append(2)
    assert setup.api.state(setup.exec_a).variables_set["k"] == [1]


def test_tokens_and_values_never_reach_the_log(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_value = "s3cr3t-variable-value"
    setup.client.call("PUT", setup.path(setup.exec_a, "variables/k"), setup.token_a, {"value": secret_value})
    setup.client.call("GET", setup.path(setup.exec_a, "variables/k"), setup.token_a)
    setup.client.call("POST", setup.path(setup.exec_a, "output"), setup.token_a, {"data": secret_value})
    setup.client.call("GET", setup.path(setup.exec_a, "input"), setup.token_a + "x")
    text = caplog.text
    assert setup.exec_a in text  # something was logged
    assert secret_value not in text and setup.token_a not in text
    assert setup.token_a.split(".")[2] not in text


def test_a_database_failure_is_500_without_details(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    from cronium_fab.db.models import Execution

    with setup.db.session() as s:  # the run's row is gone: set_output cannot store
        row = s.get(Execution, setup.exec_b)
        s.delete(row)
    r = setup.client.call("POST", setup.path(setup.exec_b, "output"), setup.token_b, {"data": "private-output"})
    assert r.status == 500 and r.body == {"error": "Internal Server Error",
                                          "message": "the request could not be completed"}
    assert "private-output" not in caplog.text
    assert setup.api.state(setup.exec_b).output_set is False
    assert setup.client.call("GET", "/health").status == 200


def test_unregister_waits_for_a_write_in_flight(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from cronium_fab import records

    original = records.set_variable
    entered = threading.Event()

    def slow_set_variable(*args: object, **kwargs: object) -> None:
        entered.set()
        time.sleep(0.3)
        original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(records, "set_variable", slow_set_variable)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(setup.client.call(
        "PUT", setup.path(setup.exec_a, "variables/late"), setup.token_a, {"value": "kept"}).status))
    t.start()
    assert entered.wait(5)
    final = setup.api.unregister(setup.exec_a)
    t.join(5)
    assert codes == [200] and final.variables_set == {"late": "kept"}


def test_write_queued_behind_unregister_is_refused(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from cronium_fab.helper_api import HelperAPI as API

    original = API._authorize
    gate = threading.Event()

    def authorize_then_wait(self: API, authorization: str | None, execution_id: str):  # type: ignore[no-untyped-def]
        reg = original(self, authorization, execution_id)
        gate.wait(5)
        return reg

    monkeypatch.setattr(API, "_authorize", authorize_then_wait)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(setup.client.call(
        "PUT", setup.path(setup.exec_a, "variables/late"), setup.token_a, {"value": "dropped"}).status))
    t.start()
    time.sleep(0.2)
    final = setup.api.unregister(setup.exec_a)
    gate.set()
    t.join(5)
    assert codes == [401] and final.variables_set == {}
    from sqlalchemy import select

    from cronium_fab.db.models import UserVariable

    with setup.db.session() as s:
        assert s.scalars(select(UserVariable).where(UserVariable.key == "late")).first() is None
