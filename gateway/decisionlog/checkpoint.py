"""Checkpoints and the head witness: what lets ``verify`` prove a pruned log and see a cut tail.

``agent-gateway decisions prune`` exports the oldest records (JSON Lines, oldest first, as
``export`` writes them), then in one transaction deletes them and writes one checkpoint in
their place. A checkpoint names the records it replaces (``first_seq``..``through_seq``,
``count``), the hash the first of them was chained to (``start_hash``), the hash of the last
(``head_hash``: the head it replaces) and the SHA-256 of the export file. ``verify`` then
checks the rest of the chain from the checkpoint: the first record left must be seq
``through_seq + 1`` chained to ``head_hash``. ``verify_export`` checks an export against its
checkpoint: its SHA-256, and its records as a chain from ``start_hash`` that ends, after
``count`` records, at ``head_hash``.

Why a table of its own (``decision_checkpoints``) rather than a record in the chain: the
records after the pruned ones are chained to the last pruned record's hash, so a checkpoint
record could not sit in their place without re-chaining, and so changing, every later hash
(and with them every export taken and every head noted before the prune); appended at the
head instead, it would show up as a decision in ``list``, the audit page, replay and
reload's recent inputs. What a separate row claims is pinned all the same:

- ``through_seq`` and ``head_hash`` by the chain: the first record after it carries
  ``prev_hash == head_hash``, which its own hash covers, and so on to the head;
- the export by ``head_hash`` (a chain from ``start_hash`` ending at that hash cannot be
  forged without breaking SHA-256), and by the file's SHA-256 for a quick check;
- the row itself is hashed like a record (``chain_hash`` over its canonical JSON) and chained
  to the checkpoint before it (``prev_hash``, the first to the genesis hash), so an edited
  checkpoint, or one deleted from the history, is named.

The head witness (``decision_heads``): the seq and hash of the last record the hub
appended, written in the same transaction as that record. ``verify`` compares it with the
end of the chain, so that the last N records deleted are reported as ``truncated`` with the
count and head expected, which the chain alone cannot see. Appends continue from the
witness, so a cut that goes unnoticed until the next decision stays visible as a gap.

Limits: checkpoints and witness live in the same database as the records. Someone who can
write that file can rewrite records, checkpoints and witness together and recompute every
hash: the witness is for accidents (a partial restore, a hand-run DELETE) and partial
tampering. Against a writer of the file, give ``verify_log`` a head or count kept elsewhere
(``expected_head`` / ``expected_count``, which then replace the witness), and keep exports
where the hub's host cannot write.

Pure: no I/O (the files are ``gateway.decisionlog.prune``'s, the SQL the store's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.clock import utcnow
from gateway.decisionlog.records import GENESIS_HASH, DecisionRecord, chain_hash
from gateway.decisionlog.verify import VerifyReport, verify_chain

CHECKPOINT_FIELDS = (
    "id",
    "first_seq",
    "through_seq",
    "count",
    "start_hash",
    "head_hash",
    "export_sha256",
    "export_name",
    "created_at",
    "prev_hash",
    "hash",
)
_INT_FIELDS = ("id", "first_seq", "through_seq", "count")


class UnknownCheckpoint(LookupError):
    """No checkpoint of the log fits an export (or the one named does not exist)."""


def checkpoint_fields(
    *,
    first_seq: int,
    through_seq: int,
    start_hash: str,
    head_hash: str,
    export_sha256: str,
    export_name: str,
    created_at: str | None = None,
) -> dict[str, Any]:
    """A checkpoint's content, before ``seal_checkpoint`` numbers and chains it."""
    return {
        "first_seq": first_seq,
        "through_seq": through_seq,
        "count": through_seq - first_seq + 1,
        "start_hash": start_hash,
        "head_hash": head_hash,
        "export_sha256": export_sha256,
        "export_name": export_name,
        "created_at": created_at or utcnow(),
    }


def seal_checkpoint(fields: Mapping[str, Any], id: int, prev_hash: str) -> dict[str, Any]:
    """``fields`` as checkpoint ``id``, chained to the checkpoint before it (``prev_hash``)."""
    body: dict[str, Any] = {"id": id, **fields, "prev_hash": prev_hash}
    body["hash"] = chain_hash(prev_hash, body)
    return body


def _problem(cp: Mapping[str, Any], kind: str, message: str) -> dict[str, Any]:
    # Named by its checkpoint's id: it concerns no one record.
    return {
        "seq": None,
        "decision_id": None,
        "kind": kind,
        "message": message,
        "checkpoint": cp.get("id"),
    }


def _parse(raw: Mapping[str, Any]) -> dict[str, Any]:
    cp = {name: raw.get(name) for name in CHECKPOINT_FIELDS}
    for name in _INT_FIELDS:
        if isinstance(cp[name], bool) or not isinstance(cp[name], int):
            raise ValueError(f"{name} is {cp[name]!r}, not an integer")
    for name in CHECKPOINT_FIELDS:
        if name not in _INT_FIELDS and not isinstance(cp[name], str):
            raise ValueError(f"{name} is not a string")
    return cp


def _name(cp: Mapping[str, Any]) -> str:
    return f"checkpoint {cp['id']} (records seq {cp['first_seq']}..{cp['through_seq']})"


def hash_matches(cp: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's content matches its own hash."""
    try:
        return chain_hash(str(cp["prev_hash"]), cp) == cp["hash"]
    except (TypeError, ValueError, KeyError):
        return False


def check_checkpoints(
    rows: Iterable[Mapping[str, Any]], genesis: str = GENESIS_HASH
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the checkpoints, oldest first; the problems found in them).

    Each must match its hash, be chained to the one before, start where the one before ends
    (seq and hash) and count the records it names.
    """
    checkpoints: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    prev: dict[str, Any] | None = None
    for raw in rows:
        try:
            cp = _parse(raw)
        except ValueError as e:
            problems.append(_problem(raw, "edited", f"a checkpoint row is malformed: {e}"))
            continue
        if not hash_matches(cp):
            problems.append(
                _problem(
                    cp, "edited", f"{_name(cp)} was edited: its content does not match its hash"
                )
            )
        want_prev = prev["hash"] if prev else genesis
        if cp["prev_hash"] != want_prev:
            problems.append(
                _problem(
                    cp,
                    "deleted",
                    f"{_name(cp)} is chained to {cp['prev_hash'][:12]}, not to "
                    f"{'checkpoint ' + str(prev['id']) if prev else 'the start'}: "
                    "a checkpoint was deleted or replaced",
                )
            )
        want_first, want_start = (
            (prev["through_seq"] + 1, prev["head_hash"]) if prev else (1, genesis)
        )
        if (cp["first_seq"], cp["start_hash"]) != (want_first, want_start):
            problems.append(
                _problem(
                    cp,
                    "edited",
                    f"{_name(cp)} does not start where the log before it ends "
                    f"(seq {want_first}, chained to {want_start[:12]})",
                )
            )
        if cp["count"] != cp["through_seq"] - cp["first_seq"] + 1:
            problems.append(
                _problem(cp, "edited", f"{_name(cp)} counts {cp['count']} records, not its range")
            )
        checkpoints.append(cp)
        prev = cp
    return checkpoints, problems


def _witness(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    count, head = raw.get("count"), raw.get("head")
    if isinstance(count, bool) or not isinstance(count, int) or not isinstance(head, str):
        return None
    return {"count": count, "head": head}


def verify_log(
    records: Iterable[DecisionRecord | Mapping[str, Any]],
    *,
    checkpoints: Iterable[Mapping[str, Any]] = (),
    witness: Mapping[str, Any] | None = None,
    require_witness: bool = False,
    expected_head: str | None = None,
    expected_count: int | None = None,
    genesis: str = GENESIS_HASH,
) -> VerifyReport:
    """Verify a stored log: its checkpoints, the chain from the last one, the end against
    the witness (``{"count", "head"}``: records ever written, the last one's hash).

    ``expected_head`` / ``expected_count`` (the count of records ever written) come from
    outside and replace the witness's; ``require_witness``: a missing witness is a problem.
    """
    cps, problems = check_checkpoints(checkpoints, genesis)
    last = cps[-1] if cps else None
    start_seq = last["through_seq"] + 1 if last else 1
    start_hash = last["head_hash"] if last else genesis
    seen: dict[str, Any] | None = None
    if witness is not None:
        seen = _witness(witness)
        if seen is None:
            problems.append(
                _problem({}, "edited", f"the hub's head witness is malformed: {dict(witness)!r}")
            )
    elif require_witness:
        problems.append(
            _problem(
                {},
                "deleted",
                "the hub's head witness is missing: records cut from the end cannot be seen",
            )
        )
    count, head = expected_count, expected_head
    if seen is not None:
        count = seen["count"] if count is None else count
        head = seen["head"] if head is None else head
    chain_count = None
    if count is not None:
        if count < start_seq - 1:
            problems.append(
                _problem(
                    {},
                    "edited",
                    f"the witness says {count} records were written, fewer than the "
                    f"{start_seq - 1} the checkpoints account for",
                )
            )
        else:
            chain_count = count - start_seq + 1
    report = verify_chain(
        records,
        expected_count=chain_count,
        expected_head=head,
        genesis=start_hash,
        start_seq=start_seq,
    )
    for p in report.problems:
        if p["kind"] == "truncated":
            p["expected_count"] = count  # records ever written, not only those after the checkpoint
    found = problems + report.problems
    return VerifyReport(
        ok=not found,
        checked=report.checked,
        problems=found,
        head=report.head,
        start_seq=start_seq,
        checkpoint=last,
        witness=seen,
    )


def select_checkpoint(
    checkpoints: list[dict[str, Any]],
    *,
    sha256: str,
    first_seq: int | None,
    checkpoint_id: int | None = None,
) -> dict[str, Any] | None:
    """The checkpoint an export belongs to: the one named, else the one with its SHA-256,
    else the one whose range starts at its first record's seq; None when none fits."""
    if checkpoint_id is not None:
        return next((cp for cp in checkpoints if cp["id"] == checkpoint_id), None)
    by_sha = [cp for cp in checkpoints if cp["export_sha256"] == sha256]
    if by_sha:
        return by_sha[-1]
    return next((cp for cp in checkpoints if cp["first_seq"] == first_seq), None)


def verify_export(
    records: Iterable[DecisionRecord | Mapping[str, Any]],
    *,
    checkpoint: Mapping[str, Any],
    sha256: str,
) -> VerifyReport:
    """An export against its checkpoint: the file's SHA-256, and its records as the chain the
    checkpoint replaced (from ``start_hash``, ``count`` records, ending at ``head_hash``)."""
    cp = _parse(checkpoint)
    problems: list[dict[str, Any]] = []
    if not hash_matches(cp):
        problems.append(
            _problem(cp, "edited", f"{_name(cp)} was edited: its content does not match its hash")
        )
    if sha256 != cp["export_sha256"]:
        problems.append(
            _problem(
                cp,
                "edited",
                f"the file's SHA-256 is {sha256[:12]}, {_name(cp)} recorded "
                f"{cp['export_sha256'][:12]}: the export was changed",
            )
        )
    report = verify_chain(
        records,
        expected_count=cp["count"],
        expected_head=cp["head_hash"],
        genesis=cp["start_hash"],
        start_seq=cp["first_seq"],
    )
    found = problems + report.problems
    return VerifyReport(
        ok=not found,
        checked=report.checked,
        problems=found,
        head=report.head,
        start_seq=cp["first_seq"],
        checkpoint=cp,
    )
