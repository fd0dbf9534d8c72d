"""Decision-log records (OPA's decision-log shape) chained by SHA-256 hashes.

Each record carries ``seq`` (1-based, gap-free), ``prev_hash`` (the ``hash`` of the record
before it, 64 zeros for the first) and ``hash`` = sha256(prev_hash + canonical JSON of every
field but ``hash``). ``verify_chain`` recomputes the chain and names the record at fault for
an edit, a deletion, an insertion or a reordering.

The chain has no key: someone who can rewrite the whole tail of the log and recompute every
hash after the change goes unnoticed unless the verifier is given the head hash or count it
expects (``expected_head`` / ``expected_count``) from somewhere the attacker could not write.

Inputs are masked before they are logged: ``Masker`` erases or redacts fields named by JSON
pointers (RFC 6901, ``*`` matching any key or index), and ``pointers_marked_secret`` finds the
pointers an agent's input schema marks ``"x-secret": true``.

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.errors import ConfigError

GENESIS_HASH = "0" * 64
REDACTED = "**REDACTED**"

ProblemKind = Literal["edited", "deleted", "inserted", "reordered"]
MaskAction = Literal["erase", "mask"]

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


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


# --- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of ``verify_chain``; ``problems`` are in log order."""

    ok: bool
    checked: int
    problems: list[dict[str, Any]] = field(default_factory=list)
    head: str = GENESIS_HASH

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        return asdict(self)


def _short(h: str) -> str:
    return str(h)[:12]


def _hash_matches(r: DecisionRecord, seq: int | None = None) -> bool:
    """Whether ``r`` matches its own hash (as if its seq were ``seq``, when given)."""
    body = record_to_json(r)
    if seq is not None:
        body["seq"] = seq
    try:
        return chain_hash(r.prev_hash, body) == r.hash
    except (TypeError, ValueError, AttributeError):
        # A value JSON cannot hold (bytes, NaN) or a non-string prev_hash: tampered.
        return False


def _check_types(r: DecisionRecord) -> DecisionRecord:
    if isinstance(r.seq, bool) or not isinstance(r.seq, int):
        raise ValueError(f"seq is {r.seq!r}, not an integer")
    for name in ("prev_hash", "hash"):
        if not isinstance(getattr(r, name), str):
            raise ValueError(f"{name} is not a string")
    return r


def _name(r: DecisionRecord) -> str:
    return f"record seq {r.seq} ({r.decision_id})"


def _seq_range(lo: int, hi: int) -> str:
    return f"record seq {lo} was" if lo == hi else f"records seq {lo}..{hi} were"


def _longest_increasing(seqs: list[int]) -> set[int]:
    """Indexes (into ``seqs``) of one longest strictly increasing subsequence."""
    tails: list[int] = []  # smallest tail seq of an increasing run of each length
    tail_idx: list[int] = []
    parent = [-1] * len(seqs)
    for i, s in enumerate(seqs):
        k = bisect.bisect_left(tails, s)
        if k == len(tails):
            tails.append(s)
            tail_idx.append(i)
        else:
            tails[k], tail_idx[k] = s, i
        parent[i] = tail_idx[k - 1] if k else -1
    keep: set[int] = set()
    i = tail_idx[-1] if tail_idx else -1
    while i >= 0:
        keep.add(i)
        i = parent[i]
    return keep


def _recover_seqs(
    recs: list[DecisionRecord], mismatched: list[int], genesis: str, start_seq: int
) -> dict[int, int]:
    """Give back their own seq to records that match their hash under another one.

    Candidates come from the links (the record chained before one, plus one; the record
    chained after it, minus one), in two passes so that two swapped neighbours find each
    other. Returns {position: the seq it was stored under}; ``recs`` is updated in place.
    """
    by_hash: dict[str, list[int]] = {}
    by_prev: dict[str, list[int]] = {}
    for pos, r in enumerate(recs):
        by_hash.setdefault(r.hash, []).append(pos)
        by_prev.setdefault(r.prev_hash, []).append(pos)
    renumbered: dict[int, int] = {}
    for _ in range(2):
        for pos in mismatched:
            if pos in renumbered:
                continue
            r = recs[pos]
            candidates = {recs[q].seq + 1 for q in by_hash.get(r.prev_hash, ())}
            candidates |= {recs[q].seq - 1 for q in by_prev.get(r.hash, ())}
            if r.prev_hash == genesis:
                candidates.add(start_seq)
            candidates.discard(r.seq)
            for seq in sorted(candidates):
                if _hash_matches(r, seq):
                    renumbered[pos] = r.seq
                    recs[pos] = replace(r, seq=seq)
                    break
    return renumbered


def verify_chain(
    records: Iterable[DecisionRecord | Mapping[str, Any]],
    *,
    expected_count: int | None = None,
    expected_head: str | None = None,
    genesis: str = GENESIS_HASH,
    start_seq: int = 1,
) -> VerifyReport:
    """Check a chain given in log order and name every edited, deleted, inserted or moved record.

    ``expected_count`` / ``expected_head`` (from the hub's own counter) also catch records
    cut from or appended to the end; ``genesis`` / ``start_seq`` verify a slice of the log.
    """
    recs: list[DecisionRecord] = []
    malformed: set[int] = set()
    problems: list[tuple[int, dict[str, Any]]] = []  # (position, problem) for sorting

    def report(pos: int, r: DecisionRecord | None, kind: ProblemKind, message: str) -> None:
        problems.append(
            (
                pos,
                {
                    "seq": r.seq if r else None,
                    "decision_id": r.decision_id if r else None,
                    "kind": kind,
                    "message": message,
                },
            )
        )

    for pos, raw in enumerate(records):
        if isinstance(raw, DecisionRecord):
            recs.append(raw)
            continue
        try:
            recs.append(_check_types(record_from_row(raw)))
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            # Keep a placeholder so positions stay right; it can match no hash.
            seq = raw.get("seq")
            stub = DecisionRecord(
                seq=seq if isinstance(seq, int) else 0,
                decision_id=str(raw.get("decision_id")),
                timestamp="",
                path="",
                input={},
                result={},
                revision="",
                labels={},
                metrics={},
                erased=[],
                masked=[],
                kind="",
                allow=False,
                subject=None,
                agent=None,
                task_id=None,
                prev_hash=str(raw.get("prev_hash") or ""),
                hash=str(raw.get("hash") or ""),
            )
            recs.append(stub)
            malformed.add(pos)
            report(pos, stub, "edited", f"row at position {pos} is malformed: {e}")

    # 1. Edits: a record whose content no longer matches its own hash. One that matches it
    # under another seq was moved, not edited: where seq is the table's row id (SQLite), a
    # reordering or an insertion in the middle must renumber the records it moves.
    mismatched = [p for p in range(len(recs)) if p not in malformed and not _hash_matches(recs[p])]
    renumbered = _recover_seqs(recs, mismatched, genesis, start_seq)
    edited: set[int] = set(malformed)
    for pos in mismatched:
        if pos not in renumbered:
            edited.add(pos)
            r = recs[pos]
            report(pos, r, "edited", f"{_name(r)} was edited: its content does not match its hash")

    # 2. Insertions: the record after it is chained to the record before it, and nothing is
    # chained to it; or it repeats another record's seq and nothing is chained to it.
    referenced = Counter(r.prev_hash for r in recs)

    def hash_at(pos: int) -> str:
        return genesis if pos < 0 else recs[pos].hash

    inserted: set[int] = set()
    for pos in range(1, len(recs)):
        r, before = recs[pos], recs[pos - 1]
        if (
            r.prev_hash != before.hash
            and r.prev_hash == hash_at(pos - 2)
            and referenced[before.hash] == 0
            and pos - 1 not in inserted
        ):
            inserted.add(pos - 1)
            report(
                pos - 1,
                before,
                "inserted",
                f"{_name(before)} was inserted: the record after it, {_name(r)}, "
                f"is chained to the record before it",
            )
    by_seq: dict[int, list[int]] = {}
    for pos, r in enumerate(recs):
        if pos not in inserted:
            by_seq.setdefault(r.seq, []).append(pos)
    for seq, positions in by_seq.items():
        if len(positions) < 2:
            continue
        orphans = [p for p in positions if referenced[recs[p].hash] == 0]
        # The genuine one is normally chained to; at the end of the log neither is, so the
        # later copy is the intruder.
        intruders = orphans if len(orphans) < len(positions) else positions[1:]
        for p in intruders:
            inserted.add(p)
            report(
                p,
                recs[p],
                "inserted",
                f"{_name(recs[p])} was inserted: another record already has seq {seq}",
            )

    genuine = [p for p in range(len(recs)) if p not in inserted]
    seq_to_pos = {recs[p].seq: p for p in genuine}

    # 3. Reordering: records outside one longest run of increasing seq are out of place.
    in_order = {genuine[i] for i in _longest_increasing([recs[p].seq for p in genuine])}
    for i, p in enumerate(genuine):
        if p in in_order:
            continue
        r = recs[p]
        after = recs[genuine[i - 1]] if i else None
        where = f"after seq {after.seq}" if after else "first"
        stored = f" (stored as seq {renumbered[p]})" if p in renumbered else ""
        report(
            p,
            r,
            "reordered",
            f"{_name(r)} is out of order: it appears {where} at position {p}{stored}",
        )
    # Moved records still in order (e.g. renumbered to make room for an insertion), one
    # problem per run of records moved by the same offset.
    runs: list[list[int]] = []
    for p in sorted(renumbered):
        if p in in_order and p not in inserted:
            offset = renumbered[p] - recs[p].seq
            last = runs[-1][-1] if runs else None
            if last is not None and last == p - 1 and renumbered[last] - recs[last].seq == offset:
                runs[-1].append(p)
            else:
                runs.append([p])
    for run in runs:
        first, last = recs[run[0]], recs[run[-1]]
        if len(run) == 1:
            what = f"{_name(first)} was moved: it is stored as seq {renumbered[run[0]]}"
        else:
            what = (
                f"records seq {first.seq}..{last.seq} were renumbered: stored as seq "
                f"{renumbered[run[0]]}..{renumbered[run[-1]]}"
            )
        report(run[0], first, "reordered", what)

    # 4. Links, by seq so that a reordering is not also reported as a break: each record must
    # be chained to the record with the seq before it.
    present = sorted(seq_to_pos)
    for p in genuine:
        r = recs[p]
        if r.seq == start_seq:
            if r.prev_hash != genesis:
                report(
                    p,
                    r,
                    "edited",
                    f"{_name(r)} is the first record but is chained to {_short(r.prev_hash)}, "
                    f"not the start of the log",
                )
            continue
        pred_pos = seq_to_pos.get(r.seq - 1)
        if pred_pos is None:
            k = bisect.bisect_left(present, r.seq)
            lower = present[k - 1] if k else start_seq - 1
            if r.seq <= start_seq:
                report(p, r, "edited", f"{_name(r)} has a seq below the start of the log")
                continue
            follows = f"seq {lower}" if lower >= start_seq else "the start of the log"
            report(
                p,
                r,
                "deleted",
                f"{_name(r)} follows {follows} but was chained to {_short(r.prev_hash)}: "
                f"{_seq_range(lower + 1, r.seq - 1)} deleted",
            )
            continue
        pred = recs[pred_pos]
        if r.prev_hash != pred.hash and pred_pos not in edited and p not in edited:
            # The predecessor's content matches its own (new) hash: it was rewritten and
            # re-hashed after this record was chained to it.
            report(
                pred_pos,
                pred,
                "edited",
                f"{_name(pred)} was replaced or edited and re-hashed: {_name(r)} was chained "
                f"to {_short(r.prev_hash)}, not {_short(pred.hash)}",
            )

    # 5. The end of the log, against what the caller knows independently.
    last = recs[genuine[-1]] if genuine else None
    max_seq = max(present) if present else start_seq - 1
    if expected_count is not None:
        want_last = start_seq + expected_count - 1
        if max_seq < want_last:
            report(
                len(recs),
                None,
                "deleted",
                f"the log ends at seq {max_seq} but {expected_count} records were expected: "
                f"{_seq_range(max_seq + 1, want_last)} deleted from the end",
            )
        elif max_seq > want_last:
            extra = recs[seq_to_pos[max_seq]]
            report(
                seq_to_pos[max_seq],
                extra,
                "inserted",
                f"the log runs to seq {max_seq} but only {expected_count} records were expected: "
                f"records after seq {want_last} were appended",
            )
    head = recs[-1].hash if recs else genesis
    if expected_head is not None and expected_head != head:
        at = next((p for p, r in enumerate(recs) if r.hash == expected_head), None)
        if at is not None:
            report(
                at + 1,
                recs[at + 1] if at + 1 < len(recs) else None,
                "inserted",
                f"the expected head {_short(expected_head)} is seq {recs[at].seq}: "
                f"the records after it were appended",
            )
        else:
            report(
                len(recs),
                last,
                "deleted",
                f"the expected head {_short(expected_head)} is not in the log: records were "
                f"deleted from the end or the chain was rewritten",
            )

    problems.sort(key=lambda item: item[0])
    return VerifyReport(
        ok=not problems, checked=len(recs), problems=[p for _, p in problems], head=head
    )


# --- masking ------------------------------------------------------------------------------


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _parse_pointer(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ConfigError(f"masking rule {pointer!r} is not a JSON pointer (must start with /)")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _is_index(token: str, size: int) -> bool:
    return token.isdigit() and (token == "0" or not token.startswith("0")) and int(token) < size


def _expand(doc: Any, tokens: list[str]) -> list[tuple[Any, str | int, str]]:
    """Every existing (parent, key, concrete pointer) that ``tokens`` names in ``doc``."""
    found: list[tuple[Any, str | int, str]] = []

    def walk(node: Any, i: int, prefix: str) -> None:
        token = tokens[i]
        last = i == len(tokens) - 1
        if isinstance(node, dict):
            keys: list[str | int] = list(node) if token == "*" else [token] if token in node else []
        elif isinstance(node, list):
            if token == "*":
                keys = list(range(len(node)))
            else:
                keys = [int(token)] if _is_index(token, len(node)) else []
        else:
            return
        for key in keys:
            pointer = f"{prefix}/{_escape(str(key))}"
            if last:
                found.append((node, key, pointer))
            else:
                walk(node[key], i + 1, pointer)  # type: ignore[index]

    walk(doc, 0, "")
    return found


def _copy_json(value: Any) -> Any:
    """Copy the dicts and lists of a JSON-like value; scalars are immutable and shared."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    if isinstance(value, tuple | set | frozenset):
        return copy.deepcopy(value)
    return value


def parse_mask_rule(rule: str) -> tuple[str, MaskAction]:
    """``"mask:/p"``, ``"erase:/p"`` or a bare ``"/p"`` (mask) as (pointer, action)."""
    if rule.startswith("/"):
        action, pointer = "mask", rule
    else:
        action, _, pointer = rule.partition(":")
    if action not in ("mask", "erase"):
        raise ConfigError(f"masking rule {rule!r}: the action must be 'mask' or 'erase'")
    _parse_pointer(pointer)
    return pointer, "erase" if action == "erase" else "mask"


class Masker:
    """Erase or redact the fields of a decision input named by JSON-pointer rules."""

    def __init__(self, rules: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        """``rules`` maps a pointer (``*`` = any key or index) to ``"erase"`` or ``"mask"``."""
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        self.rules: list[tuple[str, list[str], str]] = []
        for pointer, action in items:
            if action not in ("erase", "mask"):
                raise ConfigError(
                    f"masking rule {pointer!r}: action must be erase or mask, not {action!r}"
                )
            self.rules.append((pointer, _parse_pointer(pointer), action))

    def with_pointers(self, pointers: Iterable[str], action: MaskAction = "mask") -> Masker:
        """A new Masker with extra pointers (e.g. from ``pointers_marked_secret``)."""
        extra = [(p, action) for p in pointers]
        return Masker([(p, a) for p, _, a in self.rules] + extra)

    def apply(self, document: Any) -> tuple[Any, list[str], list[str]]:
        """Return (masked copy, erased pointers, masked pointers); ``document`` is not touched."""
        # A full copy, so the logged input never aliases a live object that might change
        # after it was hashed; _copy_json is about 3x cheaper than copy.deepcopy here.
        doc = _copy_json(document)
        erased: list[str] = []
        masked: list[str] = []
        # Erasures first, so a field both erased and masked is reported once, as erased.
        for wanted in ("erase", "mask"):
            for _, tokens, action in self.rules:
                if action != wanted:
                    continue
                hits = _expand(doc, tokens)
                if action == "mask":
                    for parent, key, pointer in hits:
                        if pointer not in masked:
                            parent[key] = REDACTED
                            masked.append(pointer)
                    continue
                # Delete list items from the highest index down so earlier indexes stay valid.
                for parent, key, pointer in sorted(
                    hits, key=lambda h: h[1] if isinstance(h[1], int) else -1, reverse=True
                ):
                    del parent[key]
                    erased.append(pointer)
        return doc, sorted(erased), sorted(masked)


def pointers_marked_secret(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Pointers (under ``prefix``) of the properties a JSON Schema marks ``"x-secret": true``.

    Follows properties, items, prefixItems, additional/pattern properties (as ``*``), the
    allOf/anyOf/oneOf/then/else branches and local ``#/...`` references.
    """
    found: list[str] = []
    seen_refs: set[str] = set()

    def resolve(ref: str) -> Any:
        node: Any = schema
        for token in ref[2:].split("/") if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or token not in node:
                return None
            node = node[token]
        return node

    def walk(node: Any, at: str) -> None:
        if not isinstance(node, Mapping):
            return
        if node.get("x-secret") is True:
            if at and at not in found:
                found.append(at)
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and ref not in seen_refs:
            seen_refs.add(ref)  # a recursive schema would otherwise loop forever
            walk(resolve(ref), at)
            seen_refs.discard(ref)
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{at}/{_escape(name)}")
        for sub in (node.get("patternProperties") or {}).values():
            walk(sub, f"{at}/*")
        walk(node.get("additionalProperties"), f"{at}/*")
        for i, sub in enumerate(node.get("prefixItems") or []):
            walk(sub, f"{at}/{i}")
        walk(node.get("items"), f"{at}/*")
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key) or []:
                walk(sub, at)
        for key in ("then", "else"):
            walk(node.get(key), at)

    walk(schema, prefix.rstrip("/"))
    return found
