"""A throwaway PostgreSQL schema for tests and benches: nothing they do touches existing tables."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def private_schema(url: str, prefix: str = "cfab_") -> Iterator[str]:
    """A new schema on the server of ``url`` (dropped afterwards); yields ``url`` with it as search_path."""
    import psycopg

    schema = f"{prefix}{uuid.uuid4().hex[:12]}"
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
