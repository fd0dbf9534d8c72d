"""The decision log as the hub uses it: mask, chain, store, query, and its CLI.

Record shapes, masking and chain verification live in ``gateway.decisionlog.records`` (pure
functions); this module adds the SQLite side. The chain head is read inside the same write
transaction that appends, so concurrent decisions cannot fork the chain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

from gateway import __version__
from gateway.decisionlog.masking import Masker
from gateway.decisionlog.records import (
    GENESIS_HASH,
    DecisionRecord,
    chain_hash,
    now_rfc3339,
    record_from_row,
    record_to_json,
)
from gateway.decisionlog.verify import VerifyReport, verify_chain
from gateway.errors import UnknownDecision
from gateway.ids import uuid4_str
from gateway.metrics import Metrics
from gateway.policy.engine import Decision
from gateway.store import Store

ROW_JSON_FIELDS = ("input", "result", "labels", "metrics", "erased", "masked")


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

        def tx(db: Any) -> str:
            last = db.execute(
                "SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq = (last["seq"] + 1) if last else 1
            prev = last["hash"] if last else GENESIS_HASH
            record = {**fields, "seq": seq, "prev_hash": prev}
            record["hash"] = chain_hash(prev, record)
            row = dict(record)
            for name in ROW_JSON_FIELDS:
                row[name] = json.dumps(row[name], sort_keys=True)
            row["allow"] = 1 if row["allow"] else 0
            # A plain INSERT: sqlite-utils' insert() introspects the table on every call,
            # which cost more than the rest of the write (bench/bench_messages.py).
            db.conn.execute(
                f"INSERT INTO decisions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            return str(record["decision_id"])

        decision_id = await self.store.write(tx)
        if self.metrics is not None:
            self.metrics.decisions.labels(kind, "allow" if decision.allow else "deny").inc()
        return decision_id

    async def get(self, decision_id: str) -> dict[str, Any]:
        """One decision as JSON; UnknownDecision when absent."""

        def q(db: Any) -> Any:
            return db.execute(
                "SELECT * FROM decisions WHERE decision_id = ?", [decision_id]
            ).fetchone()

        row = await self.store.read(q)
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
        rows, cursor = await self.store.page(
            "decisions",
            [
                ("allow = ?", None if allow is None else int(allow)),
                ("agent = ?", agent),
                ("subject = ?", subject),
                ("kind = ?", kind),
                ("timestamp >= ?", since),
                ("timestamp <= ?", until),
            ],
            order="seq",
            limit=limit,
            before=before,
        )
        return [row_to_json(r) for r in rows], cursor

    async def verify(self) -> VerifyReport:
        """Verify the whole chain as stored: rows in physical (rowid) order, as raw rows.

        Raw rows, so that a malformed one is reported as a problem rather than raising; the
        whole check runs on a reader thread so a long log does not stall the event loop.
        """

        def check(db: Any) -> VerifyReport:
            cursor = db.execute("SELECT * FROM decisions ORDER BY rowid")
            return verify_chain(dict(row) for row in cursor)

        return await self.store.read(check)


def _record(row: Any) -> DecisionRecord:
    data = {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row)
    for name in ROW_JSON_FIELDS:
        if isinstance(data.get(name), str):
            data[name] = json.loads(data[name])
    data["allow"] = bool(data["allow"])
    return record_from_row(data)


def row_to_json(row: Any) -> dict[str, Any]:
    """A stored row as a record's JSON; a malformed row as its raw columns plus ``malformed``.

    Readers (list, show, the audit page) must still show a row someone damaged, so that the
    damage can be seen; ``verify`` names it.
    """
    try:
        return record_to_json(_record(row))
    except (ValueError, TypeError, KeyError) as e:
        raw = {k: row[k] for k in row.keys() if k != "_cursor"}  # noqa: SIM118 (sqlite3.Row)
        for k, v in raw.items():
            if isinstance(v, bytes):
                raw[k] = v.hex()
            elif k in ROW_JSON_FIELDS and isinstance(v, str):
                with contextlib.suppress(ValueError):
                    raw[k] = json.loads(v)
        result = raw.get("result")
        raw["result"] = result if isinstance(result, dict) else {}
        raw["malformed"] = f"{type(e).__name__}: {e}"
        return raw


# --- CLI: agent-gateway decisions list|show|verify|export -------------------------------


def run_cli(args: argparse.Namespace) -> int:
    """Run a ``decisions`` subcommand against the state directory's database."""
    db_path = args.state_dir / "gateway.db"
    if not db_path.exists():
        print(f"error: no database at {db_path}", file=sys.stderr)
        return 2
    if args.decisions_command == "replay":
        from gateway.decisionlog.replay import run_replay

        return run_replay(args, db_path)

    async def run() -> int:
        store = Store(db_path)
        log = DecisionLog(store, hub_id="cli")
        try:
            return await _dispatch(args, log)
        finally:
            await store.close()

    return asyncio.run(run())


async def _dispatch(args: argparse.Namespace, log: DecisionLog) -> int:
    cmd = args.decisions_command
    if cmd == "show":
        try:
            print(json.dumps(await log.get(args.decision_id), indent=2))
        except UnknownDecision as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 1
        return 0
    if cmd == "verify":
        report = await log.verify()
        for problem in report.problems:
            print(
                f"{problem['kind'].upper()}: seq {problem['seq']} "
                f"({problem['decision_id']}): {problem['message']}"
            )
        state = "OK" if report.ok else "TAMPERED"
        print(f"{state}: {report.checked} records checked, head {report.head}")
        return 0 if report.ok else 1
    allow = None if args.decision is None else args.decision == "allow"
    records: list[dict[str, Any]] = []
    before = None
    while len(records) < args.limit:
        page, before = await log.list(
            allow=allow,
            agent=args.agent,
            subject=args.subject,
            kind=args.kind,
            since=args.since,
            until=args.until,
            limit=min(500, args.limit - len(records)),
            before=before,
        )
        records.extend(page)
        if before is None:
            break
    if cmd == "export":
        for rec in reversed(records):
            sys.stdout.write(json.dumps(rec, sort_keys=True) + "\n")
        return 0
    for rec in records:
        verdict = "allow" if rec["result"].get("allow") is True else "deny "
        reasons = "; ".join(str(r) for r in rec["result"].get("reasons") or [])
        if "malformed" in rec:
            reasons = f"MALFORMED ROW ({rec['malformed']})"
        print(
            f"{rec.get('timestamp')}  {verdict}  {rec.get('kind') or '-':8}  "
            f"{rec.get('subject') or '-':10} {rec.get('agent') or '-':10} "
            f"{rec.get('decision_id')}  {reasons}"
        )
    return 0
