"""Tokens: who may call which execution. Every endpoint refuses missing, malformed, expired, tampered
and foreign tokens (401), a token for another execution (403), and an execution no longer running."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from sqlalchemy import select

from cronium_fab.db.models import UserVariable
from cronium_fab.helper_api import HelperAPI
from tests.api.conftest import SECRET, Setup, context

ENDPOINTS: list[tuple[str, str, Any]] = [
    ("GET", "input", ...),
    ("GET", "context", ...),
    ("POST", "output", {"data": "x"}),
    ("POST", "condition", {"condition": True}),
    ("GET", "variables/k", ...),
    ("PUT", "variables/k", {"value": "should not be stored"}),
]
IDS = [f"{m} {p}" for m, p, _ in ENDPOINTS]
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # forged on purpose


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def forge(setup: Setup, secret: bytes = SECRET, **changes: Any) -> str:
    claims = claims_of(setup.token_a)
    for k, v in changes.items():
        if v is None:
            claims.pop(k, None)
        else:
            claims[k] = v
    return jwt.encode(claims, secret, algorithm="HS256")


def tampered(token: str) -> str:
    head, body, sig = token.split(".")
    flipped = ("A" if sig[5] != "A" else "B")
    return ".".join((head, body, sig[:5] + flipped + sig[6:]))


def bad_tokens(setup: Setup) -> dict[str, str | None]:
    now = int(time.time())
    other_claims = claims_of(setup.token_a)
    other_claims["userId"] = "u2"
    return {
        "missing": None,
        "empty": "",
        "malformed": "not-a-jwt",
        "three_garbage_parts": "a.b.c",
        "tampered_signature": tampered(setup.token_a),
        "tampered_claims": setup.token_a.split(".")[0] + "." + jwt.encode(other_claims, "x").split(".")[1]
        + "." + setup.token_a.split(".")[2],
        "expired": forge(setup, iat=now - 7200, nbf=now - 7200, exp=now - 3600),
        "not_yet_valid": forge(setup, nbf=now + 3600),
        "foreign_secret": forge(setup, secret=b"another-secret-another-secret-0123456789"),
        "foreign_issuer": forge(setup, iss="someone-else"),
        "no_issuer": forge(setup, iss=None),
        "no_exp": forge(setup, exp=None),
        "no_iat": forge(setup, iat=None),
        "no_execution_id": forge(setup, executionId=None),
        "alg_none": jwt.encode(claims_of(setup.token_a), None, algorithm="none"),
        "hs512": jwt.encode(claims_of(setup.token_a), SECRET, algorithm="HS512"),
        "wrong_jti": forge(setup, jti="0" * 32),
    }


BAD_KINDS = ["missing", "empty", "malformed", "three_garbage_parts", "tampered_signature", "tampered_claims",
             "expired", "not_yet_valid", "foreign_secret", "foreign_issuer", "no_issuer", "no_exp", "no_iat",
             "no_execution_id", "alg_none", "hs512", "wrong_jti"]


def variable_count(setup: Setup) -> int:
    with setup.db.session() as s:
        return len(s.scalars(select(UserVariable)).all())


@pytest.mark.parametrize(("method", "rest", "body"), ENDPOINTS, ids=IDS)
def test_valid_token_is_accepted(setup: Setup, method: str, rest: str, body: Any) -> None:
    if rest.startswith("variables") and method == "GET":
        setup.client.call("PUT", setup.path(setup.exec_a, rest), setup.token_a, {"value": 1})
    r = setup.client.call(method, setup.path(setup.exec_a, rest), setup.token_a, body)
    assert r.status == 200 and r.body["success"] is True


@pytest.mark.parametrize(("method", "rest", "body"), ENDPOINTS, ids=IDS)
def test_every_bad_token_is_401_on_every_endpoint(setup: Setup, method: str, rest: str, body: Any) -> None:
    for kind, token in bad_tokens(setup).items():
        r = setup.client.call(method, setup.path(setup.exec_a, rest), token, body)
        assert r.status == 401, (kind, r.status, r.body)
        assert r.body["error"] == "Unauthorized" and r.body["message"], kind
        assert r.headers.get("www-authenticate") == "Bearer", kind
    assert variable_count(setup) == 0
    state = setup.api.state(setup.exec_a)
    assert not state.output_set and state.condition is None and state.calls == 0
    assert set(BAD_KINDS) == set(bad_tokens(setup))


@pytest.mark.parametrize("scheme", ["Basic", "Token", "bearer-ish"])
def test_other_authorization_schemes_are_401(setup: Setup, scheme: str) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_a, "input"),
                          headers={"Authorization": f"{scheme} {setup.token_a}"})
    assert r.status == 401


def test_scheme_is_case_insensitive(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path(setup.exec_a, "input"),
                          headers={"Authorization": f"bearer {setup.token_a}"})
    assert r.status == 200


def test_expired_token_says_so(setup: Setup) -> None:
    now = int(time.time())
    r = setup.client.call("GET", setup.path(setup.exec_a, "input"), forge(setup, iat=now - 100, exp=now - 60))
    assert r.status == 401 and "expired" in r.body["message"]


def test_token_expired_within_the_leeway_still_works(setup: Setup) -> None:
    now = int(time.time())
    r = setup.client.call("GET", setup.path(setup.exec_a, "input"), forge(setup, iat=now - 100, exp=now - 5))
    assert r.status == 200


@pytest.mark.parametrize(("method", "rest", "body"), ENDPOINTS, ids=IDS)
def test_token_of_another_execution_is_403(setup: Setup, method: str, rest: str, body: Any) -> None:
    r = setup.client.call(method, setup.path(setup.exec_b, rest), setup.token_a, body)
    assert r.status == 403 and r.body["error"] == "Forbidden"
    assert variable_count(setup) == 0 and setup.api.state(setup.exec_b).calls == 0


def test_token_for_an_unregistered_execution_is_403_on_its_path_mismatch(setup: Setup) -> None:
    r = setup.client.call("GET", setup.path("exec_somebody_else", "input"), setup.token_a)
    assert r.status == 403


@pytest.mark.parametrize(("method", "rest", "body"), ENDPOINTS, ids=IDS)
def test_unregistered_execution_is_401_not_running(setup: Setup, method: str, rest: str, body: Any) -> None:
    setup.api.unregister(setup.exec_a)
    r = setup.client.call(method, setup.path(setup.exec_a, rest), setup.token_a, body)
    assert r.status == 401 and r.body["message"] == "execution is not running"
    assert variable_count(setup) == 0


def test_token_signed_by_us_for_a_never_registered_execution_is_401(setup: Setup) -> None:
    token = forge(setup, executionId="exec_never", jti=None)
    r = setup.client.call("GET", setup.path("exec_never", "input"), token)
    assert r.status == 401 and r.body["message"] == "execution is not running"


def test_re_registering_revokes_the_earlier_token(setup: Setup) -> None:
    new = setup.api.register_execution(context(setup.exec_a, setup.job_id, setup.event_id, setup.user_id))
    assert setup.client.call("GET", setup.path(setup.exec_a, "input"), setup.token_a).status == 401
    assert setup.client.call("GET", setup.path(setup.exec_a, "input"), new).status == 200


def test_token_has_cronium_claims(setup: Setup) -> None:
    claims = jwt.decode(setup.token_a, SECRET, algorithms=["HS256"], issuer="cronium-orchestrator")
    assert jwt.get_unverified_header(setup.token_a)["alg"] == "HS256"
    assert claims["jobId"] == setup.job_id == claims["sub"]
    assert claims["executionId"] == setup.exec_a and claims["userId"] == setup.user_id
    assert claims["eventId"] == str(setup.event_id) and claims["serverId"] == "7"
    assert claims["nbf"] == claims["iat"] and claims["exp"] - claims["iat"] == 3600


def test_lifetime_is_configurable_per_api_and_per_registration(setup: Setup) -> None:
    api = HelperAPI(setup.db, lifetime_s=120)
    ctx = context("exec_x", setup.job_id, setup.event_id, setup.user_id)
    c1 = claims_of(api.register_execution(ctx))
    c2 = claims_of(api.register_execution(ctx, lifetime_s=900))
    assert c1["exp"] - c1["iat"] == 120 and c2["exp"] - c2["iat"] == 900


def test_configured_secret_lets_cronium_verify_our_tokens(setup: Setup) -> None:
    api = HelperAPI(setup.db, secret="cronium-jwt-secret-from-its-env-0123456789")
    token = api.register_execution(context("exec_x", setup.job_id, setup.event_id, setup.user_id))
    claims = jwt.decode(token, "cronium-jwt-secret-from-its-env-0123456789", algorithms=["HS256"],
                        issuer="cronium-orchestrator")
    assert claims["executionId"] == "exec_x"


def test_random_secret_differs_per_api(setup: Setup) -> None:
    ctx = context(setup.exec_a, setup.job_id, setup.event_id, setup.user_id)
    with HelperAPI(setup.db) as other:
        token = other.register_execution(ctx)
        # the other run's token is foreign here, and ours is foreign there
        assert setup.client.call("GET", setup.path(setup.exec_a, "input"), token).status == 401
        from tests.api.conftest import Client

        c = Client(other.port)
        try:
            assert c.call("GET", setup.path(setup.exec_a, "input"), setup.token_a).status == 401
            assert c.call("GET", setup.path(setup.exec_a, "input"), token).status == 200
        finally:
            c.close()


def test_the_issued_token_itself_expires(setup: Setup) -> None:
    token = setup.api.register_execution(context(setup.exec_a, setup.job_id, setup.event_id, setup.user_id),
                                         lifetime_s=-60)
    r = setup.client.call("GET", setup.path(setup.exec_a, "input"), token)
    assert r.status == 401 and "expired" in r.body["message"]
