"""Cronium's tables exactly as its own migrations make them, rebuilt from ``tests/data/cronium_schema.json``
alone (never from our models): the reference every database test is held to.

``cronium_schema.json`` is a copy of ``shared/cronium/schema.json``: Cronium's migrations 0000 and
0003-0007 applied in order to PostgreSQL 15, read back from ``information_schema`` and
``pg_constraint`` (columns with type, NULL/NOT NULL and DEFAULT; PK, UNIQUE and FK constraints).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).parent / "data" / "cronium_schema.json"
_SEQUENCE = re.compile(r"^nextval\('([A-Za-z0-9_]+)'::regclass\)$")
_REFERENCES = re.compile(r"REFERENCES\s+([A-Za-z0-9_]+)\(")


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    default: str | None


@cache
def cronium_tables() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())["tables"]
    return data


def columns(table: str) -> dict[str, Column]:
    return {c["column"]: Column(c["column"], c["type"], c["nullable"], c["default"])
            for c in cronium_tables()[table]["columns"]}


def constraints(table: str) -> list[str]:
    return list(cronium_tables()[table]["constraints"])


def referenced_elsewhere() -> list[str]:
    """Tables Cronium's FKs point at that schema.json does not describe (workflows, roles, ...)."""
    known = set(cronium_tables())
    found = {m for t in known for c in constraints(t) for m in _REFERENCES.findall(c)}
    return sorted(found - known)


def cronium_ddl() -> list[str]:
    """PostgreSQL statements that make Cronium's tables: sequences, tables with exactly the columns,
    NOT NULLs and DEFAULTs of schema.json, then its PRIMARY KEY/UNIQUE and FOREIGN KEY constraints.
    Tables that FKs reference but schema.json leaves out get a bare ``id integer`` PK so every FK holds."""
    tables = cronium_tables()
    stmts: list[str] = []
    owned: list[tuple[str, str, str]] = []
    for table in tables:
        cols = []
        for c in columns(table).values():
            seq = _SEQUENCE.match(c.default or "")
            if seq:
                stmts.append(f'CREATE SEQUENCE "{seq.group(1)}"')
                owned.append((seq.group(1), table, c.name))
            spec = f'"{c.name}" {c.type}'
            if not c.nullable:
                spec += " NOT NULL"
            if c.default is not None:
                spec += f" DEFAULT {c.default}"
            cols.append(spec)
        stmts.append(f'CREATE TABLE "{table}" ({", ".join(cols)})')
    stmts += [f'CREATE TABLE "{t}" (id integer PRIMARY KEY)' for t in referenced_elsewhere()]
    stmts += [f'ALTER SEQUENCE "{seq}" OWNED BY "{t}"."{c}"' for seq, t, c in owned]
    keys = [(t, c) for t in tables for c in constraints(t) if not c.startswith("FOREIGN KEY")]
    fks = [(t, c) for t in tables for c in constraints(t) if c.startswith("FOREIGN KEY")]
    stmts += [f'ALTER TABLE "{t}" ADD {c}' for t, c in keys + fks]
    return stmts


def create_cronium_tables(dsn: str) -> None:
    """Make Cronium's tables in the database (and search_path) that ``dsn`` names."""
    import psycopg

    with psycopg.connect(dsn) as conn, conn.transaction():
        for stmt in cronium_ddl():
            conn.execute(stmt.encode())


def read_tables(dsn: str) -> dict[str, Any]:
    """The tables of the current schema of ``dsn`` in schema.json's own format (columns with type,
    nullable, default; constraints as ``pg_get_constraintdef`` writes them), for comparing."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name, CASE WHEN data_type = 'character varying' "
            "THEN 'character varying(' || character_maximum_length || ')' ELSE data_type END, "
            "is_nullable = 'YES', column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ).fetchall()
        cons = conn.execute(
            "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = current_schema()::regnamespace AND contype IN ('p', 'u', 'f')"
        ).fetchall()
    tables: dict[str, Any] = {}
    for table, name, type_, nullable, default in cols:
        tables.setdefault(table, {"columns": [], "constraints": []})["columns"].append(
            {"column": name, "type": type_, "nullable": nullable, "default": default})
    for table, definition in cons:
        tables[table.strip('"')]["constraints"].append(definition)
    return tables


def differences(table: str, actual: dict[str, Any], *, ignore_constraints: dict[str, str] | None = None) -> list[str]:
    """How ``actual`` (one table, schema.json format) differs from Cronium's, one line per column or
    constraint; constraints in ``ignore_constraints`` (definition -> why) are left out."""
    want, have = columns(table), {c["column"]: Column(c["column"], c["type"], c["nullable"], c["default"])
                                  for c in actual["columns"]}
    out = [f"{table}.{n}: missing (Cronium has {c.type}{'' if c.nullable else ' NOT NULL'})"
           for n, c in want.items() if n not in have]
    out += [f"{table}.{n}: not a column of Cronium's" for n in have if n not in want]
    for n in want.keys() & have.keys():
        for attr in ("type", "nullable", "default"):
            if getattr(want[n], attr) != getattr(have[n], attr):
                out.append(f"{table}.{n}: {attr} is {getattr(have[n], attr)!r}, Cronium's is {getattr(want[n], attr)!r}")
    skip = ignore_constraints or {}
    out += [f"{table}: lacks {c}" for c in constraints(table) if c not in actual["constraints"] and c not in skip]
    out += [f"{table}: has {c}, which Cronium does not" for c in actual["constraints"] if c not in constraints(table)]
    return sorted(out)
