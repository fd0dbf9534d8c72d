"""Durable state. All SQL of the hub lives in this package.

Parts:

- ``migrations``: the schema as named, ordered migrations, each recorded in the
  transaction that applies it;
- ``records``: what the store hands back: ``Task`` (with its ``TaskEvent`` history) and
  the task states;
- ``sqlite``: ``Store``, one writer thread with group commit and a pool of readers (the
  Datasette pattern): tasks and their history, idempotency keys, revisions, decisions, alerts.
"""

from gateway.store.migrations import MIGRATIONS, migrate
from gateway.store.records import ACTIVE_STATES, TERMINAL_STATES, Task, TaskEvent
from gateway.store.sqlite import Store

__all__ = [
    "ACTIVE_STATES",
    "MIGRATIONS",
    "TERMINAL_STATES",
    "Store",
    "Task",
    "TaskEvent",
    "migrate",
]
