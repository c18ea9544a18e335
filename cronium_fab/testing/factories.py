"""Rows for tests, written through the models (Cronium's names), with what Cronium's app puts in
the columns that matter to a run: an SSH event is ``ACTIVE`` and runs ``REMOTE``."""

from __future__ import annotations

from cronium_fab.db.engine import Database
from cronium_fab.db.models import EnvVar, Event, EventServer, Server, User


def add_user(db: Database, user_id: str = "u1") -> str:
    with db.session() as s:
        if s.get(User, user_id) is None:
            s.add(User(id=user_id, email=f"{user_id}@example.test", username=user_id))
    return user_id


def add_server(db: Database, name: str = "web1", *, user_id: str = "u1", address: str = "127.0.0.2",
               port: int = 22, username: str = "root", ssh_key: str | None = None,
               password: str | None = None, archived: bool = False) -> int:
    add_user(db, user_id)
    with db.session() as s:
        server = Server(user_id=user_id, name=name, address=address, port=port, username=username,
                        ssh_key=ssh_key, password=password, is_archived=archived)
        s.add(server)
        s.flush()
        return server.id


def add_event(db: Database, *, name: str = "ev", type: str = "BASH", content: str = "echo hi",
              user_id: str = "u1", servers: list[int] | None = None, server_id: int | None = None,
              env: dict[str, str] | None = None, timeout_value: int = 30, timeout_unit: str = "SECONDS") -> int:
    add_user(db, user_id)
    with db.session() as s:
        event = Event(user_id=user_id, name=name, type=type, content=content, server_id=server_id,
                      timeout_value=timeout_value, timeout_unit=timeout_unit, payload_version=1,
                      status="ACTIVE", run_location="REMOTE")
        s.add(event)
        s.flush()
        for sid in servers or []:
            s.add(EventServer(event_id=event.id, server_id=sid))
        for k, v in (env or {}).items():
            s.add(EnvVar(event_id=event.id, key=k, value=v))
        return event.id
