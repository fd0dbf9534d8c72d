"""Decision-log records (OPA's decision-log shape) chained by SHA-256 hashes.

Each record carries ``seq`` (1-based, gap-free), ``prev_hash`` (the ``hash`` of the record
before it, 64 zeros for the first) and ``hash`` = sha256(prev_hash + canonical JSON of every
field but ``hash``). ``gateway.decisionlog.verify`` recomputes the chain and names the record
at fault for an edit, a deletion, an insertion or a reordering.

The chain has no key: someone who can rewrite the whole tail of the log and recompute every
hash after the change goes unnoticed unless the verifier is given the head hash or count it
expects (``expected_head`` / ``expected_count``) from somewhere the attacker could not write.
The hub's own head witness, and the checkpoints a prune leaves, are checked by
``gateway.decisionlog.checkpoint.verify_log``.

``seal_record`` is the one function that extends a chain; ``record_to_row`` and
``row_to_json`` convert to and from the stored form (JSON text columns, 0/1 for ``allow``).

Inputs are masked before they are logged (``gateway.decisionlog.masking``).

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import contextlib
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
ROW_JSON_FIELDS = _JSON_FIELDS + _LIST_FIELDS  # stored as JSON text


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


def seal_record(fields: Mapping[str, Any], seq: int, prev_hash: str) -> dict[str, Any]:
    """``fields`` (every record field but the chain's) as record ``seq``, chained to ``prev_hash``.

    The one place a chain is extended (``DecisionLog.record`` and ``ChainBuilder``). Returns
    the record's JSON (``record_to_json``'s shape): the hub writes it without ever building
    the frozen record, which measured at a tenth of the cost of logging a decision.
    """
    body: dict[str, Any] = {**fields, "seq": seq, "prev_hash": prev_hash}
    body["hash"] = chain_hash(prev_hash, body)
    return body


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
        fields = {
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
        }
        record = DecisionRecord(**seal_record(fields, self.seq + 1, self.head))
        self.head, self.seq = record.hash, record.seq
        return record


# --- the stored form: JSON text columns, 0/1 for allow ----------------------------------


def record_to_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's JSON (``seal_record``'s output) as the row the store writes."""
    row = dict(record)
    for name in ROW_JSON_FIELDS:
        row[name] = json.dumps(row[name], sort_keys=True)
    row["allow"] = 1 if row["allow"] else 0
    return row


def _stored_record(row: Any) -> DecisionRecord:
    data = {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row)
    for name in ROW_JSON_FIELDS:
        if isinstance(data.get(name), str):
            data[name] = json.loads(data[name])
    data["allow"] = bool(data["allow"])
    return record_from_row(data)


def row_to_json(row: Any) -> dict[str, Any]:
    """A stored row as a record's JSON; a malformed row as its raw columns plus ``malformed``.

    Readers (list, show, the audit page, replay) must still show a row someone damaged, so
    that the damage can be seen; ``verify`` names it.
    """
    try:
        return record_to_json(_stored_record(row))
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
