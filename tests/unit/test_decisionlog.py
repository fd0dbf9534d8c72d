"""Decision-log chain building, tamper detection and input masking."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
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
    canonical_bytes,
    chain_hash,
    pointers_marked_secret,
    record_from_row,
    record_to_json,
    seal_record,
    verify_chain,
)
from gateway.errors import ConfigError
from gateway.policy.engine import Decision
from gateway.store import Store


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


async def test_concurrent_decisions_extend_one_chain(tmp_path: Path) -> None:
    store = Store(tmp_path / "gateway.db")
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
    assert kinds(report) == [("deleted", None)]
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
