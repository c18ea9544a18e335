"""The helper API of API mode (docs/CRONIUM.md §4), served by the run itself on 127.0.0.1.

A script's helpers (``cronium.getVariable`` ...) and Cronium's own SDKs reach this server through a
per-host SSH remote forward. Each execution gets an HS256 JWT scoped to it; the server answers exactly
the endpoints of Cronium's runtime API and nothing else: any other path is 404, so tool actions can
never be reached from a target. Writes go through ``records`` (the same functions as bundled mode) and
are also kept per execution, so the run can record the final state without writing anything twice.

Hostile or broken clients are expected (a script can send anything): bodies are bounded, sockets time
out, connections are capped, each execution has a rate limit, errors never echo tokens or values.
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import jwt
from sqlalchemy.exc import OperationalError

from . import records
from .db.engine import Database
from .db.queries import decode_variable

log = logging.getLogger(__name__)

ISSUER = "cronium-orchestrator"
MAX_KEY_LEN = 255  # user_variables.key is varchar(255)


@dataclass(frozen=True)
class ExecutionContext:
    """What the run knows about one execution (one host) when it registers it."""

    execution_id: str
    job_id: str
    event_id: int | str
    event_name: str
    user_id: str
    server_id: int | str | None
    server_name: str
    input: Any = None
    trigger: str = "manual"
    started_at: datetime | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_context(self) -> dict[str, Any]:
        """The body of ``GET /executions/{id}/context`` (the same keys as bundled mode's context.json)."""
        started = self.started_at or datetime.now(UTC)
        if started.tzinfo is not None:
            started = started.astimezone(UTC).replace(tzinfo=None)
        ctx: dict[str, Any] = {
            "executionId": self.execution_id,
            "jobId": self.job_id,
            "eventId": self.event_id,
            "eventName": self.event_name,
            "serverId": self.server_id,
            "serverName": self.server_name,
            "userId": self.user_id,
            "trigger": self.trigger,
            "startTime": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "helperMode": "api",
        }
        if self.extra:
            ctx["extra"] = dict(self.extra)
        return ctx


@dataclass
class HelperState:
    """What one execution set through the API. The run records it; the variables are already stored."""

    output: Any = None
    output_set: bool = False
    condition: bool | None = None
    variables_set: dict[str, Any] = field(default_factory=dict)
    calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"output": self.output, "output_set": self.output_set, "condition": self.condition,
                "variables_set": dict(self.variables_set), "calls": self.calls}


class TokenBucket:
    """``rate`` requests per second on average, bursts up to ``burst``. Thread-safe."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 when a request may go now, else the seconds until one may."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


@dataclass
class _Registration:
    ctx: ExecutionContext
    jti: str
    bucket: TokenBucket | None
    token: str = ""
    expires: float = 0.0
    write_lock: threading.Lock = field(default_factory=threading.Lock)


class ApiError(Exception):
    """An HTTP error answer: status plus a message safe to show (never a token or a value)."""

    def __init__(self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _fail(status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> NoReturn:
    raise ApiError(status, message, headers)


# -- routing ------------------------------------------------------------------------------------

# (path shape, allowed methods). A shape is the path's segments; "{id}" and "{key}" capture one
# URL-decoded segment. Nothing outside this table is served.
ROUTES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("health",), ("GET",)),
    (("executions", "{id}", "input"), ("GET",)),
    (("executions", "{id}", "output"), ("POST",)),
    (("executions", "{id}", "variables", "{key}"), ("GET", "PUT")),
    (("executions", "{id}", "condition"), ("POST",)),
    (("executions", "{id}", "context"), ("GET",)),
]


def match_route(raw_path: str) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """(route name, allowed methods, captures) for a request target; ApiError 404 when outside the table.

    Segments are split before decoding, so ``%2F`` inside a key stays part of the key and no encoded
    ``/`` or ``..`` can reach another route.
    """
    if raw_path.lower().startswith(("http://", "https://")):  # absolute-form request target
        path = urlsplit(raw_path).path
    else:
        path = raw_path.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        _fail(HTTPStatus.NOT_FOUND, "no such endpoint")
    parts = path[1:].split("/")
    for shape, methods in ROUTES:
        if len(shape) != len(parts):
            continue
        captures: dict[str, str] = {}
        for want, got in zip(shape, parts, strict=True):
            if want.startswith("{"):
                try:
                    value = unquote(got, errors="strict")
                except UnicodeDecodeError:
                    _fail(HTTPStatus.BAD_REQUEST, f"{want[1:-1]} is not valid UTF-8 after URL-decoding")
                if not value:
                    break
                captures[want[1:-1]] = value
            elif want != got:
                break
        else:
            name = "/".join(s for s in shape if not s.startswith("{"))
            return name, methods, captures
    _fail(HTTPStatus.NOT_FOUND, "no such endpoint")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity (PostgreSQL's jsonb refuses them), no stack-exhausting depth."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        _fail(HTTPStatus.BAD_REQUEST, "the body is not a valid JSON document")


def _body_field(doc: Any, name: str) -> Any:
    if not isinstance(doc, dict) or name not in doc:
        _fail(HTTPStatus.BAD_REQUEST, f'the body must be a JSON object with "{name}"')
    return doc[name]


# -- the server ---------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """A thread per connection, every connection tracked so ``stop`` can close it and join its thread."""

    daemon_threads = True  # a wedged handler must never keep the process alive
    allow_reuse_address = False

    def __init__(self, api: HelperAPI, max_connections: int) -> None:
        self.api = api
        self.max_connections = max_connections
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self.closing = False
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name="cronium-helper-api-conn", daemon=True)
        with self._conns_lock:
            busy = self.closing or len(self._conns) >= self.max_connections
            if not busy:
                self._conns[request] = thread
        if busy:
            self._refuse(request)
        else:
            thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception as exc:
            log.debug("helper API connection ended: %s", type(exc).__name__)
        finally:
            self.shutdown_request(request)
            with self._conns_lock:
                self._conns.pop(request, None)

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": "Service Unavailable", "message": "too many connections"}).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def close_connections(self, timeout: float) -> None:
        """Wake every handler blocked on its socket, then wait for the threads to end."""
        with self._conns_lock:
            self.closing = True
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("helper API request failed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client carries many calls

    def version_string(self) -> str:
        return "cronium-fab-helper-api"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.api.socket_timeout_s)  # a stuck client frees its thread
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # every method goes through one dispatcher, so a wrong method on a known path is 405, never 501
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        api = self.server.api
        self._body_read = False
        try:
            status, doc = api.handle(self.command, self.path, self.headers.get("Authorization"), self._read_body)
            self._reply(status, doc)
        except ApiError as err:
            self._reply(err.status, {"error": err.status.phrase, "message": err.message}, err.headers)
        except Exception as exc:  # a bug or a database failure: say nothing that could carry a value
            log.error("helper API %s %s failed: %s", self.command, _route_for_log(self.path), type(exc).__name__)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            self._reply(status, {"error": status.phrase, "message": "the request could not be completed"})

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            _fail(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (chunked is not accepted)")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._body_read = True
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            _fail(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        if length > limit:
            self.close_connection = True
            _fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            _fail(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length bytes")
        self._body_read = True
        return body

    def _reply(self, status: HTTPStatus, doc: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        unread = not self._body_read and self.headers.get("Content-Length") not in (None, "0")
        if unread:
            self.close_connection = True  # an unread body would be parsed as the next request
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if unread:
            self._lingering_close()

    def _lingering_close(self) -> None:
        """Let a client still sending its (refused) body finish and read our answer: closing with
        unread bytes makes the kernel send a reset, and the client would see that instead of the 413."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            budget = 2 * self.server.api.max_body_bytes + (1 << 16)
            self.connection.settimeout(0.5)
            while budget > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                budget -= len(chunk)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, oversized headers, unknown method) in our JSON shape."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        self._body_read = True
        if not hasattr(self, "headers"):
            self.headers = self.MessageClass()
        if not getattr(self, "command", None):
            self.command = "GET"
        self._reply(status, {"error": status.phrase, "message": message or status.description})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # requests are logged by HelperAPI.handle, without the query or any header

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def _route_for_log(path: str) -> str:
    try:
        name, _, captures = match_route(path)
    except ApiError:
        return "<unknown path>"
    return f"/{name} ({captures.get('id', '-')})"


class HelperAPI:
    """The helper HTTP API of one run: start it, register each execution, give its token to the host.

    >>> with HelperAPI(db, lifetime_s=timeout + 300) as api:
    ...     token = api.register_execution(ExecutionContext(...))
    ...     ...  # the host's helpers call api.url through the tunnel
    ...     state = api.unregister(execution_id)
    """

    def __init__(self, db: Database, *, secret: str | bytes | None = None, issuer: str = ISSUER,
                 lifetime_s: float = 3600.0, leeway_s: float = 30.0, rate_per_s: float | None = 1000.0,
                 burst: int = 2000, max_body_bytes: int = 1 << 20, socket_timeout_s: float = 30.0,
                 max_connections: int = 256) -> None:
        self.db = db
        if isinstance(secret, str):
            secret = secret.encode()
        self._secret = secret or secrets.token_bytes(32)  # configured: Cronium's runtime can verify ours
        self.issuer = issuer
        self.lifetime_s = lifetime_s
        self.leeway_s = leeway_s
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_body_bytes = max_body_bytes
        self.socket_timeout_s = socket_timeout_s
        self.max_connections = max_connections
        self._registrations: dict[str, _Registration] = {}
        self._states: dict[str, HelperState] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # SQLite has one writer; serializing our writes avoids its immediate "database is locked"
        self._sqlite_writes = threading.Lock() if db.dialect == "sqlite" else None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> HelperAPI:
        if self._server is not None:
            return self
        self._server = _Server(self, self.max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="cronium-helper-api", daemon=True)
        self._thread.start()
        log.debug("helper API listening on 127.0.0.1:%d", self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection and join every server thread. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections(timeout)
        if thread is not None:
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> HelperAPI:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the helper API is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- executions -----------------------------------------------------------------------------
    def register_execution(self, ctx: ExecutionContext, *, lifetime_s: float | None = None) -> str:
        """Allow ``ctx.execution_id`` to call the API; returns its token (give it to the host on stdin).

        Registering the same id again replaces the registration: tokens issued before stop working.
        """
        if ctx.started_at is None:
            ctx = replace(ctx, started_at=datetime.now(UTC))
        jti = uuid.uuid4().hex
        bucket = TokenBucket(self.rate_per_s, self.burst) if self.rate_per_s else None
        token = self.issue_token(ctx, jti=jti, lifetime_s=lifetime_s)
        expires = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        with self._lock:
            self._registrations[ctx.execution_id] = _Registration(ctx, jti, bucket, token, expires)
            self._states.setdefault(ctx.execution_id, HelperState())
        return token

    def unregister(self, execution_id: str) -> HelperState:
        """Refuse further calls for the execution (401); returns what it set, after any write in flight."""
        with self._lock:
            reg = self._registrations.pop(execution_id, None)
        if reg is not None:
            with reg.write_lock:  # a write already past its checks finishes and is in the returned state
                pass
        return self.state(execution_id)

    def state(self, execution_id: str) -> HelperState:
        """A copy of what the execution set so far. KeyError when it was never registered."""
        with self._lock:
            return copy.deepcopy(self._states[execution_id])

    # -- tokens ---------------------------------------------------------------------------------
    def issue_token(self, ctx: ExecutionContext, *, jti: str | None = None, lifetime_s: float | None = None) -> str:
        """An HS256 JWT with Cronium's claims (docs/CRONIUM.md §4), plus serverId and a registration id."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "jobId": ctx.job_id,
            "executionId": ctx.execution_id,
            "userId": ctx.user_id,
            "eventId": str(ctx.event_id),
            "serverId": None if ctx.server_id is None else str(ctx.server_id),
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime_s if lifetime_s is not None else self.lifetime_s),
            "iss": self.issuer,
            "sub": ctx.job_id,
        }
        if jti is not None:
            claims["jti"] = jti
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify_token(self, token: str) -> dict[str, Any]:
        """The token's claims; ApiError 401 for anything not signed by us, expired, or for another issuer."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._secret, algorithms=["HS256"], issuer=self.issuer, leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "executionId"]},
            )
        except jwt.ExpiredSignatureError:
            _fail(HTTPStatus.UNAUTHORIZED, "the token has expired", {"WWW-Authenticate": "Bearer"})
        except jwt.InvalidTokenError:
            _fail(HTTPStatus.UNAUTHORIZED, "the token is not valid", {"WWW-Authenticate": "Bearer"})
        if not isinstance(claims.get("executionId"), str):
            _fail(HTTPStatus.UNAUTHORIZED, "the token is not valid", {"WWW-Authenticate": "Bearer"})
        return claims

    def _authorize(self, authorization: str | None, execution_id: str) -> _Registration:
        auth = authorization or ""
        scheme, _, token = auth.partition(" ")
        if not auth:
            _fail(HTTPStatus.UNAUTHORIZED, "missing Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not token.strip():
            _fail(HTTPStatus.UNAUTHORIZED, "the Authorization header must be 'Bearer <token>'",
                  {"WWW-Authenticate": "Bearer"})
        token = token.strip()
        with self._lock:
            reg = self._registrations.get(execution_id)
        # fast path: the very token we issued for this registration (a JWT decode costs more than the DB read)
        if reg is not None and hmac.compare_digest(token.encode(), reg.token.encode()) \
                and time.time() <= reg.expires + self.leeway_s:
            return reg
        claims = self.verify_token(token)
        if claims["executionId"] != execution_id:
            _fail(HTTPStatus.FORBIDDEN, "the token is for another execution")
        with self._lock:
            reg = self._registrations.get(execution_id)
        if reg is None:
            _fail(HTTPStatus.UNAUTHORIZED, "execution is not running", {"WWW-Authenticate": "Bearer"})
        if claims.get("jti") != reg.jti:
            _fail(HTTPStatus.UNAUTHORIZED, "the token was not issued for this run of the execution",
                  {"WWW-Authenticate": "Bearer"})
        return reg

    # -- requests -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, authorization: str | None,
               read_body: Callable[[int], bytes]) -> tuple[HTTPStatus, dict[str, Any]]:
        """Answer one request: route → method → token → execution → rate → body → action.

        Routing comes first so unknown paths are 404 whatever the token; the body is read only after
        the token checks out, so an anonymous client cannot make us read a megabyte.
        """
        route, methods, captures = match_route(path)
        if method not in methods:
            _fail(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here", {"Allow": ", ".join(methods)})
        if route == "health":
            return HTTPStatus.OK, {"success": True, "status": "ok"}
        execution_id = captures["id"]
        reg = self._authorize(authorization, execution_id)
        if reg.bucket is not None:
            wait = reg.bucket.take()
            if wait > 0:
                _fail(HTTPStatus.TOO_MANY_REQUESTS, "rate limit exceeded for this execution",
                      {"Retry-After": str(max(1, int(wait + 0.999)))})
        doc = parse_json(read_body(self.max_body_bytes) or b"null") if method in ("POST", "PUT") else None
        with self._lock:
            self._states[execution_id].calls += 1
        log.debug("helper API %s /%s (%s)", method, route, execution_id)
        ctx = reg.ctx
        if route == "executions/input":
            return HTTPStatus.OK, {"success": True, "data": ctx.input}
        if route == "executions/context":
            return HTTPStatus.OK, {"success": True, "data": ctx.as_context()}
        if route == "executions/variables":
            key = captures["key"]
            if len(key) > MAX_KEY_LEN:
                _fail(HTTPStatus.BAD_REQUEST, f"a variable key has at most {MAX_KEY_LEN} characters")
            if method == "GET":
                return self._get_variable(ctx, key)
            return self._put_variable(reg, key, _body_field(doc, "value"))
        if route == "executions/output":
            data = _body_field(doc, "data")
            self._write(reg, lambda s: records.set_output(s, execution_id, data),
                        lambda st: _set_output(st, data))
            return HTTPStatus.OK, {"success": True}
        if route == "executions/condition":
            condition = _body_field(doc, "condition")
            if not isinstance(condition, bool):
                _fail(HTTPStatus.BAD_REQUEST, '"condition" must be true or false')
            self._write(reg, lambda s: records.set_condition(s, execution_id, condition),
                        lambda st: setattr(st, "condition", condition))
            return HTTPStatus.OK, {"success": True}
        raise AssertionError(route)  # pragma: no cover: ROUTES and this method disagree

    def _get_variable(self, ctx: ExecutionContext, key: str) -> tuple[HTTPStatus, dict[str, Any]]:
        text = records.read_variable(self.db, ctx.user_id, key)
        if text is None:
            _fail(HTTPStatus.NOT_FOUND, "no such variable")
        return HTTPStatus.OK, {"success": True, "data": {"key": key, "value": decode_variable(text)}}

    def _put_variable(self, reg: _Registration, key: str, value: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        user_id = reg.ctx.user_id
        self._write(reg, lambda s: records.set_variable(s, user_id, key, value),
                    lambda st: _set_variable(st, key, value))
        return HTTPStatus.OK, {"success": True}

    def _write(self, reg: _Registration, store: Callable[[Any], None], remember: Callable[[HelperState], None]) -> None:
        """Store, then remember, under the execution's write lock: the in-memory state then always
        agrees with the last of this execution's writes that reached the database."""
        with reg.write_lock:
            with self._lock:
                live = self._registrations.get(reg.ctx.execution_id) is reg
            if not live:  # unregistered (or registered again) while this request waited
                _fail(HTTPStatus.UNAUTHORIZED, "execution is not running", {"WWW-Authenticate": "Bearer"})
            for attempt in range(5):
                try:
                    if self._sqlite_writes is not None:
                        with self._sqlite_writes, self.db.session() as s:
                            store(s)
                    else:
                        with self.db.session() as s:
                            store(s)
                    break
                except OperationalError as exc:  # a deadlock / lock timeout: retry a few times
                    if attempt == 4:
                        raise
                    log.debug("helper API write retried: %s", type(exc.orig).__name__)
                    time.sleep(0.01 * (attempt + 1))
            with self._lock:
                remember(self._states[reg.ctx.execution_id])


def _set_output(state: HelperState, data: Any) -> None:
    state.output = data
    state.output_set = True


def _set_variable(state: HelperState, key: str, value: Any) -> None:
    state.variables_set.pop(key, None)  # keep the order of last writes
    state.variables_set[key] = value
