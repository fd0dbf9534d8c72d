"""What the routers need of the decision log: a Protocol, so they take any sink (tests
hand them fakes) and the log's storage stays behind it."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.policy.engine import Decision
from gateway.store.records import SealedDecision


class DecisionSink(Protocol):
    """Where decisions go (the decision log)."""

    async def record(
        self,
        *,
        kind: str,
        path: str,
        input: dict[str, Any],
        decision: Decision,
        revision: str,
        subject: str | None,
        agent: str | None,
        task_id: str | None,
        secret_pointers: list[str] | None = None,
        durable: bool = True,
    ) -> str:
        """Write one decision; return its id (once durable, unless ``durable`` is False)."""
        ...

    def prepare(
        self,
        *,
        kind: str,
        path: str,
        input: dict[str, Any],
        decision: Decision,
        revision: str,
        subject: str | None,
        agent: str | None,
        task_id: str | None,
        secret_pointers: list[str] | None = None,
    ) -> SealedDecision:
        """Make one decision's record for a write that appends it with more (the task)."""
        ...

    async def append(self, sealed: SealedDecision) -> str:
        """Write a prepared record on its own (its change did not); its id once durable."""
        ...
