"""A real PostgreSQL for the store's tests: one throwaway cluster per test session.

``pg_cluster`` starts Debian's PostgreSQL (``gateway.store.pg_server``) in a temporary
directory and stops it at the end; each test that asks for ``store_target`` with the
``postgres`` parameter gets a database of its own in it. Without the server's binaries the
PostgreSQL tests skip, except under ``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.store import is_postgres
from gateway.store.pg_server import PgServer, pg_bindir

BACKENDS = ["sqlite", "postgres"]
_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    """A running throwaway PostgreSQL cluster for the whole session."""
    if pg_bindir() is None:
        message = "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: PostgreSQL tests must run, not skip)", pytrace=False)
        pytest.skip(message)
    cluster = PgServer.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def new_database(cluster: PgServer) -> str:
    """The URL of a new, empty database in ``cluster``."""
    name = f"t{next(_databases)}"
    _run_pg(cluster.url, f"CREATE DATABASE {name}")
    return cluster.url.replace("/gateway?", f"/{name}?", 1)


@pytest.fixture(params=BACKENDS)
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a fresh store is, on each backend: a SQLite path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "gateway.db"
    return new_database(request.getfixturevalue("pg_cluster"))


@pytest.fixture
def pg_target(pg_cluster: PgServer) -> str:
    """A new PostgreSQL database (for tests of what only a shared server can show)."""
    return new_database(pg_cluster)


def _run_pg(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import asyncpg

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            if sql.lstrip().upper().startswith(("SELECT", "WITH")) or "RETURNING" in sql.upper():
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            await conn.execute(sql, *args)
            return []
        finally:
            await conn.close()

    # Its own event loop on its own thread: the tests call this from inside theirs.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def raw_sql(target: str | Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run ``sql`` (``?`` placeholders) straight on the database at ``target``, outside the
    store, as someone tampering with it would; the rows as tuples."""
    if is_postgres(target):
        parts = sql.split("?")
        pg = parts[0] + "".join(f"${i + 1}{part}" for i, part in enumerate(parts[1:]))
        return _run_pg(str(target), pg, *args)
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()
