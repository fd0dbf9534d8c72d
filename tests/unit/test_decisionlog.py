"""Decision-log chain building, tamper detection, input masking, and pruning with
checkpoints and the head witness."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.decisionlog import (
    GENESIS_HASH,
    REDACTED,
    ChainBuilder,
    DecisionLog,
    DecisionRecord,
    Masker,
    PruneError,
    UnknownCheckpoint,
    canonical_bytes,
    chain_hash,
    pointers_marked_secret,
    record_from_row,
    record_to_json,
    seal_checkpoint,
    seal_record,
    verify_chain,
    verify_export,
    verify_log,
)
from gateway.decisionlog.checkpoint import checkpoint_fields
from gateway.errors import ConfigError
from gateway.policy.engine import Decision
from gateway.store import Store, open_store
from tests.pg import raw_sql


def build(n: int) -> list[DecisionRecord]:
    chain = ChainBuilder()
    return [
        chain.append(
            path="gateway/dispatch/decision",
            input={"task": {"input": {"n": i}}},
            result={"allow": i % 2 == 0, "reasons": []},
            revision="abc+sha256:0",
            kind="dispatch",
            allow=i % 2 == 0,
            labels={"hub_id": "h1", "version": "0.1.0"},
            metrics={"timer_rego_query_eval_ns": 1000 + i},
            subject="alice",
            agent="summarizer",
            task_id=f"t{i}",
        )
        for i in range(1, n + 1)
    ]


def kinds(report: Any) -> list[tuple[str, int | None]]:
    return [(p["kind"], p["seq"]) for p in report.problems]


# --- building ------------------------------------------------------------------------------


def test_chain_builds_and_verifies() -> None:
    records = build(5)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    for r in records:
        assert r.hash == chain_hash(r.prev_hash, r)
        assert r.timestamp.endswith("Z") and "." in r.timestamp
    report = verify_chain(records, expected_count=5, expected_head=records[-1].hash)
    assert report.ok, report.problems
    assert report.checked == 5
    assert report.head == records[-1].hash


def test_builder_continues_from_a_stored_head() -> None:
    first = build(3)
    more = ChainBuilder(first[-1].hash, first[-1].seq).append(
        path="p", input={}, result={}, revision="r", kind="message", allow=True
    )
    assert more.seq == 4 and more.prev_hash == first[-1].hash
    assert verify_chain([*first, more]).ok


GOLDEN_FIELDS: dict[str, Any] = {
    "decision_id": "d-42",
    "timestamp": "2025-01-01T00:00:00.000000Z",
    "path": "gateway/dispatch/decision",
    "input": {"task": {"input": {"text": "é", "n": 1.5}}, "subject": {"id": "alice"}},
    "result": {"allow": True, "reasons": ["allowed"]},
    "revision": "policies=a schemas=b agents=c",
    "labels": {"hub_id": "h1", "version": "0.1.0"},
    "metrics": {"timer_rego_query_eval_ns": 1234},
    "erased": ["/request/remote_addr"],
    "masked": ["/subject/key_id"],
    "kind": "dispatch",
    "allow": True,
    "subject": "alice",
    "agent": "echo",
    "task_id": "t1",
}
# Computed by the implementation that wrote the logs already stored: a change of the record
# or hash format would make every existing log fail to verify.
GOLDEN_HASH = "2ee4da89091d1931f8070255307599516ecc1eb9c5c568245980b9a11f0d7b2f"


def test_the_hash_format_is_the_one_existing_logs_were_written_with() -> None:
    sealed = seal_record(GOLDEN_FIELDS, 42, "ab" * 32)
    assert (sealed["seq"], sealed["prev_hash"], sealed["hash"]) == (42, "ab" * 32, GOLDEN_HASH)
    # The builder the tests use seals through the same function the hub does.
    built = ChainBuilder("ab" * 32, 41).append(**GOLDEN_FIELDS)
    assert record_to_json(built) == sealed


async def test_concurrent_decisions_extend_one_chain(store_target: Any) -> None:
    store = open_store(store_target)
    log = DecisionLog(store, hub_id="h1")
    try:
        ids = await asyncio.gather(
            *(
                log.record(
                    kind="dispatch",
                    path="gateway/dispatch/decision",
                    input={"task": {"input": {"n": i}}},
                    decision=Decision(i % 2 == 0, ("allowed" if i % 2 == 0 else "no",)),
                    revision="r",
                    subject="alice",
                    agent="echo",
                    task_id=f"t{i}",
                )
                for i in range(40)
            )
        )
        report = await log.verify()
        assert (report.ok, report.checked) == (True, 40), report.problems
        records, _ = await log.list(limit=100)
        assert [r["seq"] for r in records] == list(range(40, 0, -1))
        assert {r["decision_id"] for r in records} == set(ids)
        assert report.head == records[0]["hash"]
        assert await log.get(ids[7]) == next(r for r in records if r["decision_id"] == ids[7])
    finally:
        await store.close()


def test_canonical_bytes_ignore_hash_and_key_order() -> None:
    r = build(1)[0]
    body = record_to_json(r)
    shuffled = dict(reversed(list(body.items())))
    shuffled["hash"] = "something else"
    assert canonical_bytes(shuffled) == canonical_bytes(r)
    assert b'"hash"' not in canonical_bytes(r)
    assert b" " not in canonical_bytes({"a": [1, 2], "b": "é"})
    assert "é".encode() in canonical_bytes({"b": "é"})


def test_rows_round_trip_through_storage_form() -> None:
    records = build(3)
    rows = []
    for r in records:
        row = record_to_json(r)
        # As SQLite gives them back: JSON text columns and 0/1 booleans.
        for key in ("input", "result", "labels", "metrics", "erased", "masked"):
            row[key] = json.dumps(row[key])
        row["allow"] = int(row["allow"])
        rows.append(row)
    assert [record_from_row(row) for row in rows] == records
    assert verify_chain(rows).ok


# --- tampering -----------------------------------------------------------------------------


def test_verify_names_an_edited_record() -> None:
    records = build(5)
    records[2] = dataclasses.replace(records[2], allow=not records[2].allow)
    report = verify_chain(records)
    assert not report.ok
    assert kinds(report) == [("edited", 3)]
    assert report.problems[0]["decision_id"] == records[2].decision_id
    assert "does not match its hash" in report.problems[0]["message"]


def test_verify_names_an_edited_and_rehashed_record() -> None:
    records = build(5)
    forged = dataclasses.replace(records[2], result={"allow": True, "reasons": ["forged"]})
    records[2] = dataclasses.replace(forged, hash=chain_hash(forged.prev_hash, forged))
    report = verify_chain(records)
    assert kinds(report) == [("edited", 3)]
    assert "re-hashed" in report.problems[0]["message"]


@pytest.mark.parametrize(
    ("drop", "expected_seq", "text"),
    [
        ([2], 4, "record seq 3 was deleted"),
        ([1, 2], 4, "records seq 2..3 were deleted"),
        ([0], 2, "record seq 1 was deleted"),
    ],
)
def test_verify_names_a_deleted_record(drop: list[int], expected_seq: int, text: str) -> None:
    records = [r for i, r in enumerate(build(5)) if i not in drop]
    report = verify_chain(records)
    assert kinds(report) == [("deleted", expected_seq)]
    assert text in report.problems[0]["message"]
    assert "but was chained to" in report.problems[0]["message"]


def test_verify_needs_the_expected_count_to_see_the_tail_cut() -> None:
    records = build(5)[:3]
    assert verify_chain(records).ok  # the chain alone cannot tell
    report = verify_chain(records, expected_count=5)
    assert kinds(report) == [("truncated", None)]
    assert "records seq 4..5 were deleted from the end" in report.problems[0]["message"]
    assert not verify_chain(records, expected_head=build(5)[-1].hash).ok


def _forge(after: DecisionRecord, seq: int, prev_hash: str | None = None) -> DecisionRecord:
    fake = dataclasses.replace(
        after, seq=seq, decision_id="forged", prev_hash=prev_hash or after.hash, hash=""
    )
    return dataclasses.replace(fake, hash=chain_hash(fake.prev_hash, fake))


@pytest.mark.parametrize(
    ("how", "position"),
    [
        ("chained, duplicate seq", 3),
        ("chained, far seq", 3),
        ("unchained", 3),
        ("before the first", 0),
        ("at the end, duplicate seq", 5),
    ],
)
def test_verify_names_an_inserted_record(how: str, position: int) -> None:
    records = build(5)
    before = records[position - 1] if position else None
    if how == "chained, duplicate seq":
        fake = _forge(before, before.seq + 1)
    elif how == "chained, far seq":
        fake = _forge(before, 99)
    elif how == "unchained":
        fake = _forge(before, before.seq + 1, prev_hash="f" * 64)
    elif how == "before the first":
        fake = _forge(records[0], 1, prev_hash=GENESIS_HASH)
    else:
        fake = _forge(before, before.seq)
    records.insert(position, fake)
    report = verify_chain(records)
    assert [(p["kind"], p["decision_id"]) for p in report.problems] == [("inserted", "forged")]
    assert "was inserted" in report.problems[0]["message"]


def test_verify_needs_the_expected_count_to_see_an_append() -> None:
    records = build(5)
    records.append(_forge(records[-1], 6))
    assert verify_chain(records).ok  # a keyless chain can be extended by anyone
    report = verify_chain(records, expected_count=5)
    assert [(p["kind"], p["decision_id"]) for p in report.problems] == [("inserted", "forged")]


@pytest.mark.parametrize(
    ("order", "moved"),
    [
        ([0, 1, 3, 2, 4], {3, 4}),  # swap: either one is the moved record
        ([0, 3, 1, 2, 4], {4}),  # seq 4 moved earlier
        ([1, 2, 3, 4, 0], {1}),  # seq 1 moved to the end
    ],
)
def test_verify_names_reordered_records(order: list[int], moved: set[int]) -> None:
    original = build(5)
    report = verify_chain([original[i] for i in order])
    assert len(report.problems) == 1, report.problems
    assert report.problems[0]["kind"] == "reordered"
    assert report.problems[0]["seq"] in moved
    assert "out of order" in report.problems[0]["message"]


def test_verify_reports_a_malformed_row() -> None:
    rows = [record_to_json(r) for r in build(2)]
    del rows[1]["input"]
    report = verify_chain(rows)
    assert [p["kind"] for p in report.problems][:1] == ["edited"]
    assert "malformed" in report.problems[0]["message"]


# --- masking -------------------------------------------------------------------------------

DOC = {
    "subject": {"id": "alice", "token": "t0k3n"},
    "task": {
        "input": {
            "text": "hello",
            "password": "hunter2",
            "secrets": {"a": 1, "b": 2},
            "items": [{"key": "k1", "v": 1}, {"key": "k2", "v": 2}],
            "a/b": "slash",
        }
    },
}


@pytest.mark.parametrize(
    ("rules", "erased", "masked", "check"),
    [
        (
            {"/task/input/password": "erase"},
            ["/task/input/password"],
            [],
            lambda d: "password" not in d["task"]["input"],
        ),
        (
            {"/subject/token": "mask"},
            [],
            ["/subject/token"],
            lambda d: d["subject"]["token"] == REDACTED,
        ),
        (
            {"/task/input/secrets/*": "mask"},
            [],
            ["/task/input/secrets/a", "/task/input/secrets/b"],
            lambda d: d["task"]["input"]["secrets"] == {"a": REDACTED, "b": REDACTED},
        ),
        (
            {"/task/input/items/*/key": "erase"},
            ["/task/input/items/0/key", "/task/input/items/1/key"],
            [],
            lambda d: d["task"]["input"]["items"] == [{"v": 1}, {"v": 2}],
        ),
        (
            {"/task/input/items/*": "erase"},
            ["/task/input/items/0", "/task/input/items/1"],
            [],
            lambda d: d["task"]["input"]["items"] == [],
        ),
        (
            {"/task/input/items/1": "mask"},
            [],
            ["/task/input/items/1"],
            lambda d: d["task"]["input"]["items"][1] == REDACTED,
        ),
        (
            {"/task/input/a~1b": "mask"},
            [],
            ["/task/input/a~1b"],
            lambda d: d["task"]["input"]["a/b"] == REDACTED,
        ),
        (
            # Both rules hit one field: erasure wins and the field is reported once.
            [("/task/input/password", "mask"), ("/task/input/password", "erase")],
            ["/task/input/password"],
            [],
            lambda d: "password" not in d["task"]["input"],
        ),
        (
            {"/task/input/secrets": "erase", "/task/input/secrets/a": "mask"},
            ["/task/input/secrets"],
            [],
            lambda d: "secrets" not in d["task"]["input"],
        ),
        (
            {
                "/nope": "erase",
                "/task/input/missing": "mask",
                "/task/input/items/7": "erase",
                "/task/input/items/01": "erase",
                "/task/input/text/deeper": "mask",
                "/task/*/zzz": "mask",
            },
            [],
            [],
            lambda d: d == DOC,
        ),
    ],
)
def test_masker(rules: Any, erased: list[str], masked: list[str], check: Any) -> None:
    original = copy.deepcopy(DOC)
    out, got_erased, got_masked = Masker(rules).apply(DOC)
    assert (got_erased, got_masked) == (erased, masked)
    assert check(out)
    assert original == DOC  # the caller's document is never touched


def test_masker_output_does_not_alias_the_input() -> None:
    out, _, _ = Masker({"/subject/token": "mask"}).apply(DOC)
    out["task"]["input"]["text"] = "changed"
    assert DOC["task"]["input"]["text"] == "hello"


@pytest.mark.parametrize("rules", [{"task/input": "erase"}, {"/task": "hide"}, [("/x", "delete")]])
def test_masker_refuses_bad_rules(rules: Any) -> None:
    with pytest.raises(ConfigError):
        Masker(rules)


def test_pointers_marked_secret_walks_the_schema() -> None:
    schema = {
        "$defs": {"cred": {"type": "object", "properties": {"pin": {"x-secret": True}}}},
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "api_key": {"type": "string", "x-secret": True},
            "x-secret": {"type": "string", "x-secret": False},
            "nested": {"properties": {"a/b": {"x-secret": True}, "plain": {}}},
            "list": {"type": "array", "items": {"properties": {"token": {"x-secret": True}}}},
            "tuple": {"prefixItems": [{}, {"x-secret": True}]},
            "card": {"$ref": "#/$defs/cred"},
            "env": {"type": "object", "additionalProperties": {"x-secret": True}},
        },
        "allOf": [{"properties": {"otp": {"x-secret": True}}}],
    }
    got = pointers_marked_secret(schema, "/task/input")
    assert sorted(got) == sorted(
        [
            "/task/input/api_key",
            "/task/input/nested/a~1b",
            "/task/input/list/*/token",
            "/task/input/tuple/1",
            "/task/input/card/pin",
            "/task/input/env/*",
            "/task/input/otp",
        ]
    )
    # And the pointers feed a Masker directly.
    doc = {"task": {"input": {"api_key": "k", "list": [{"token": "a"}], "text": "t"}}}
    out, _, masked = Masker().with_pointers(got).apply(doc)
    assert masked == ["/task/input/api_key", "/task/input/list/0/token"]
    assert out["task"]["input"]["text"] == "t"


def test_pointers_marked_secret_survives_recursive_schemas() -> None:
    schema = {"$defs": {"node": {"properties": {"next": {"$ref": "#/$defs/node"}}}}}
    schema["$ref"] = "#/$defs/node"
    assert pointers_marked_secret(schema, "") == []


# --- pruning, checkpoints and the head witness ------------------------------------------------


async def _log_n(log: DecisionLog, n: int, start: int = 0) -> list[str]:
    return [
        await log.record(
            kind="dispatch",
            path="gateway/dispatch/decision",
            input={"task": {"input": {"n": i}}},
            decision=Decision(True, ("allowed",)),
            revision="r",
            subject="alice",
            agent="echo",
            task_id=f"t{i}",
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
async def log10(store_target: Any) -> Any:
    """A decision log of ten records in a real database, on each backend: (log, where the
    database is: a SQLite path or a PostgreSQL URL)."""
    store = open_store(store_target)
    log = DecisionLog(store, hub_id="h1")
    await _log_n(log, 10)
    yield log, store_target
    await store.close()


def _sql(db: Any, sql: str, *args: Any) -> list[Any]:
    return raw_sql(db, sql, *args)


def _seqs(path: Any) -> list[int]:
    return [r[0] for r in _sql(path, "SELECT seq FROM decisions ORDER BY seq")]


async def test_prune_exports_then_replaces_with_a_checkpoint_and_verify_proves_the_rest(
    log10: Any, tmp_path: Path
) -> None:
    log, db = log10
    head_before = (await log.verify()).head
    record4 = await log.get(_sql(db, "SELECT decision_id FROM decisions WHERE seq = 4")[0][0])
    export = tmp_path / "pruned.jsonl"
    cp = await log.prune(export, before=5)
    assert _seqs(db) == [5, 6, 7, 8, 9, 10]
    assert (cp["id"], cp["first_seq"], cp["through_seq"], cp["count"]) == (1, 1, 4, 4)
    assert (cp["start_hash"], cp["head_hash"]) == (GENESIS_HASH, record4["hash"])
    assert cp["export_sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    assert cp["export_name"] == "pruned.jsonl"
    # The export: JSON Lines, oldest first, a chain that verifies on its own.
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["seq"] for r in exported] == [1, 2, 3, 4]
    assert exported[-1] == record4
    assert verify_chain(exported, expected_count=4, expected_head=record4["hash"]).ok
    report = await log.verify()
    assert report.ok, report.problems
    assert (report.checked, report.start_seq, report.head) == (6, 5, head_before)
    assert report.checkpoint == cp
    assert report.witness == {"count": 10, "head": head_before}
    assert (await log.verify_export(export)).ok


async def test_prune_until_a_timestamp_never_removes_a_newer_record(
    log10: Any, tmp_path: Path
) -> None:
    log, db = log10
    times = dict(_sql(db, "SELECT seq, timestamp FROM decisions"))
    cp = await log.prune(tmp_path / "e.jsonl", until=times[3])
    assert cp["through_seq"] == 3
    assert _seqs(db)[0] == 4
    with pytest.raises(PruneError, match="nothing to prune"):
        await log.prune(tmp_path / "again.jsonl", until=times[3])
    assert not (tmp_path / "again.jsonl").exists()


async def test_a_record_tampered_after_the_checkpoint_is_named(log10: Any, tmp_path: Path) -> None:
    log, db = log10
    await log.prune(tmp_path / "e.jsonl", before=5)
    _sql(db, "UPDATE decisions SET allow = 0 WHERE seq = 7")
    report = await log.verify()
    assert kinds(report) == [("edited", 7)]


async def test_the_records_right_after_the_checkpoint_cannot_be_dropped_unseen(
    log10: Any, tmp_path: Path
) -> None:
    log, db = log10
    await log.prune(tmp_path / "e.jsonl", before=5)
    _sql(db, "DELETE FROM decisions WHERE seq IN (5, 6)")
    report = await log.verify()
    assert kinds(report) == [("deleted", 7)]
    assert "records seq 5..6 were deleted" in report.problems[0]["message"]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("edit a record", {("edited", None), ("edited", 2)}),
        ("drop the last line", {("edited", None), ("truncated", None)}),
        ("reformat", {("edited", None)}),
    ],
)
async def test_a_tampered_export_is_caught_against_its_checkpoint(
    log10: Any, tmp_path: Path, tamper: str, expected: set[tuple[str, int | None]]
) -> None:
    log, _ = log10
    export = tmp_path / "e.jsonl"
    await log.prune(export, before=5)
    lines = export.read_text().splitlines()
    if tamper == "edit a record":
        rec = json.loads(lines[1])
        rec["subject"] = "mallory"
        lines[1] = json.dumps(rec, sort_keys=True)
    elif tamper == "drop the last line":
        lines.pop()
    else:  # the same records, other bytes: the file is not the one the checkpoint names
        lines = [json.dumps(json.loads(line), indent=1).replace("\n", "") for line in lines]
    export.write_text("\n".join(lines) + "\n")
    report = await log.verify_export(export, checkpoint_id=1)
    assert not report.ok
    assert set(kinds(report)) == expected, report.problems
    assert any("SHA-256" in p["message"] for p in report.problems)
    # Without the checkpoint's id the export is matched by its first record's seq.
    assert set(kinds(await log.verify_export(export))) == expected
    with pytest.raises(UnknownCheckpoint):
        await log.verify_export(export, checkpoint_id=9)


async def test_a_cut_tail_is_reported_truncated_against_the_head_witness(
    log10: Any, tmp_path: Path
) -> None:
    log, db = log10
    head = (await log.verify()).head
    _sql(db, "DELETE FROM decisions WHERE seq > 7")
    report = await log.verify()  # the chain alone would say OK
    assert kinds(report) == [("truncated", None)]
    problem = report.problems[0]
    assert (problem["expected_count"], problem["expected_head"]) == (10, head)
    assert "records seq 8..10 were deleted from the end" in problem["message"]
    # The next decision continues from the witness, so the cut stays visible as a gap.
    await _log_n(log, 1)
    assert _seqs(db)[-1] == 11
    assert kinds(await log.verify()) == [("deleted", 11)]
    # And a log that does not verify is not pruned.
    with pytest.raises(PruneError, match="does not verify"):
        await log.prune(tmp_path / "e.jsonl", before=3)
    assert _seqs(db)[0] == 1


async def test_an_external_head_replaces_the_witness(log10: Any) -> None:
    log, db = log10
    head = (await log.verify()).head
    # Whoever cut the tail also rewound the witness: only a head kept elsewhere sees it.
    last7 = _sql(db, "SELECT hash FROM decisions WHERE seq = 7")[0][0]
    _sql(db, "DELETE FROM decisions WHERE seq > 7")
    _sql(db, "UPDATE decision_heads SET head_seq = 7, head_hash = ?", last7)
    assert (await log.verify()).ok
    report = await log.verify(expected_head=head, expected_count=10)
    assert kinds(report) == [("truncated", None)]
    assert report.problems[0]["expected_head"] == head


async def test_a_missing_witness_is_reported(log10: Any) -> None:
    log, db = log10
    _sql(db, "DELETE FROM decision_heads")
    report = await log.verify()
    assert kinds(report) == [("deleted", None)]
    assert "head witness is missing" in report.problems[0]["message"]


@pytest.mark.parametrize(
    "export",
    ["missing-folder/e.jsonl", "a-file/e.jsonl", "exists.jsonl"],
    ids=["no such folder", "parent is a file", "file exists"],
)
async def test_prune_is_refused_without_a_written_export(
    log10: Any, tmp_path: Path, export: str
) -> None:
    log, db = log10
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "exists.jsonl").write_text("an earlier export\n")
    with pytest.raises(PruneError, match="export"):
        await log.prune(tmp_path / export, before=5)
    assert _seqs(db) == list(range(1, 11))
    assert _sql(db, "SELECT count(*) FROM decision_checkpoints") == [(0,)]
    assert (tmp_path / "exists.jsonl").read_text() == "an earlier export\n"
    assert (await log.verify()).ok


async def test_a_prune_racing_another_deletes_nothing(log10: Any, tmp_path: Path) -> None:
    log, db = log10
    store = log.store
    real = store.iter_decisions_range

    async def export_then_race(first: int, through: int, consume: Any) -> Any:
        written = await real(first, through, consume)
        # Another prune runs between this one's export and its delete.
        store.iter_decisions_range = real  # type: ignore[method-assign]
        await DecisionLog(store, hub_id="other").prune(tmp_path / "other.jsonl", before=3)
        return written

    store.iter_decisions_range = export_then_race  # type: ignore[method-assign]
    with pytest.raises(PruneError, match="another prune"):
        await log.prune(tmp_path / "e.jsonl", before=5)
    assert not (tmp_path / "e.jsonl").exists()
    assert _seqs(db)[0] == 3
    assert (await log.verify()).ok


async def test_the_hub_keeps_appending_after_prunes_and_the_chain_verifies(
    log10: Any, tmp_path: Path
) -> None:
    log, db = log10
    await log.prune(tmp_path / "one.jsonl", before=5)
    await _log_n(log, 3, start=10)
    await log.prune(tmp_path / "two.jsonl", before=12)
    await _log_n(log, 2, start=13)
    report = await log.verify()
    assert report.ok, report.problems
    assert (report.start_seq, report.checked, report.witness["count"]) == (12, 4, 15)
    assert _seqs(db) == [12, 13, 14, 15]
    one, two = _sql(
        db, "SELECT id, prev_hash, hash, start_hash, head_hash FROM decision_checkpoints"
    )
    assert two[1] == one[2] and two[3] == one[4]  # checkpoint 2 chained to checkpoint 1
    assert (await log.verify_export(tmp_path / "one.jsonl")).checkpoint["id"] == 1
    assert (await log.verify_export(tmp_path / "two.jsonl")).checkpoint["id"] == 2
    # Everything pruned: the next record still continues the chain.
    await log.prune(tmp_path / "three.jsonl", before=1000)
    assert _seqs(db) == []
    assert (await log.verify()).ok
    await _log_n(log, 1, start=99)
    assert _seqs(db) == [16]
    assert (await log.verify()).ok


@pytest.mark.parametrize(
    ("tamper", "kind"),
    [
        (
            "UPDATE decision_checkpoints SET export_sha256 = 'f' || substr(export_sha256, 2)",
            "edited",
        ),
        ("UPDATE decision_checkpoints SET count = 3", "edited"),
        ("DELETE FROM decision_checkpoints WHERE id = 1", "deleted"),
    ],
    ids=["export hash edited", "count edited", "first of two deleted"],
)
async def test_a_tampered_checkpoint_is_named(
    log10: Any, tmp_path: Path, tamper: str, kind: str
) -> None:
    log, db = log10
    await log.prune(tmp_path / "one.jsonl", before=3)
    await log.prune(tmp_path / "two.jsonl", before=5)
    _sql(db, tamper)
    report = await log.verify()
    assert not report.ok
    assert report.problems[0]["kind"] == kind
    assert report.problems[0]["checkpoint"] in (1, 2)
    assert "checkpoint" in report.problems[0]["message"]


async def test_deleting_the_only_checkpoint_shows_the_pruned_records_missing(
    log10: Any, tmp_path: Path
) -> None:
    log, db = log10
    await log.prune(tmp_path / "e.jsonl", before=5)
    _sql(db, "DELETE FROM decision_checkpoints")
    report = await log.verify()
    assert kinds(report)[:1] == [("deleted", 5)]
    assert "records seq 1..4 were deleted" in report.problems[0]["message"]


async def test_an_older_database_gets_its_witness_from_the_stored_head(tmp_path: Path) -> None:
    store = Store(tmp_path / "gateway.db")
    log = DecisionLog(store, hub_id="h1")
    await _log_n(log, 4)
    head = (await log.verify()).head
    await store.close()
    # As a database written before migration 005 was: no witness, no checkpoints.
    path = tmp_path / "gateway.db"
    _sql(path, "DROP TABLE decision_heads")
    _sql(path, "DROP TABLE decision_checkpoints")
    _sql(path, "DELETE FROM _migrations WHERE name = '005_decision_heads_and_checkpoints'")
    store = Store(path)
    try:
        assert store.migrations_applied == ["005_decision_heads_and_checkpoints"]
        report = await DecisionLog(store, hub_id="h1").verify()
        assert report.ok and report.witness == {"count": 4, "head": head}
    finally:
        await store.close()


def test_verify_log_is_pure_and_checks_the_start_against_the_checkpoint() -> None:
    records = build(6)
    fields = checkpoint_fields(
        first_seq=1,
        through_seq=3,
        start_hash=GENESIS_HASH,
        head_hash=records[2].hash,
        export_sha256="0" * 64,
        export_name="e.jsonl",
    )
    cp = seal_checkpoint(fields, 1, GENESIS_HASH)
    witness = {"count": 6, "head": records[-1].hash}
    assert verify_log(records[3:], checkpoints=[cp], witness=witness).ok
    # Chained to a checkpoint that does not name its predecessor's head.
    report = verify_log(records[4:], checkpoints=[cp], witness=witness)
    assert kinds(report) == [("deleted", 5)]
    assert verify_export(records[:3], checkpoint=cp, sha256="0" * 64).ok
