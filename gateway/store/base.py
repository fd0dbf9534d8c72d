"""``TaskStore``: the interface the hub uses, whichever database holds its state.

Two implementations: ``gateway.store.sqlite.Store`` (one file, the embedded default) and
``gateway.store.postgres.PostgresStore`` (one server that several hubs may share). Both
give the same guarantees: a transition is guarded inside its transaction (a task reaches a
terminal state exactly once, whoever races), an Idempotency-Key creates one task, the
decision log is one hash chain with serialized appends, and a write is durable before it
is acknowledged. Rows come back as plain dicts (decisions) or ``Task`` records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from gateway.store.records import SealedDecision, Task

T = TypeVar("T")

# seal(seq, prev_hash) -> the row to insert: how the decision log chains a record.
Seal = Callable[[int, str], dict[str, Any]]
ChainConsumer = Callable[[Iterator[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None], T]


@runtime_checkable
class TaskStore(Protocol):
    """Durable state: tasks and their history, idempotency keys, revisions, alerts and
    the hash-chained decision log. Every method may raise StoreUnavailable."""

    migrations_applied: list[str]

    async def close(self) -> None:
        """Finish the writes under way and release the database."""

    async def ping_write(self) -> None:
        """A real, durable write: the probe for 'store writable'."""

    # -- tasks

    async def create_task(
        self,
        row: dict[str, Any],
        idempotency: tuple[str, str, str] | None = None,
        *,
        keys_since: str | None = None,
        decisions: Sequence[SealedDecision] = (),
        states: Sequence[str] = ("pending",),
    ) -> tuple[Task, bool]:
        """Insert a pending task (and its (subject, key, request hash)) atomically; (task,
        created). A key already used for the same request returns its task and False; for
        another request, IdempotencyConflict; one recorded before ``keys_since`` is reused.
        ``decisions`` (those that allowed the call and the task) are appended, in order, in the
        same transaction. ``states`` is the history it is created with, the last its state
        (a task placed in a warm container at submission: pending, dispatched, running)."""

    async def task_for_key(
        self, subject: str, key: str, request_hash: str, *, since: str | None = None
    ) -> Task | None:
        """The task (with history) ``subject``'s Idempotency-Key created, or None."""

    async def prune_idempotency(self, before: str) -> int:
        """Delete the Idempotency-Keys recorded before ``before``; how many went."""

    async def transition(
        self,
        task_id: str,
        state: str,
        *,
        allowed_from: tuple[str, ...],
        detail: str | None = None,
        via: str | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> Task:
        """Move a task to ``state`` (through ``via`` first, if given) if it is in one of
        ``allowed_from`` (checked in the write's transaction), setting ``fields``; the task
        with its history. InvalidState if not; UnknownTask if absent. ``durable`` false:
        the commit need not be on disk when this returns (a later durable commit makes it
        so; a crash before may lose it, never a later commit)."""

    async def update_task(self, task_id: str, **fields: Any) -> None:
        """Set fields that are not a state change (e.g. the container id)."""

    async def get_task(self, task_id: str) -> Task:
        """One task with its state history; UnknownTask when absent."""

    async def ancestors(self, task_id: str) -> list[tuple[str, str]]:
        """(task id, agent) of every task ``task_id`` was delegated from, the root first."""

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        agent: str | None = None,
        subject: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[Task], int | None]:
        """Newest first, filtered; (tasks, the cursor of the next page or None)."""

    async def page(
        self,
        table: str,
        conditions: list[tuple[str, Any]],
        *,
        order: str,
        limit: int,
        before: int | None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Rows of ``table`` newest first by ``order`` (``rowid``: insertion order),
        keyset-paginated; ``conditions`` are ``(sql with one ?, value)``, None no filter."""

    async def active_tasks(self) -> list[Task]:
        """Every task not yet in a terminal state, oldest first."""

    async def count_tasks_by_state(self) -> dict[str, int]:
        """How many tasks are in each state."""

    async def dispatch_watch(self, since: str) -> tuple[int, str | None]:
        """(tasks pending since ``since`` or longer, when the last dispatch happened)."""

    async def active_task_ids(self) -> set[str]:
        """The ids of every task not yet in a terminal state."""

    # -- revisions and alerts

    async def record_policy_revision(self, revision: str, modules: list[str]) -> None:
        """Remember a policy revision that was put in force (idempotent)."""

    async def record_alert(self, alert: dict[str, Any]) -> None:
        """Persist an alert raised, or its resolution (matched by name)."""

    async def record_registry(self, revision: str, source: str, agents: dict[str, Any]) -> None:
        """Remember a loaded registry revision (idempotent)."""

    # -- decisions

    async def append_decision(self, seal: Seal, *, genesis: str) -> dict[str, Any]:
        """Insert ``seal(next seq, head hash)`` and move the head witness with it, serialized
        with every other append to the same log (one chain); return the row."""

    async def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        """The stored row of one decision, or None."""

    async def list_decisions(
        self,
        *,
        allow: bool | None = None,
        agent: str | None = None,
        subject: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Stored decision rows newest first, filtered; (rows, the next page's cursor)."""

    async def iter_decisions_raw(self, consume: Callable[[Iterator[dict[str, Any]]], T]) -> T:
        """``consume(rows)`` off the event loop, rows as stored, in storage order."""

    async def read_decision_chain(self, consume: ChainConsumer[T]) -> T:
        """``consume(rows, checkpoints, witness)`` off the event loop, from one snapshot."""

    async def decision_checkpoints(self) -> list[dict[str, Any]]:
        """Every prune's checkpoint row, oldest first."""

    async def decision_prune_point(self, *, before: int | None, until: str | None) -> int:
        """The last seq a prune before seq ``before`` (or up to timestamp ``until``) removes."""

    async def iter_decisions_range(
        self, first_seq: int, through_seq: int, consume: Callable[[Iterator[dict[str, Any]]], T]
    ) -> T:
        """``consume(rows)`` off the event loop: the rows seq ``first_seq..through_seq``."""

    async def prune_decisions(
        self,
        *,
        first_seq: int,
        through_seq: int,
        head_hash: str,
        last_checkpoint: str | None,
        seal: Seal,
        genesis: str,
    ) -> dict[str, Any]:
        """Delete seq ``first_seq..through_seq`` and insert the checkpoint ``seal`` makes,
        in one transaction; InvalidState, nothing changed, if the log moved meanwhile."""
