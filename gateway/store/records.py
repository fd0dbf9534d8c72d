"""What the store hands back: typed, immutable records instead of rows.

``Task`` has one field per column of the ``tasks`` table (JSON columns decoded) and, when
read with it, its state history. The types are those of the rows the hub writes; a row it
did not write (from an old database, or by hand) may hold None in any column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

TERMINAL_STATES = ("succeeded", "failed", "timed_out", "cancelled")
ACTIVE_STATES = ("pending", "dispatched", "running")


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One state a task entered, when, and why (``detail``, e.g. a re-dispatch reason)."""

    state: str
    at: str
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as the API shows it (no ``detail`` key when there is none)."""
        out: dict[str, Any] = {"state": self.state, "at": self.at}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True, slots=True)
class Task:
    """A task as stored.

    ``history`` is None unless the task was read with it (``Store.get_task``): a task read
    with its history always has at least its ``pending`` event, but a row from an old
    database may have none, and the API still shows its empty history then.
    """

    id: str
    state: str
    agent: str
    capability: str | None
    subject: str | None
    input: Any
    timeout_s: float
    deadline: float
    decision_id: str | None
    sandbox: dict[str, Any] | None
    container_id: str | None
    container_name: str | None
    result: Any
    error: dict[str, Any] | None
    labels: dict[str, Any] | None
    attempts: int
    parent_id: str | None
    idempotency_key: str | None
    created_at: str
    updated_at: str
    instance_id: str | None
    key_id: str | None
    # "warm" (a pooled container) or "cold" (one started for it); None before dispatch.
    dispatch: str | None = None
    history: tuple[TaskEvent, ...] | None = None

    @property
    def terminal(self) -> bool:
        """Whether the task has ended (one of ``TERMINAL_STATES``)."""
        return self.state in TERMINAL_STATES


# The columns of ``tasks`` that a Task carries (every field but ``history``).
TASK_COLUMNS = tuple(f.name for f in fields(Task) if f.name != "history")


@dataclass(frozen=True, slots=True)
class SealedDecision:
    """A decision record ready to append: ``seal(seq, prev_hash)`` makes its row once the
    writer knows the chain head; ``genesis`` is the hash the first record chains to."""

    decision_id: str
    seal: Callable[[int, str], dict[str, Any]]
    genesis: str
