"""Verification of the hash chain: recompute every link and name the record at fault.

An edit, a deletion, an insertion or a reordering is each reported with the record it
concerns; records cut from the end (``truncated``) are seen only against an expected count
or head. Pure: it reads records from any iterable, so SQLite, PostgreSQL or an export
file can feed it. A pruned log, its checkpoints and the hub's head witness are checked by
``gateway.decisionlog.checkpoint.verify_log``, which calls ``verify_chain`` on the rest.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from gateway.decisionlog.records import (
    GENESIS_HASH,
    DecisionRecord,
    chain_hash,
    record_from_row,
    record_to_json,
)

ProblemKind = Literal["edited", "deleted", "inserted", "reordered", "truncated"]
PROBLEM_KINDS: tuple[str, ...] = get_args(ProblemKind)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of ``verify_chain``; ``problems`` are in log order.

    ``start_seq`` is the first seq the chain was checked from (1, or the record after the
    last checkpoint); ``checkpoint`` the last prune's checkpoint, ``witness`` the head and
    count the hub recorded (``verify_log`` fills them; None when there is none).
    """

    ok: bool
    checked: int
    problems: list[dict[str, Any]] = field(default_factory=list)
    head: str = GENESIS_HASH
    start_seq: int = 1
    checkpoint: dict[str, Any] | None = None
    witness: dict[str, Any] | None = None

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


def _stub(raw: Mapping[str, Any]) -> DecisionRecord:
    """A placeholder for a malformed row, so positions stay right; it can match no hash."""
    seq = raw.get("seq")
    return DecisionRecord(
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


class _Check:
    """One verification: the records in log order and what each phase found about them.

    The phases run in order (``verify_chain``), each reading what the earlier ones found;
    problems are kept with the position they concern so the report is in log order.
    """

    def __init__(self, genesis: str, start_seq: int) -> None:
        self.genesis = genesis
        self.start_seq = start_seq
        self.recs: list[DecisionRecord] = []
        self.problems: list[tuple[int, dict[str, Any]]] = []
        self.malformed: set[int] = set()
        self.edited: set[int] = set()
        self.renumbered: dict[int, int] = {}  # position -> the seq it was stored under
        self.inserted: set[int] = set()
        self.genuine: list[int] = []  # positions of the records not inserted
        self.seq_to_pos: dict[int, int] = {}
        self.in_order: set[int] = set()
        self.truncated = False

    def report(self, pos: int, r: DecisionRecord | None, kind: ProblemKind, message: str) -> None:
        self.problems.append(
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

    # -- 0. parse

    def parse(self, records: Iterable[DecisionRecord | Mapping[str, Any]]) -> None:
        """Records as given; a row that is not a record is reported and kept as a stub."""
        for pos, raw in enumerate(records):
            if isinstance(raw, DecisionRecord):
                self.recs.append(raw)
                continue
            try:
                self.recs.append(_check_types(record_from_row(raw)))
            except (ValueError, TypeError, json.JSONDecodeError) as e:
                stub = _stub(raw)
                self.recs.append(stub)
                self.malformed.add(pos)
                self.report(pos, stub, "edited", f"row at position {pos} is malformed: {e}")

    # -- 1. edits, and the seqs of moved records

    def find_edits(self) -> None:
        """Records whose content no longer matches their own hash.

        One that matches it under another seq was moved, not edited: where seq is the table's
        row id (SQLite), a reordering or an insertion in the middle must renumber the records
        it moves.
        """
        recs = self.recs
        mismatched = [
            p for p in range(len(recs)) if p not in self.malformed and not _hash_matches(recs[p])
        ]
        self.renumbered = _recover_seqs(recs, mismatched, self.genesis, self.start_seq)
        self.edited = set(self.malformed)
        for pos in mismatched:
            if pos not in self.renumbered:
                self.edited.add(pos)
                r = recs[pos]
                self.report(
                    pos, r, "edited", f"{_name(r)} was edited: its content does not match its hash"
                )

    # -- 2. insertions

    def find_insertions(self) -> None:
        """Records chained around, or repeating another's seq, that nothing is chained to."""
        referenced = Counter(r.prev_hash for r in self.recs)
        self._find_bypassed(referenced)
        self._find_duplicate_seqs(referenced)
        self.genuine = [p for p in range(len(self.recs)) if p not in self.inserted]
        self.seq_to_pos = {self.recs[p].seq: p for p in self.genuine}

    def _hash_at(self, pos: int) -> str:
        return self.genesis if pos < 0 else self.recs[pos].hash

    def _find_bypassed(self, referenced: Counter[str]) -> None:
        # The record after it is chained to the record before it, and nothing to it.
        recs = self.recs
        for pos in range(1, len(recs)):
            r, before = recs[pos], recs[pos - 1]
            if (
                r.prev_hash != before.hash
                and r.prev_hash == self._hash_at(pos - 2)
                and referenced[before.hash] == 0
                and pos - 1 not in self.inserted
            ):
                self.inserted.add(pos - 1)
                self.report(
                    pos - 1,
                    before,
                    "inserted",
                    f"{_name(before)} was inserted: the record after it, {_name(r)}, "
                    f"is chained to the record before it",
                )

    def _find_duplicate_seqs(self, referenced: Counter[str]) -> None:
        recs = self.recs
        by_seq: dict[int, list[int]] = {}
        for pos, r in enumerate(recs):
            if pos not in self.inserted:
                by_seq.setdefault(r.seq, []).append(pos)
        for seq, positions in by_seq.items():
            if len(positions) < 2:
                continue
            orphans = [p for p in positions if referenced[recs[p].hash] == 0]
            # The genuine one is normally chained to; at the end of the log neither is, so
            # the later copy is the intruder.
            intruders = orphans if len(orphans) < len(positions) else positions[1:]
            for p in intruders:
                self.inserted.add(p)
                self.report(
                    p,
                    recs[p],
                    "inserted",
                    f"{_name(recs[p])} was inserted: another record already has seq {seq}",
                )

    # -- 3. reordering

    def find_reorderings(self) -> None:
        """Records outside one longest run of increasing seq, then runs of moved records."""
        recs, genuine = self.recs, self.genuine
        self.in_order = {genuine[i] for i in _longest_increasing([recs[p].seq for p in genuine])}
        for i, p in enumerate(genuine):
            if p in self.in_order:
                continue
            r = recs[p]
            after = recs[genuine[i - 1]] if i else None
            where = f"after seq {after.seq}" if after else "first"
            stored = f" (stored as seq {self.renumbered[p]})" if p in self.renumbered else ""
            self.report(
                p,
                r,
                "reordered",
                f"{_name(r)} is out of order: it appears {where} at position {p}{stored}",
            )
        for run in self._moved_runs():
            self._report_moved(run)

    def _moved_runs(self) -> list[list[int]]:
        """Moved records still in order (e.g. renumbered to make room for an insertion),
        grouped in runs of neighbours moved by the same offset."""
        recs, renumbered = self.recs, self.renumbered
        runs: list[list[int]] = []
        for p in sorted(renumbered):
            if p in self.in_order and p not in self.inserted:
                offset = renumbered[p] - recs[p].seq
                last = runs[-1][-1] if runs else None
                if (
                    last is not None
                    and last == p - 1
                    and renumbered[last] - recs[last].seq == offset
                ):
                    runs[-1].append(p)
                else:
                    runs.append([p])
        return runs

    def _report_moved(self, run: list[int]) -> None:
        first, last = self.recs[run[0]], self.recs[run[-1]]
        if len(run) == 1:
            what = f"{_name(first)} was moved: it is stored as seq {self.renumbered[run[0]]}"
        else:
            what = (
                f"records seq {first.seq}..{last.seq} were renumbered: stored as seq "
                f"{self.renumbered[run[0]]}..{self.renumbered[run[-1]]}"
            )
        self.report(run[0], first, "reordered", what)

    # -- 4. links

    def check_links(self) -> None:
        """Each record must be chained to the record with the seq before it.

        By seq, so that a reordering is not also reported as a break.
        """
        present = sorted(self.seq_to_pos)
        for p in self.genuine:
            r = self.recs[p]
            if r.seq == self.start_seq:
                if r.prev_hash != self.genesis:
                    self.report(
                        p,
                        r,
                        "edited",
                        f"{_name(r)} is the first record but is chained to "
                        f"{_short(r.prev_hash)}, not the start of the log",
                    )
                continue
            pred_pos = self.seq_to_pos.get(r.seq - 1)
            if pred_pos is None:
                self._report_gap(p, r, present)
            else:
                self._check_link(pred_pos, p)

    def _report_gap(self, p: int, r: DecisionRecord, present: list[int]) -> None:
        start_seq = self.start_seq
        if r.seq <= start_seq:
            self.report(p, r, "edited", f"{_name(r)} has a seq below the start of the log")
            return
        k = bisect.bisect_left(present, r.seq)
        lower = present[k - 1] if k else start_seq - 1
        follows = f"seq {lower}" if lower >= start_seq else "the start of the log"
        self.report(
            p,
            r,
            "deleted",
            f"{_name(r)} follows {follows} but was chained to {_short(r.prev_hash)}: "
            f"{_seq_range(lower + 1, r.seq - 1)} deleted",
        )

    def _check_link(self, pred_pos: int, p: int) -> None:
        r, pred = self.recs[p], self.recs[pred_pos]
        if r.prev_hash != pred.hash and pred_pos not in self.edited and p not in self.edited:
            # The predecessor's content matches its own (new) hash: it was rewritten and
            # re-hashed after this record was chained to it.
            self.report(
                pred_pos,
                pred,
                "edited",
                f"{_name(pred)} was replaced or edited and re-hashed: {_name(r)} was chained "
                f"to {_short(r.prev_hash)}, not {_short(pred.hash)}",
            )

    # -- 5. the end of the log, against what the caller knows independently

    def check_count(self, expected_count: int, expected_head: str | None) -> None:
        """Records cut from or appended to the end, against the expected count."""
        recs, seq_to_pos = self.recs, self.seq_to_pos
        max_seq = max(seq_to_pos) if seq_to_pos else self.start_seq - 1
        want_last = self.start_seq + expected_count - 1
        if max_seq < want_last:
            head = f", head {_short(expected_head)}" if expected_head else ""
            self.report(
                len(recs),
                None,
                "truncated",
                f"the log ends at seq {max_seq}, not at seq {want_last} as expected{head}: "
                f"{_seq_range(max_seq + 1, want_last)} deleted from the end",
            )
            self.problems[-1][1].update(expected_count=expected_count, expected_head=expected_head)
            self.truncated = True
        elif max_seq > want_last:
            self.report(
                seq_to_pos[max_seq],
                recs[seq_to_pos[max_seq]],
                "inserted",
                f"the log runs to seq {max_seq} but only {expected_count} records were expected: "
                f"records after seq {want_last} were appended",
            )

    def check_head(self, expected_head: str, head: str) -> None:
        """Records cut from or appended to the end, against the expected head hash."""
        if expected_head == head:
            return
        recs = self.recs
        at = next((p for p, r in enumerate(recs) if r.hash == expected_head), None)
        if at is not None:
            self.report(
                at + 1,
                recs[at + 1] if at + 1 < len(recs) else None,
                "inserted",
                f"the expected head {_short(expected_head)} is seq {recs[at].seq}: "
                f"the records after it were appended",
            )
        elif not self.truncated:  # else the truncation already names the expected head
            last = recs[self.genuine[-1]] if self.genuine else None
            self.report(
                len(recs),
                last,
                "deleted",
                f"the expected head {_short(expected_head)} is not in the log: records were "
                f"deleted from the end or the chain was rewritten",
            )


def verify_chain(
    records: Iterable[DecisionRecord | Mapping[str, Any]],
    *,
    expected_count: int | None = None,
    expected_head: str | None = None,
    genesis: str = GENESIS_HASH,
    start_seq: int = 1,
) -> VerifyReport:
    """Check a chain given in log order and name every edited, deleted, inserted or moved record.

    ``expected_count`` (records from ``start_seq`` on) / ``expected_head`` (from the hub's
    own witness, or from outside) also catch records cut from the end (``truncated``) or
    appended to it; ``genesis`` / ``start_seq`` verify a slice of the log (after a checkpoint,
    or an export).
    """
    check = _Check(genesis, start_seq)
    check.parse(records)
    check.find_edits()
    check.find_insertions()
    check.find_reorderings()
    check.check_links()
    if expected_count is not None:
        check.check_count(expected_count, expected_head)
    head = check.recs[-1].hash if check.recs else genesis
    if expected_head is not None:
        check.check_head(expected_head, head)
    # Stable: problems at one position stay in the order the phases found them.
    check.problems.sort(key=lambda item: item[0])
    return VerifyReport(
        ok=not check.problems,
        checked=len(check.recs),
        problems=[p for _, p in check.problems],
        head=head,
        start_seq=start_seq,
    )
