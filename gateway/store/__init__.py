"""Durable state. All SQL of the hub lives in this package.

Parts:

- ``base``: ``TaskStore``, the interface the hub uses, whichever database is behind it;
- ``records``: what the store hands back: ``Task`` (with its ``TaskEvent`` history) and
  the task states;
- ``migrations``: the SQLite schema as named, ordered migrations, each recorded in the
  transaction that applies it;
- ``sqlite``: ``Store``, one SQLite file with one writer thread with group commit and a
  pool of readers (the Datasette pattern), the embedded default;
- ``pg_migrations``, ``postgres``: ``PostgresStore``, the same interface and guarantees on
  a PostgreSQL server that several hubs may share;
- ``pg_server``: a throwaway PostgreSQL cluster for tests and benchmarks.

``open_store`` picks the implementation from where the state is.
"""

from __future__ import annotations

from pathlib import Path

from gateway.store.base import TaskStore
from gateway.store.migrations import MIGRATIONS, migrate
from gateway.store.records import ACTIVE_STATES, TERMINAL_STATES, SealedDecision, Task, TaskEvent
from gateway.store.sqlite import Store

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(target: str | Path) -> bool:
    """Whether ``target`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def open_store(target: str | Path) -> TaskStore:
    """The store at ``target``: PostgreSQL for ``postgresql://...``, else a SQLite file
    (a path, or ``sqlite:///path``). A PostgreSQL store connects on first use."""
    if is_postgres(target):
        from gateway.store.postgres import PostgresStore  # asyncpg only when used

        return PostgresStore(str(target))
    text = str(target)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
        # sqlite:////abs/path is absolute, sqlite:///rel/path relative (SQLAlchemy's rule).
    elif "://" in text:
        raise ValueError(f"store: {text!r} is neither a path, sqlite:/// nor postgresql://")
    return Store(Path(text))


__all__ = [
    "ACTIVE_STATES",
    "MIGRATIONS",
    "POSTGRES_SCHEMES",
    "TERMINAL_STATES",
    "SealedDecision",
    "Store",
    "Task",
    "TaskEvent",
    "TaskStore",
    "is_postgres",
    "migrate",
    "open_store",
]
