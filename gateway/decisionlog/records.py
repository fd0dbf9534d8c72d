"""Decision-log records (OPA's decision-log shape) chained by SHA-256 hashes.

Each record carries ``seq`` (1-based, gap-free), ``prev_hash`` (the ``hash`` of the record
before it, 64 zeros for the first) and ``hash`` = sha256(prev_hash + canonical JSON of every
field but ``hash``). ``gateway.decisionlog.verify`` recomputes the chain and names the record
at fault for an edit, a deletion, an insertion or a reordering.

The chain has no key: someone who can rewrite the whole tail of the log and recompute every
hash after the change goes unnoticed unless the verifier is given the head hash or count it
expects (``expected_head`` / ``expected_count``) from somewhere the attacker could not write.

Inputs are masked before they are logged (``gateway.decisionlog.masking``).

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gateway.clock import now_rfc3339

GENESIS_HASH = "0" * 64

_JSON_FIELDS = ("input", "result", "labels", "metrics")
_LIST_FIELDS = ("erased", "masked")


@dataclass(frozen=True)
class DecisionRecord:
    """One policy decision as logged: OPA's decision-log fields, summary fields, chain fields."""

    seq: int
    decision_id: str
    timestamp: str
    path: str
    input: dict[str, Any]
    result: dict[str, Any]
    revision: str
    labels: dict[str, Any]
    metrics: dict[str, Any]
    erased: list[str]
    masked: list[str]
    kind: str
    allow: bool
    subject: str | None
    agent: str | None
    task_id: str | None
    prev_hash: str
    hash: str


_FIELD_NAMES = tuple(f.name for f in fields(DecisionRecord))
_PARSED_FIELDS = frozenset(_JSON_FIELDS + _LIST_FIELDS)


def record_to_json(record: DecisionRecord) -> dict[str, Any]:
    """The record as a plain JSON-able dict (input, result, labels, metrics stay dicts)."""
    # Shallow on purpose: dataclasses.asdict deep-copies every nested value, which measured
    # at ten times the cost of hashing the record.
    return {name: getattr(record, name) for name in _FIELD_NAMES}


def record_from_row(row: Mapping[str, Any]) -> DecisionRecord:
    """Build a record from a stored row; JSON text columns and SQLite 0/1 booleans are accepted."""
    values: dict[str, Any] = {}
    # By name from a precomputed tuple: dataclasses.fields() per row measured at a tenth
    # of the cost of verifying a stored log.
    for name in _FIELD_NAMES:
        if name not in row:
            raise ValueError(f"decision row lacks field {name!r}")
        value = row[name]
        if name in _PARSED_FIELDS:
            if value == "[]":
                value = []  # erased/masked are usually empty: skip the parser
            elif isinstance(value, str | bytes):
                value = json.loads(value)
            if value is None:
                value = [] if name in _LIST_FIELDS else {}
        elif name == "allow" and isinstance(value, int) and value in (0, 1):
            # SQLite has no boolean type; without this the hash would not match.
            value = bool(value)
        values[name] = value
    return DecisionRecord(**values)


def canonical_bytes(record: DecisionRecord | Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no whitespace, UTF-8) of every field except ``hash``."""
    body = record_to_json(record) if isinstance(record, DecisionRecord) else dict(record)
    body.pop("hash", None)
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def chain_hash(prev_hash: str, record: DecisionRecord | Mapping[str, Any]) -> str:
    """sha256(prev_hash + canonical_bytes(record)) as hex."""
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(canonical_bytes(record))
    return h.hexdigest()


class ChainBuilder:
    """Appends records to a chain, keeping its head (last hash and seq) in memory."""

    def __init__(self, last_hash: str = GENESIS_HASH, last_seq: int = 0) -> None:
        self.head = last_hash
        self.seq = last_seq

    def append(
        self,
        *,
        path: str,
        input: dict[str, Any],
        result: dict[str, Any],
        revision: str,
        kind: str,
        allow: bool,
        labels: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        erased: list[str] | None = None,
        masked: list[str] | None = None,
        subject: str | None = None,
        agent: str | None = None,
        task_id: str | None = None,
        decision_id: str | None = None,
        timestamp: str | None = None,
    ) -> DecisionRecord:
        """Make the next record, chained to the current head, and advance the head."""
        body: dict[str, Any] = {
            "seq": self.seq + 1,
            "decision_id": decision_id or str(uuid.uuid4()),
            "timestamp": timestamp or now_rfc3339(),
            "path": path,
            "input": input,
            "result": result,
            "revision": revision,
            "labels": labels or {},
            "metrics": metrics or {},
            "erased": list(erased or []),
            "masked": list(masked or []),
            "kind": kind,
            "allow": bool(allow),
            "subject": subject,
            "agent": agent,
            "task_id": task_id,
            "prev_hash": self.head,
        }
        # Hash the dict and build the frozen record once: building it twice cost more
        # than the hash itself.
        record = DecisionRecord(**body, hash=chain_hash(self.head, body))
        self.head, self.seq = record.hash, record.seq
        return record
