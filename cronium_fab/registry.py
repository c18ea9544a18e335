"""Register servers, events, their links, env vars and variables from one YAML file, without SQL.

For standalone users (no Cronium app). ``cronium-fab load inventory.yaml`` upserts by name, so
the file can be edited and loaded again. Example::

    user: local                      # optional, default "local"
    servers:
      - name: web1
        address: 10.0.0.5
        port: 22                     # default 22
        username: deploy             # default root
        ssh_key_file: ~/.ssh/id_ed25519   # or ssh_key: "<key text>", or password_env: WEB1_PASSWORD
    events:
      - name: disk-report
        type: BASH                   # BASH | PYTHON | NODEJS
        script: |
          df -h /
        timeout: 60                  # seconds, or {value: 5, unit: MINUTES}
        servers: [web1]
        env: {REPORT_TO: ops}        # or values from the environment: {TOKEN: {from_env: TOKEN}}
    variables: {greeting: hello}

Secrets are encrypted as Cronium does when ENCRYPTION_KEY is set; otherwise stored as plaintext in
the embedded database (a 0600 file). Passwords and env values can be read from environment
variables (``password_env``, ``from_env``) so the YAML file needs no secret at all.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .db.crypto import decrypt, encrypt, load_key
from .db.engine import Database
from .db.models import EnvVar, Event, EventServer, Server, User, UserVariable, utcnow
from .db.queries import REFUSED_TYPES, SCRIPT_TYPES, TIMEOUT_UNITS, encode_variable
from .errors import ConfigError


@dataclass
class LoadReport:
    servers: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    variables: list[str] = field(default_factory=list)
    # "server web1", "event disk-report", "variable greeting", by what loading did to them
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def note(self, what: str, before: Any, after: Any) -> None:
        """File ``what`` under created (``before`` is None), updated or unchanged."""
        (self.created if before is None else self.unchanged if before == after else self.updated).append(what)

    def summary(self) -> str:
        """A few lines for a human: what was created, updated, left unchanged."""
        lines = [f"{label} {len(items)}: {', '.join(items)}" for label, items in
                 (("created", self.created), ("updated", self.updated), ("unchanged", self.unchanged)) if items]
        return "\n".join(lines) or "nothing to load (no servers, events or variables in the file)"


TOP_KEYS = {"user", "servers", "events", "variables"}
SERVER_KEYS = {"name", "address", "port", "username", "ssh_key", "ssh_key_file", "password", "password_env", "archived"}
EVENT_KEYS = {"name", "type", "script", "content", "description", "timeout", "servers", "env"}


def _check_keys(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(mapping) - allowed, key=str)
    if unknown:
        hints = [f"{k!r}: did you mean {m[0]!r}?" for k in unknown
                 for m in [difflib.get_close_matches(str(k), sorted(allowed), n=1)] if m]
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}"
                          + (f" ({'; '.join(hints)})" if hints else "") + f"; allowed: {', '.join(sorted(allowed))}")


def _require(mapping: dict[str, Any], key: str, where: str) -> Any:
    if key not in mapping or mapping[key] in (None, ""):
        raise ConfigError(f"{where}: '{key}' is required")
    return mapping[key]


def _secret(value: str | None, key: bytes | None) -> str | None:
    if value is None:
        return None
    return encrypt(value, key) if key else value


def _from_env(name: str, where: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return value


def _timeout(spec: Any, where: str) -> tuple[int, str]:
    if spec is None:
        return 30, "SECONDS"
    if isinstance(spec, dict):
        _check_keys(spec, {"value", "unit"}, f"{where}: timeout")
        value, unit = spec.get("value"), str(spec.get("unit", "SECONDS")).upper()
        if unit not in TIMEOUT_UNITS:
            raise ConfigError(f"{where}: timeout unit {spec.get('unit')!r} is not one of {', '.join(TIMEOUT_UNITS)}")
    else:
        value, unit = spec, "SECONDS"
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: timeout must be a whole number of seconds of at least 1 (or "
                          f"{{value: N, unit: SECONDS|MINUTES|HOURS|DAYS}}), not {value!r}")
    return value, unit


def _typed(spec: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, example: str) -> Any:
    """``spec[key]`` when it is absent or of ``kind`` (never a bool for a number), else a ConfigError
    that names the field and shows what it should look like."""
    value = spec.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return value
    names = " or ".join({str: "text", int: "a whole number", bool: "true/false", list: "a list",
                         dict: "a mapping"}.get(k, k.__name__) for k in kinds)
    raise ConfigError(f"{where}: {key} must be {names}, not {value!r} (e.g. {example})")


def _check_server(spec: dict[str, Any], where: str) -> None:
    for key in ("name", "address", "username", "ssh_key", "ssh_key_file", "password", "password_env"):
        _typed(spec, key, str, where, f"{key}: " + {"name": "web1", "address": "10.0.0.5"}.get(key, "..."))
    port = _typed(spec, "port", int, where, "port: 2222")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port must be between 1 and 65535, not {port}")
    _typed(spec, "archived", bool, where, "archived: true")


def _check_event(spec: dict[str, Any], where: str) -> None:
    for key in ("name", "type", "script", "content", "description"):
        _typed(spec, key, str, where, {"type": "type: BASH", "name": "name: disk-report"}.get(key, f"{key}: |"))
    servers = _typed(spec, "servers", list, where, "servers: [web1, web2]")
    for name in servers or []:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: servers lists server names, not {name!r} (e.g. servers: [web1, web2])")
    env = _typed(spec, "env", dict, where, "env: {REGION: eu, TOKEN: {from_env: TOKEN}}")
    for k, v in (env or {}).items():
        if isinstance(v, dict):
            _check_keys(v, {"from_env"}, f"{where}: env.{k}")
            _typed(v, "from_env", str, f"{where}: env.{k}", "{from_env: TOKEN}")
        elif not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ConfigError(f"{where}: env.{k} must be text, a number or {{from_env: NAME}}, not {v!r} "
                              "(quote true/false: 'true')")


def load_inventory(db: Database, path: Path) -> LoadReport:
    """Upsert everything in the YAML file in one transaction (all or nothing)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with servers/events/variables")
    _check_keys(doc, TOP_KEYS, str(path))
    _typed(doc, "servers", list, str(path), "servers: [{name: web1, address: 10.0.0.5}]")
    _typed(doc, "events", list, str(path), "events: [{name: report, type: BASH, script: df -h}]")
    _typed(doc, "variables", dict, str(path), "variables: {threshold: 90}")
    _typed(doc, "user", str, str(path), "user: ops")
    key = load_key()
    report = LoadReport()
    user_id = str(doc.get("user") or "local")
    with db.session() as s:
        if s.get(User, user_id) is None:
            s.add(User(id=user_id, email=f"{user_id}@localhost", username=user_id))
            s.flush()
        for i, spec in enumerate(doc.get("servers") or []):
            where = f"{path}: servers[{i}]"
            _check_keys(spec, SERVER_KEYS, where)
            _check_server(spec, where)
            name = str(_require(spec, "name", where))
            ssh_key = spec.get("ssh_key")
            if spec.get("ssh_key_file"):
                try:
                    ssh_key = Path(spec["ssh_key_file"]).expanduser().read_text()
                except OSError as exc:
                    raise ConfigError(f"{where}: cannot read ssh_key_file: {exc.strerror}") from None
            password = _from_env(spec["password_env"], where) if spec.get("password_env") else spec.get("password")
            server = s.scalars(select(Server).where(Server.user_id == user_id, Server.name == name)).first()
            before = None if server is None else _server_state(server, key)
            stored_secrets = (None, None) if server is None else (server.ssh_key, server.password)
            if server is None:
                server = Server(user_id=user_id, name=name, created_at=utcnow())
                s.add(server)
            server.address = str(_require(spec, "address", where))
            server.port = int(spec.get("port", 22))
            server.username = str(spec.get("username", "root"))
            server.ssh_key = _secret(ssh_key, key)
            server.password = _secret(password, key)
            server.is_archived = bool(spec.get("archived", False))
            server.updated_at = utcnow()
            s.flush()
            report.servers[name] = server.id
            after = (server.address, server.port, server.username, ssh_key, password, server.is_archived)
            if before == after:   # secrets re-encrypt to new bytes: keep the stored ones
                server.ssh_key, server.password = stored_secrets
            report.note(f"server {name}", before, after)
        for i, spec in enumerate(doc.get("events") or []):
            where = f"{path}: events[{i}]"
            _check_keys(spec, EVENT_KEYS, where)
            _check_event(spec, where)
            name = str(_require(spec, "name", where))
            etype = str(_require(spec, "type", where)).upper()
            if etype not in SCRIPT_TYPES:
                why = " (HTTP requests and tool actions run in Cronium itself)" if etype in REFUSED_TYPES else ""
                raise ConfigError(f"{where}: type {etype!r} is not BASH, PYTHON or NODEJS{why}")
            if not (spec.get("script") or spec.get("content")):
                raise ConfigError(f"{where}: 'script' is required (the script to run)")
            event = s.scalars(select(Event).where(Event.user_id == user_id, Event.name == name)).first()
            before_event = None if event is None else _event_state(s, event, key)
            if event is None:
                event = Event(user_id=user_id, name=name, created_at=utcnow(), payload_version=1)
                s.add(event)
            event.type = "NODEJS" if etype == "NODE" else etype
            event.content = str(spec.get("script") or spec.get("content") or "")
            event.description = spec.get("description")
            event.status = "ACTIVE"
            event.run_location = "REMOTE"
            event.timeout_value, event.timeout_unit = _timeout(spec.get("timeout"), where)
            event.updated_at = utcnow()
            s.flush()
            s.execute(delete(EventServer).where(EventServer.event_id == event.id))
            for sname in spec.get("servers") or []:
                sid = report.servers.get(sname) or s.scalars(
                    select(Server.id).where(Server.user_id == user_id, Server.name == sname)
                ).first()
                if sid is None:
                    raise ConfigError(f"{where}: server {sname!r} is not defined")
                s.add(EventServer(event_id=event.id, server_id=sid))
            s.execute(delete(EnvVar).where(EnvVar.event_id == event.id))
            for k, v in (spec.get("env") or {}).items():
                value = _from_env(v["from_env"], where) if isinstance(v, dict) else str(v)
                s.add(EnvVar(event_id=event.id, key=str(k), value=_secret(value, key)))
            report.events[name] = event.id
            s.flush()
            report.note(f"event {name}", before_event, _event_state(s, event, key))
        for k, v in (doc.get("variables") or {}).items():
            row = s.scalars(select(UserVariable).where(UserVariable.user_id == user_id, UserVariable.key == k)).first()
            report.note(f"variable {k}", None if row is None else row.value, encode_variable(v))
            if row is None:
                s.add(UserVariable(user_id=user_id, key=str(k), value=encode_variable(v)))
            else:
                row.value = encode_variable(v)
                row.updated_at = utcnow()
            report.variables.append(str(k))
    return report


def _server_state(server: Server, key: bytes | None) -> tuple[Any, ...]:
    """What `load` may change on a server, secrets decrypted (compared, never shown)."""
    what = f"server {server.name!r}"
    return (server.address, server.port, server.username, decrypt(server.ssh_key, key, what=what),
            decrypt(server.password, key, what=what), server.is_archived)


def _event_state(s: Session, event: Event, key: bytes | None) -> tuple[Any, ...]:
    """What `load` may change on an event: its script and settings, servers and env (decrypted)."""
    servers = sorted(s.scalars(select(EventServer.server_id).where(EventServer.event_id == event.id)))
    env = sorted((e.key, decrypt(e.value, key, what=f"env var {e.key!r}"))
                 for e in s.scalars(select(EnvVar).where(EnvVar.event_id == event.id)))
    return (event.type, event.content, event.description, event.status, event.run_location, event.timeout_value,
            event.timeout_unit, servers, env)
