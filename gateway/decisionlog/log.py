"""The decision log as the hub uses it: mask, chain and append through the store; query.

Record shapes, masking and chain verification are pure functions in the sibling modules;
the SQL is the store's (``Store.append_decision`` and its neighbours). The chain head is
read inside the same write transaction that appends, so concurrent decisions cannot fork
the chain.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.decisionlog.masking import Masker
from gateway.decisionlog.records import (
    GENESIS_HASH,
    now_rfc3339,
    record_to_row,
    row_to_json,
    seal_record,
)
from gateway.decisionlog.verify import VerifyReport, verify_chain
from gateway.errors import UnknownDecision
from gateway.ids import uuid4_str
from gateway.metrics import Metrics
from gateway.policy.engine import Decision
from gateway.store import Store


class DecisionLog:
    """Appends decisions to the store's ``decisions`` table and reads them back."""

    def __init__(
        self,
        store: Store,
        *,
        hub_id: str,
        metrics: Metrics | None = None,
        masking: list[tuple[str, str]] | None = None,
    ) -> None:
        self.store = store
        self.hub_id = hub_id
        self.metrics = metrics
        self.masking = masking or []

    async def start(self) -> None:
        """Nothing to prepare yet; kept so the hub's lifecycle is uniform."""

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
    ) -> str:
        """Mask, chain and write one decision; return its id."""
        rules = [*self.masking, *((p, "mask") for p in secret_pointers or [])]
        if rules:
            masked_input, erased, masked = Masker(rules).apply(input)
        else:
            # Nothing to mask: callers build the input for this one decision and do not
            # change it, so it is logged as is (the deep copy cost ~60 µs per message).
            masked_input, erased, masked = input, [], []
        fields: dict[str, Any] = {
            "decision_id": uuid4_str(),
            "timestamp": now_rfc3339(),
            "path": path,
            "input": masked_input,
            "result": decision.to_json(),
            "revision": revision,
            "labels": {"hub_id": self.hub_id, "version": __version__},
            "metrics": {"timer_rego_query_eval_ns": decision.eval_ns},
            "erased": erased,
            "masked": masked,
            "kind": kind,
            "allow": decision.allow,
            "subject": subject,
            "agent": agent,
            "task_id": task_id,
        }

        def seal(seq: int, prev_hash: str) -> dict[str, Any]:
            return record_to_row(seal_record(fields, seq, prev_hash))

        row = await self.store.append_decision(seal, genesis=GENESIS_HASH)
        if self.metrics is not None:
            self.metrics.decisions.labels(kind, "allow" if decision.allow else "deny").inc()
        return str(row["decision_id"])

    async def get(self, decision_id: str) -> dict[str, Any]:
        """One decision as JSON; UnknownDecision when absent."""
        row = await self.store.get_decision(decision_id)
        if row is None:
            raise UnknownDecision(f"no decision {decision_id!r}")
        return row_to_json(row)

    async def list(
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
        """Newest first, filtered; returns (records, cursor of the next page or None)."""
        rows, cursor = await self.store.list_decisions(
            allow=allow,
            agent=agent,
            subject=subject,
            kind=kind,
            since=since,
            until=until,
            limit=limit,
            before=before,
        )
        return [row_to_json(r) for r in rows], cursor

    async def verify(self) -> VerifyReport:
        """Verify the whole chain as stored: rows in physical (rowid) order, as raw rows.

        Raw rows, so that a malformed one is reported as a problem rather than raising; the
        whole check runs on a reader thread so a long log does not stall the event loop.
        """
        return await self.store.iter_decisions_raw(verify_chain)
