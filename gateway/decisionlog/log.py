"""The decision log as the hub uses it: mask, chain and append through the store; query.

Record shapes, masking and chain verification are pure functions in the sibling modules;
the SQL is the store's (``Store.append_decision`` and its neighbours). The chain head is
read inside the same write transaction that appends, so concurrent decisions cannot fork
the chain. ``prune`` exports the oldest records and replaces them with a checkpoint;
``verify`` proves the rest against it and against the hub's head witness
(``gateway.decisionlog.checkpoint``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.decisionlog.checkpoint import (
    UnknownCheckpoint,
    check_checkpoints,
    checkpoint_fields,
    seal_checkpoint,
    select_checkpoint,
    verify_export,
    verify_log,
)
from gateway.decisionlog.masking import Masker
from gateway.decisionlog.prune import PruneError, read_export, remove_export, write_export
from gateway.decisionlog.records import (
    GENESIS_HASH,
    now_rfc3339,
    record_to_row,
    row_to_json,
    seal_record,
)
from gateway.decisionlog.verify import VerifyReport
from gateway.errors import InvalidState, StoreUnavailable, UnknownDecision
from gateway.ids import uuid4_str
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.policy.engine import Decision
from gateway.store import SealedDecision, Store

log = get_logger(__name__)


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
        self._pending: set[asyncio.Future[Any]] = set()

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
        durable: bool = True,
    ) -> str:
        """Mask, chain and write one decision; return its id once the record is durable.

        With ``durable=False`` the id is returned at once and the record follows in the
        writer's next group commit (in order, in the same chain): for records whose caller
        need not wait, such as allowed reads. A failed write is logged, never lost silently.
        """
        sealed = self.prepare(
            kind=kind,
            path=path,
            input=input,
            decision=decision,
            revision=revision,
            subject=subject,
            agent=agent,
            task_id=task_id,
            secret_pointers=secret_pointers,
        )
        if not durable:
            pending = asyncio.ensure_future(
                self.store.append_decision(sealed.seal, genesis=sealed.genesis)
            )
            self._pending.add(pending)
            pending.add_done_callback(self._written)
            return sealed.decision_id
        row = await self.store.append_decision(sealed.seal, genesis=sealed.genesis)
        return str(row["decision_id"])

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
        """Mask one decision and make its record, for a write that appends it with more
        (the task it allowed): the caller's write is what makes it durable."""
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

        if self.metrics is not None:
            self.metrics.decisions.labels(kind, "allow" if decision.allow else "deny").inc()
        return SealedDecision(str(fields["decision_id"]), seal, GENESIS_HASH)

    async def append(self, sealed: SealedDecision) -> str:
        """Write a prepared record on its own (its change did not); its id once durable."""
        row = await self.store.append_decision(sealed.seal, genesis=sealed.genesis)
        return str(row["decision_id"])

    def _written(self, pending: asyncio.Future[Any]) -> None:
        self._pending.discard(pending)
        if not pending.cancelled() and pending.exception() is not None:
            log.error("decision record not written", extra={"error": str(pending.exception())})

    async def flush(self) -> None:
        """Wait until every record written with ``durable=False`` is in the store."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

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

    async def verify(
        self, *, expected_head: str | None = None, expected_count: int | None = None
    ) -> VerifyReport:
        """Verify the whole chain as stored: rows in physical (rowid) order, as raw rows,
        from the last checkpoint, its end against the head witness (or the head and count of
        records ever written given from outside).

        Raw rows, so that a malformed one is reported as a problem rather than raising; the
        whole check runs on a reader thread so a long log does not stall the event loop.
        Records still on their way to the store (``durable=False``) are waited for first.
        """
        await self.flush()

        def check(
            rows: Any, checkpoints: list[dict[str, Any]], witness: dict[str, Any] | None
        ) -> VerifyReport:
            return verify_log(
                rows,
                checkpoints=checkpoints,
                witness=witness,
                require_witness=True,
                expected_head=expected_head,
                expected_count=expected_count,
            )

        return await self.store.read_decision_chain(check)

    async def prune(
        self, export: Path, *, before: int | None = None, until: str | None = None
    ) -> dict[str, Any]:
        """Export the oldest records to the new file ``export``, then replace them with one
        checkpoint; return the checkpoint.

        The records before seq ``before``, or the oldest up to the timestamp ``until``.
        PruneError, with nothing deleted, when the log does not verify, there is nothing to
        prune or the export cannot be written; the export is on disk before any delete.
        """
        if (before is None) == (until is None):
            raise ValueError("prune: give exactly one of before, until")
        report = await self.verify()
        if not report.ok:
            first = report.problems[0]
            raise PruneError(
                f"the log does not verify ({len(report.problems)} problem(s), the first: "
                f"{first['kind']}: {first['message']}); nothing was deleted"
            )
        first_seq = report.start_seq
        through = await self.store.decision_prune_point(before=before, until=until)
        if through < first_seq:
            raise PruneError(f"nothing to prune: the log starts at seq {first_seq}")
        last = report.checkpoint
        start_hash = last["head_hash"] if last else GENESIS_HASH
        export = Path(export)

        def write(rows: Any) -> Any:
            records = (row_to_json(r) for r in rows)
            return write_export(export, records, first_seq=first_seq, start_hash=start_hash)

        written = await self.store.iter_decisions_range(first_seq, through, write)
        fields = checkpoint_fields(
            first_seq=first_seq,
            through_seq=through,
            start_hash=start_hash,
            head_hash=written.head_hash,
            export_sha256=written.sha256,
            export_name=export.name,
        )
        try:
            if written.count != through - first_seq + 1:
                raise InvalidState(f"the records up to seq {through} changed meanwhile")
            return await self.store.prune_decisions(
                first_seq=first_seq,
                through_seq=through,
                head_hash=written.head_hash,
                last_checkpoint=last["hash"] if last else None,
                seal=lambda id, prev_hash: seal_checkpoint(fields, id, prev_hash),
                genesis=GENESIS_HASH,
            )
        except (InvalidState, StoreUnavailable) as e:
            # Nothing was deleted: the export holds records still in the log, and would
            # only be mistaken for the export of a prune.
            remove_export(export)
            raise PruneError(f"{e.message}; nothing was deleted, the export removed") from e

    async def verify_export(
        self, export: Path, *, checkpoint_id: int | None = None
    ) -> VerifyReport:
        """Check an export file against the checkpoint of the prune that wrote it (the one
        named, else the one it matches). OSError if unreadable; UnknownCheckpoint if none."""
        records, sha256 = await asyncio.to_thread(read_export, Path(export))
        checkpoints, _ = check_checkpoints(await self.store.decision_checkpoints())
        first = records[0].get("seq") if records else None
        cp = select_checkpoint(
            checkpoints,
            sha256=sha256,
            first_seq=first if isinstance(first, int) else None,
            checkpoint_id=checkpoint_id,
        )
        if cp is None:
            which = f"checkpoint {checkpoint_id}" if checkpoint_id is not None else "checkpoint"
            raise UnknownCheckpoint(f"no {which} of this log matches {export}")
        return verify_export(records, checkpoint=cp, sha256=sha256)
