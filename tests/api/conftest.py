"""Fixtures for the helper API: a running server over a real database, two registered executions
of the same user (with their jobs/executions rows), and a small HTTP client over 127.0.0.1."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cronium_fab.db.engine import Database
from cronium_fab.db.models import Execution, Job
from cronium_fab.helper_api import ExecutionContext, HelperAPI
from cronium_fab.testing.factories import add_event, add_user

SECRET = b"helper-api-test-secret-0123456789abcdef"


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class Client:
    """One keep-alive HTTP/1.1 connection to the API (reconnects when the server closed it)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method: str, path: str, token: str | None = None, body: Any = ..., *,
             raw: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is ... else json.dumps(body).encode())
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        self.conn.request(method, path, body=data, headers=hdrs)
        resp = self.conn.getresponse()
        payload = resp.read()
        reply = Reply(resp.status, json.loads(payload) if payload else None,
                      {k.lower(): v for k, v in resp.getheaders()})
        if resp.will_close:
            self.conn.close()
        return reply

    def close(self) -> None:
        self.conn.close()


@dataclass
class Setup:
    db: Database
    api: HelperAPI
    user_id: str
    event_id: int
    job_id: str
    exec_a: str
    exec_b: str
    token_a: str
    token_b: str
    client: Client

    def path(self, execution_id: str, rest: str) -> str:
        return f"/executions/{execution_id}/{rest}"


def add_job_with_executions(db: Database, user_id: str, event_id: int, job_id: str, *execution_ids: str) -> None:
    with db.session() as s:
        s.add(Job(id=job_id, event_id=event_id, user_id=user_id, type="SCRIPT", status="running",
                  payload={"input": {"n": 1}}))
        s.flush()
        for i, eid in enumerate(execution_ids):
            s.add(Execution(id=eid, job_id=job_id, server_id=None, server_name=f"web{i}", status="running"))


def context(execution_id: str, job_id: str, event_id: int, user_id: str, server_name: str = "web0",
            input: Any = None) -> ExecutionContext:
    return ExecutionContext(execution_id=execution_id, job_id=job_id, event_id=event_id, event_name="ev",
                            user_id=user_id, server_id=7, server_name=server_name, input=input, trigger="manual")


def make_setup(db: Database, **api_kwargs: Any) -> Iterator[Setup]:
    user_id = add_user(db, "u1")
    add_user(db, "u2")
    event_id = add_event(db, user_id=user_id, name="ev")
    job_id = "job_1_abc"
    exec_a, exec_b = f"exec_{job_id}_1_1700000000", f"exec_{job_id}_2_1700000000"
    add_job_with_executions(db, user_id, event_id, job_id, exec_a, exec_b)
    api_kwargs.setdefault("secret", SECRET)
    with HelperAPI(db, **api_kwargs) as api:
        token_a = api.register_execution(context(exec_a, job_id, event_id, user_id, "web0", {"from": "a", "ü": [1]}))
        token_b = api.register_execution(context(exec_b, job_id, event_id, user_id, "web1", None))
        client = Client(api.port)
        try:
            yield Setup(db, api, user_id, event_id, job_id, exec_a, exec_b, token_a, token_b, client)
        finally:
            client.close()


@pytest.fixture
def setup(db: Database) -> Iterator[Setup]:
    yield from make_setup(db)
