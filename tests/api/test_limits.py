"""What a broken or hostile client gets: 404 outside the table (tool actions above all), 405, 400, 413,
429, 503, timeouts; nothing it sends is stored and the server keeps serving."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from cronium_fab.db.engine import Database
from cronium_fab.db.models import UserVariable
from tests.api.conftest import Client, Setup, make_setup


def variable_count(setup: Setup) -> int:
    with setup.db.session() as s:
        return len(s.scalars(select(UserVariable)).all())


UNKNOWN = [
    "/tool-actions/execute", "/tool-actions/execute?x=1", "/tool-actions", "/", "/executions",
    "/executions/{a}", "/executions/{a}/", "/executions/{a}/unknown", "/executions/{a}/variables",
    "/executions/{a}/variables/", "/executions/{a}/variables/a/b", "/executions/{a}/tool-actions/execute",
    "/executions/{a}/../../tool-actions/execute", "/executions/%2E%2E/tool-actions/execute",
    "/health/", "/health/x", "/HEALTH", "/executions/{a}/input/", "/executions//input",
    "/api/executions/{a}/input", "relative/path",
]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_paths_outside_the_table_are_404_even_with_a_valid_token(setup: Setup, method: str) -> None:
    for raw in UNKNOWN:
        path = raw.format(a=setup.exec_a)
        r = setup.client.call(method, path, setup.token_a, {"tool": "x"} if method != "GET" else ...)
        assert r.status == 404, (method, path, r.status, r.body)
        assert r.body == {"error": "Not Found", "message": "no such endpoint"}
    assert setup.api.state(setup.exec_a).calls == 0


def test_tool_actions_are_404_without_a_token_too(setup: Setup) -> None:
    r = setup.client.call("POST", "/tool-actions/execute", body={"toolType": "slack"})
    assert r.status == 404


@pytest.mark.parametrize(("method", "rest", "allow"), [
    ("DELETE", "variables/k", "GET, PUT"), ("POST", "variables/k", "GET, PUT"), ("GET", "output", "POST"),
    ("PUT", "condition", "POST"), ("POST", "input", "GET"), ("PATCH", "context", "GET"),
    ("OPTIONS", "input", "GET"),
])
def test_wrong_method_on_a_known_path_is_405(setup: Setup, method: str, rest: str, allow: str) -> None:
    r = setup.client.call(method, setup.path(setup.exec_a, rest), setup.token_a)
    assert r.status == 405 and r.headers["allow"] == allow and r.body["error"] == "Method Not Allowed"


def test_head_is_405_without_a_body(setup: Setup) -> None:
    r = setup.client.call("HEAD", "/health")
    assert r.status == 405 and r.body is None


def test_unknown_method_is_answered_in_json(setup: Setup) -> None:
    r = setup.client.call("BREW", "/health")
    assert r.status == 501 and r.body["error"] == "Not Implemented"


@pytest.mark.parametrize(("rest", "raw"), [
    ("variables/k", b"{not json"),
    ("variables/k", b""),
    ("variables/k", b'{"val": 1}'),
    ("variables/k", b"[1, 2]"),
    ("variables/k", b'{"value": NaN}'),
    ("variables/k", b'{"value": Infinity}'),
    ("variables/k", b'{"value": "\xff\xfe"}'),
    ("variables/k", b"[" * 100_000),
    ("output", b'{"value": 1}'),
    ("output", b"null"),
    ("condition", b'{"condition": "true"}'),
    ("condition", b'{"condition": 1}'),
    ("condition", b'{"condition": null}'),
    ("condition", b"{}"),
])
def test_bad_bodies_are_400_and_store_nothing(setup: Setup, rest: str, raw: bytes) -> None:
    method = "PUT" if rest.startswith("variables") else "POST"
    r = setup.client.call(method, setup.path(setup.exec_a, rest), setup.token_a, raw=raw)
    assert r.status == 400 and r.body["error"] == "Bad Request", r.body
    assert variable_count(setup) == 0
    state = setup.api.state(setup.exec_a)
    assert not state.output_set and state.condition is None and state.variables_set == {}
    assert setup.client.call("GET", "/health").status == 200  # the connection or a new one still works


def test_bad_percent_encoding_in_a_key_is_400(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_a, "variables/%FF%FE"), setup.token_a)
    assert r.status == 400


def test_key_longer_than_the_column_is_400(setup: Setup) -> None:
    r = setup.client.call("PUT", setup.path(setup.exec_a, "variables/" + "k" * 256), setup.token_a, {"value": 1})
    assert r.status == 400 and variable_count(setup) == 0
    r = setup.client.call("PUT", setup.path(setup.exec_a, "variables/" + "k" * 255), setup.token_a, {"value": 1})
    assert r.status == 200


def test_body_over_one_mebibyte_is_413_and_not_stored(setup: Setup) -> None:
    big = b'{"value": "' + b"x" * (1 << 20) + b'"}'
    r = setup.client.call("PUT", setup.path(setup.exec_a, "variables/big"), setup.token_a, raw=big)
    assert r.status == 413 and r.body["error"] == "Request Entity Too Large"
    assert variable_count(setup) == 0
    assert setup.client.call("GET", "/health").status == 200


def test_body_just_under_the_limit_is_accepted(setup: Setup) -> None:
    value = "x" * ((1 << 20) - 100)
    r = setup.client.call("POST", setup.path(setup.exec_a, "output"), setup.token_a, {"data": value})
    assert r.status == 200 and setup.api.state(setup.exec_a).output == value


def test_chunked_body_is_refused(setup: Setup) -> None:
    with socket.create_connection(("127.0.0.1", setup.api.port), timeout=5) as s:
        s.sendall((f"PUT {setup.path(setup.exec_a, 'variables/k')} HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {setup.token_a}\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "5\r\n{\"va\r\n0\r\n\r\n").encode())
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 411 ") and variable_count(setup) == 0


def test_negative_content_length_is_400(setup: Setup) -> None:
    r = setup.client.call("PUT", setup.path(setup.exec_a, "variables/k"), setup.token_a,
                          headers={"Content-Length": "-1"})
    assert r.status == 400


@pytest.fixture
def limited(db: Database) -> Iterator[Setup]:
    yield from make_setup(db, rate_per_s=5.0, burst=5)


def test_rate_limit_is_per_execution(limited: Setup) -> None:
    path_a = limited.path(limited.exec_a, "input")
    codes = [limited.client.call("GET", path_a, limited.token_a).status for _ in range(8)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:]
    r = limited.client.call("GET", path_a, limited.token_a)
    assert r.status == 429 and r.body["error"] == "Too Many Requests" and int(r.headers["retry-after"]) >= 1
    # another execution has its own bucket; the health check has none
    assert limited.client.call("GET", limited.path(limited.exec_b, "input"), limited.token_b).status == 200
    assert limited.client.call("GET", "/health").status == 200
    time.sleep(0.5)  # 5/s refills two or more requests
    assert limited.client.call("GET", path_a, limited.token_a).status == 200


def test_rejected_tokens_do_not_spend_the_executions_budget(limited: Setup) -> None:
    path_a = limited.path(limited.exec_a, "input")
    for _ in range(20):
        assert limited.client.call("GET", path_a, "forged.token.value").status == 401
    assert limited.client.call("GET", path_a, limited.token_a).status == 200


def test_rate_limit_can_be_disabled(db: Database) -> None:
    for s in make_setup(db, rate_per_s=None):
        codes = {s.client.call("GET", s.path(s.exec_a, "input"), s.token_a).status for _ in range(500)}
        assert codes == {200}


def test_stalled_client_is_dropped_after_the_socket_timeout(db: Database) -> None:
    for s in make_setup(db, socket_timeout_s=0.5):
        with socket.create_connection(("127.0.0.1", s.api.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            t0 = time.monotonic()
            data = sock.recv(4096)
            assert time.monotonic() - t0 < 3
            assert data == b"" or b"408" in data or data.startswith(b"HTTP/1.1 ")
        assert s.client.call("GET", "/health").status == 200


def test_connections_over_the_cap_get_503(db: Database) -> None:
    for s in make_setup(db, max_connections=2):
        held = [socket.create_connection(("127.0.0.1", s.api.port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.2)  # let the server accept both
            with socket.create_connection(("127.0.0.1", s.api.port), timeout=5) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
        finally:
            for h in held:
                h.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            c = Client(s.api.port)
            try:
                if c.call("GET", "/health").status == 200:
                    break
            except OSError:
                pass
            finally:
                c.close()
            time.sleep(0.05)
        else:
            pytest.fail("the server did not free the connection slots")


def test_helpers_wait_out_the_rate_limit_instead_of_failing(limited: Setup) -> None:
    """A script that calls getVariable in a tight loop slows down (Retry-After) but never fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    shims = Path(__file__).resolve().parents[2] / "runner" / "cronium_runner" / "shims"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import cronium\n"
              "values = [cronium.getVariable('k') for _ in range(12)]\n"
              "print('ok', len(values))\n")
    env = dict(os.environ, CRONIUM_HELPER_MODE="api", CRONIUM_RUNTIME_API=f"http://127.0.0.1:{limited.api.port}",
               CRONIUM_EXECUTION_TOKEN=limited.token_a, CRONIUM_EXECUTION_ID=limited.exec_a)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script, str(shims)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 12"
    assert time.monotonic() - t0 >= 1.0, "12 calls at 5/s (burst 5) must have waited"
