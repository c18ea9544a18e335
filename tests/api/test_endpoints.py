"""Every endpoint of docs/CRONIUM.md §4 with a valid token: bodies, responses, what reaches the database."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import select

from cronium_fab.db.models import Execution, UserVariable
from tests.api.conftest import Setup


def stored(setup: Setup, key: str, user_id: str | None = None) -> str | None:
    with setup.db.session() as s:
        return s.scalars(select(UserVariable.value).where(UserVariable.user_id == (user_id or setup.user_id),
                                                          UserVariable.key == key)).first()


def execution_metadata(setup: Setup, execution_id: str) -> dict[str, Any]:
    with setup.db.session() as s:
        row = s.get(Execution, execution_id)
        assert row is not None
        return dict(row.execution_metadata or {})


def test_health_needs_no_token(setup: Setup) -> None:
    r = setup.client.call("GET", "/health")
    assert r.status == 200 and r.body["success"] is True


def test_input_is_the_registered_input(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_a, "input"), setup.token_a)
    assert r.status == 200 and r.body == {"success": True, "data": {"from": "a", "ü": [1]}}
    assert r.headers["content-type"].startswith("application/json")


def test_absent_input_is_null(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_b, "input"), setup.token_b)
    assert r.status == 200 and r.body == {"success": True, "data": None}


def test_context_names_the_execution(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_a, "context"), setup.token_a)
    assert r.status == 200 and r.body["success"] is True
    ctx = r.body["data"]
    assert ctx["executionId"] == setup.exec_a and ctx["jobId"] == setup.job_id
    assert ctx["eventId"] == setup.event_id and ctx["eventName"] == "ev"
    assert ctx["serverId"] == 7 and ctx["serverName"] == "web0" and ctx["userId"] == setup.user_id
    assert ctx["trigger"] == "manual" and ctx["helperMode"] == "api"
    assert ctx["startTime"].endswith("Z")
    again = setup.client.call("GET", setup.path(setup.exec_a, "context"), setup.token_a).body["data"]
    assert again["startTime"] == ctx["startTime"]


def test_output_is_stored_on_the_execution_and_kept_for_the_run(setup: Setup) -> None:
    r = setup.client.call("POST", setup.path(setup.exec_a, "output"), setup.token_a, {"data": {"rows": [1, 2]}})
    assert r.status == 200 and r.body == {"success": True}
    meta = execution_metadata(setup, setup.exec_a)
    assert meta["output"] == {"rows": [1, 2]} and meta["output_set"] is True
    state = setup.api.state(setup.exec_a)
    assert state.output == {"rows": [1, 2]} and state.output_set is True
    assert setup.api.state(setup.exec_b).output_set is False


def test_null_output_counts_as_set(setup: Setup) -> None:
    assert setup.client.call("POST", setup.path(setup.exec_a, "output"), setup.token_a, {"data": None}).status == 200
    assert setup.api.state(setup.exec_a).output_set is True
    assert execution_metadata(setup, setup.exec_a)["output_set"] is True


@pytest.mark.parametrize("value", [True, False])
def test_condition_is_stored_on_the_execution_and_kept_for_the_run(setup: Setup, value: bool) -> None:
    r = setup.client.call("POST", setup.path(setup.exec_a, "condition"), setup.token_a, {"condition": value})
    assert r.status == 200 and r.body == {"success": True}
    assert execution_metadata(setup, setup.exec_a)["condition"] is value
    assert setup.api.state(setup.exec_a).condition is value
    assert setup.api.state(setup.exec_b).condition is None


def test_unknown_variable_is_404(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_a, "variables/nope"), setup.token_a)
    assert r.status == 404 and r.body["error"] == "Not Found" and "message" in r.body


JSON_VALUES = [
    "plain text", "", "ünïcødé ✓ 漢字 🚀", "{not json", 0, -7, 3.25, 1e300, 2**62, True, False, None,
    [], [1, "two", None, {"x": [True]}], {}, {"nested": {"list": [1.5, "ü"], "null": None}},
]


@pytest.mark.parametrize("value", JSON_VALUES, ids=[repr(v)[:30] for v in JSON_VALUES])
def test_variable_round_trip_keeps_the_json_value(setup: Setup, value: Any) -> None:
    path = setup.path(setup.exec_a, "variables/v")
    assert setup.client.call("PUT", path, setup.token_a, {"value": value}).status == 200
    r = setup.client.call("GET", path, setup.token_a)
    assert r.status == 200 and r.body == {"success": True, "data": {"key": "v", "value": value}}
    assert setup.api.state(setup.exec_a).variables_set == {"v": value}


def test_json_looking_strings_read_back_as_json(setup: Setup) -> None:
    """Cronium stores strings as bare text, so "42" is stored as 42 is: both read back as 42 (both modes)."""
    path = setup.path(setup.exec_a, "variables/n")
    setup.client.call("PUT", path, setup.token_a, {"value": "42"})
    assert stored(setup, "n") == "42"
    assert setup.client.call("GET", path, setup.token_a).body["data"]["value"] == 42


def test_strings_are_stored_as_text_and_others_as_json(setup: Setup) -> None:
    setup.client.call("PUT", setup.path(setup.exec_a, "variables/s"), setup.token_a, {"value": "hello"})
    setup.client.call("PUT", setup.path(setup.exec_a, "variables/o"), setup.token_a, {"value": {"a": "ü"}})
    assert stored(setup, "s") == "hello" and stored(setup, "o") == '{"a":"ü"}'


@pytest.mark.parametrize("key", ["a/b", "with space", "ü ß/漢", "dots..and%percent", "?#&="])
def test_keys_are_url_decoded(setup: Setup, key: str) -> None:
    path = setup.path(setup.exec_a, "variables/" + quote(key, safe=""))
    assert setup.client.call("PUT", path, setup.token_a, {"value": 1}).status == 200
    assert stored(setup, key) == "1"
    r = setup.client.call("GET", path, setup.token_a)
    assert r.body["data"] == {"key": key, "value": 1}


def test_execution_id_in_the_path_is_url_decoded(setup: Setup) -> None:
    r = setup.client.call("GET", "/executions/" + quote(setup.exec_a, safe="") + "/input", setup.token_a)
    assert r.status == 200


def test_variables_are_the_event_users(setup: Setup) -> None:
    from cronium_fab import records

    with setup.db.session() as s:
        records.set_variable(s, "u2", "k", "other user's")
    assert setup.client.call("GET", setup.path(setup.exec_a, "variables/k"), setup.token_a).status == 404
    setup.client.call("PUT", setup.path(setup.exec_a, "variables/k"), setup.token_a, {"value": "mine"})
    assert stored(setup, "k", "u2") == "other user's" and stored(setup, "k") == "mine"


def test_put_is_visible_to_another_execution_at_once(setup: Setup) -> None:
    other = setup.client.__class__(setup.api.port)
    try:
        path_b = setup.path(setup.exec_b, "variables/shared")
        assert other.call("GET", path_b, setup.token_b).status == 404
        setup.client.call("PUT", setup.path(setup.exec_a, "variables/shared"), setup.token_a, {"value": [1]})
        assert other.call("GET", path_b, setup.token_b).body["data"]["value"] == [1]
        other.call("PUT", path_b, setup.token_b, {"value": [2]})
        r = setup.client.call("GET", setup.path(setup.exec_a, "variables/shared"), setup.token_a)
        assert r.body["data"]["value"] == [2]
    finally:
        other.close()
    assert setup.api.state(setup.exec_a).variables_set == {"shared": [1]}
    assert setup.api.state(setup.exec_b).variables_set == {"shared": [2]}


def test_state_keeps_the_last_value_per_key_in_write_order(setup: Setup) -> None:
    for key, value in (("a", 1), ("b", 2), ("a", 3)):
        setup.client.call("PUT", setup.path(setup.exec_a, f"variables/{key}"), setup.token_a, {"value": value})
    state = setup.api.state(setup.exec_a)
    assert list(state.variables_set.items()) == [("b", 2), ("a", 3)]
    assert state.as_dict()["variables_set"] == {"b": 2, "a": 3}


def test_preexisting_variable_is_read_and_overwritten(setup: Setup) -> None:
    from cronium_fab import records

    with setup.db.session() as s:
        records.set_variable(s, setup.user_id, "count", 41)
    path = setup.path(setup.exec_a, "variables/count")
    assert setup.client.call("GET", path, setup.token_a).body["data"]["value"] == 41
    setup.client.call("PUT", path, setup.token_a, {"value": 42})
    assert stored(setup, "count") == "42"


def test_keep_alive_connection_carries_many_calls(setup: Setup) -> None:
    for _ in range(20):
        r = setup.client.call("GET", setup.path(setup.exec_a, "input"), setup.token_a)
        assert r.status == 200 and r.headers.get("connection") != "close"
