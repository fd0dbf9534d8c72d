"""The decision log end to end: masking through HTTP, ``agent-gateway decisions
list|show|export|verify`` on the SQLite file a hub wrote, and tampering with that file.

Every tamper test edits the real database (as someone with write access to the file would)
and checks that ``verify`` exits non-zero and names the record at fault.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.decisionlog import REDACTED, ChainBuilder, chain_hash, row_to_json, verify_chain
from gateway.http.app import HUB, create_app
from gateway.http.views import task_view
from tests.conftest import FakeBackend, auth, make_settings, submit_through_router

MASK = ("erase:/request/remote_addr", "mask:/subject/key_id")
# (key, body, allowed): seq 1..6 in this order.
SUBMISSIONS = [
    ("user", {"agent": "echo", "input": {"api_key": "s3cret", "note": "hi"}}, True),
    ("user", {"capability": "code.eval", "input": {"expression": "1+1"}}, False),
    ("developer", {"capability": "code.eval", "input": {"expression": "2*3"}}, True),
    ("user", {"capability": "debug.echo", "input": {"n": 4}}, True),
    ("nobody", {"capability": "debug.echo", "input": {"n": 5}}, False),
    ("user", {"capability": "text.stats", "input": {"text": "a b a"}}, True),
]


@pytest.fixture
async def logged(tmp_path: Path, keys: dict[str, str], aiohttp_client: Any) -> Any:
    """A hub that made the six decisions above: (client, state dir, decision ids by seq).

    Submitted through the task router (the path ``POST /v1/tasks`` takes after its API
    decision), so that seq 1..6 are exactly these six dispatch decisions.
    """
    settings = make_settings(tmp_path, mask=MASK, reload_poll_s=0)
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    hub = client.app[HUB]
    ids: dict[int, str] = {}
    results: dict[int, Any] = {}
    for seq, (who, body, allowed) in enumerate(SUBMISSIONS, 1):
        ids[seq], done = await submit_through_router(hub, keys[who], body)
        assert (done is not None) == allowed, (seq, done)
        if done is not None:
            results[seq] = task_view(done)
    return client, settings.state_dir, ids, results


def cli(*args: str) -> list[str]:
    return ["decisions", *args]


async def run(*argv: str) -> int:
    # main() runs its own event loop: off this one.
    return await asyncio.to_thread(main, list(argv))


def db(state: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(state / "gateway.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


# --- masking -------------------------------------------------------------------------------


async def test_masking_rules_and_secret_fields_apply_before_logging(
    logged: Any, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    client, state, ids, results = logged
    # The agent got the real value; the log did not.
    assert results[1]["result"]["echo"]["api_key"] == "s3cret"
    resp = await client.get(f"/v1/decisions/{ids[1]}", headers=auth(keys["auditor"]))
    record = await resp.json()
    assert record["input"]["task"]["input"] == {"api_key": REDACTED, "note": "hi"}
    assert record["input"]["subject"]["key_id"] == REDACTED
    assert "remote_addr" not in record["input"]["request"]
    assert record["masked"] == ["/subject/key_id", "/task/input/api_key"]
    assert record["erased"] == ["/request/remote_addr"]
    # Masked before hashing: the chain verifies over what was written.
    await client.close()
    assert await run(*cli("show", ids[1], "--state-dir", str(state))) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["input"] == record["input"]
    assert _secret_only_in_tasks(state)


def _secret_only_in_tasks(state: Path) -> bool:
    """The task table keeps the input (it is what runs); the decisions table must not."""
    with db(state) as conn:
        assert conn.execute("SELECT count(*) FROM tasks WHERE input LIKE '%s3cret%'").fetchone()
        hits = conn.execute("SELECT count(*) FROM decisions WHERE input LIKE '%s3cret%'")
        return bool(hits.fetchone()[0] == 0)


# --- list, show, export, verify --------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected_seqs"),
    [
        ([], [6, 5, 4, 3, 2, 1]),
        (["--decision", "deny"], [5, 2]),
        (["--decision", "allow", "--agent", "calc"], [3]),
        (["--subject", "developer"], [3]),
        (["--kind", "message"], []),
        (["--limit", "2"], [6, 5]),
    ],
    ids=["all", "denials", "allowed calc", "by subject", "by kind", "limit"],
)
async def test_list_filters(
    logged: Any, capsys: pytest.CaptureFixture[str], filters: list[str], expected_seqs: list[int]
) -> None:
    client, state, ids, _ = logged
    await client.close()
    assert await run(*cli("list", "--state-dir", str(state), *filters)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [next(s for s, i in ids.items() if i in line) for line in lines] == expected_seqs
    for line in lines:
        verdict = line.split()[1]
        assert verdict == ("allow" if SUBMISSIONS[_seq(ids, line) - 1][2] else "deny")


def _seq(ids: dict[int, str], line: str) -> int:
    return next(s for s, i in ids.items() if i in line)


async def test_list_filters_by_time(logged: Any, capsys: pytest.CaptureFixture[str]) -> None:
    client, state, ids, _ = logged
    await client.close()
    with db(state) as conn:
        times = {
            r["seq"]: r["timestamp"] for r in conn.execute("SELECT seq, timestamp FROM decisions")
        }
    window = ["--since", times[2], "--until", times[4]]
    assert await run(*cli("list", "--state-dir", str(state), *window)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [_seq(ids, line) for line in lines] == [4, 3, 2]


async def test_export_is_json_lines_oldest_first_and_verifiable(
    logged: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    client, state, ids, _ = logged
    await client.close()
    assert await run(*cli("export", "--state-dir", str(state))) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["decision_id"] for r in records] == [ids[s] for s in range(1, 7)]
    assert verify_chain(records).ok
    assert await run(*cli("export", "--state-dir", str(state), "--decision", "deny")) == 0
    denials = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in denials] == [2, 5]


async def test_show_and_verify_an_intact_log(
    logged: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    client, state, ids, _ = logged
    await client.close()
    assert await run(*cli("show", ids[2], "--state-dir", str(state))) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["result"]["allow"] is False
    assert shown["result"]["reasons"] == [
        'capability "code.eval" requires one of the roles ["developer"]'
    ]
    assert await run(*cli("show", "no-such-id", "--state-dir", str(state))) == 1
    assert "no decision" in capsys.readouterr().err
    assert await run(*cli("verify", "--state-dir", str(state))) == 0
    assert capsys.readouterr().out.startswith("OK: 6 records checked")
    assert await run(*cli("verify", "--state-dir", str(state / "nowhere"))) == 2


# --- tampering with the file -----------------------------------------------------------------


def _edit(conn: sqlite3.Connection, ids: dict[int, str]) -> str:
    conn.execute(
        "UPDATE decisions SET result = ?, allow = 1 WHERE seq = 2",
        [json.dumps({"allow": True, "reasons": ["allowed"]})],
    )
    return ids[2]


def _edit_and_rehash(conn: sqlite3.Connection, ids: dict[int, str]) -> str:
    record = row_to_json(conn.execute("SELECT * FROM decisions WHERE seq = 2").fetchone())
    record["subject"] = "someone-else"
    fixed = chain_hash(record["prev_hash"], record)
    conn.execute(
        "UPDATE decisions SET subject = ?, hash = ? WHERE seq = 2", ["someone-else", fixed]
    )
    return ids[2]


def _delete(conn: sqlite3.Connection, ids: dict[int, str]) -> str:
    conn.execute("DELETE FROM decisions WHERE seq = 3")
    return ids[4]  # the record that lost its predecessor; the message names seq 3


def _insert(conn: sqlite3.Connection, ids: dict[int, str]) -> str:
    """Make room after seq 2 and insert a well-formed record, chained to seq 2."""
    before = conn.execute("SELECT hash FROM decisions WHERE seq = 2").fetchone()[0]
    forged = ChainBuilder(before, 2).append(
        path="gateway/dispatch/decision",
        input={"subject": {"id": "mallory"}},
        result={"allow": True, "reasons": ["allowed"]},
        revision="forged",
        kind="dispatch",
        allow=True,
        subject="mallory",
        decision_id="forged-decision",
    )
    conn.execute("UPDATE decisions SET seq = seq + 1000 WHERE seq >= 3")
    conn.execute("UPDATE decisions SET seq = seq - 999 WHERE seq >= 1003")
    row = {k: getattr(forged, k) for k in forged.__dataclass_fields__}
    for name in ("input", "result", "labels", "metrics", "erased", "masked"):
        row[name] = json.dumps(row[name], sort_keys=True)
    row["allow"] = 1
    names = ", ".join(row)
    conn.execute(
        f"INSERT INTO decisions ({names}) VALUES ({', '.join('?' for _ in row)})",
        list(row.values()),
    )
    return "forged-decision"


def _reorder(conn: sqlite3.Connection, ids: dict[int, str]) -> str:
    conn.execute("UPDATE decisions SET seq = -1 WHERE seq = 3")
    conn.execute("UPDATE decisions SET seq = 3 WHERE seq = 4")
    conn.execute("UPDATE decisions SET seq = 4 WHERE seq = -1")
    return ids[3] + "|" + ids[4]


def _malformed(conn: sqlite3.Connection, ids: dict[int, str]) -> str:
    conn.execute("UPDATE decisions SET input = '{not json' WHERE seq = 5")
    return ids[5]


TAMPERING = [
    ("edited", _edit, "edited", "was edited"),
    ("edited and re-hashed", _edit_and_rehash, "edited", "re-hashed"),
    ("deleted", _delete, "deleted", "record seq 3 was deleted"),
    ("inserted", _insert, "inserted", "was inserted"),
    ("reordered", _reorder, "reordered", "out of order"),
    ("malformed", _malformed, "edited", "malformed"),
]


@pytest.mark.parametrize(
    ("tamper", "kind", "message"),
    [case[1:] for case in TAMPERING],
    ids=[case[0] for case in TAMPERING],
)
async def test_verify_names_the_tampered_record(
    logged: Any, capsys: pytest.CaptureFixture[str], tamper: Any, kind: str, message: str
) -> None:
    client, state, ids, _ = logged
    await client.close()
    with db(state) as conn:
        culprit = tamper(conn, ids)
    assert await run(*cli("verify", "--state-dir", str(state))) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("TAMPERED: ")
    problems = out[:-1]
    # The first problem is the one at fault, by kind, record and reason.
    assert problems[0].startswith(kind.upper() + ":"), out
    assert any(c in problems[0] for c in culprit.split("|")), out
    assert message in problems[0], out
    # Nothing else is blamed but the records touched.
    touched = set(culprit.split("|"))
    if kind == "inserted":  # the records after it were renumbered to make room
        touched |= {ids[s] for s in range(3, 7)}
    for line in problems:
        assert any(t in line for t in touched), line
    # Reading a damaged log still works (a malformed row is shown as such).
    assert await run(*cli("list", "--state-dir", str(state))) == 0
    listing = capsys.readouterr().out
    if kind == "edited" and message == "malformed":
        assert "MALFORMED ROW" in listing


async def test_the_verify_endpoint_reports_tampering_to_auditors_only(
    logged: Any, keys: dict[str, str]
) -> None:
    client, state, ids, _ = logged
    resp = await client.get("/v1/decisions/verify", headers=auth(keys["auditor"]))
    body = await resp.json()
    assert resp.status == 200, body
    # Six dispatch decisions plus this call's own API decision, logged before it runs.
    assert (body["ok"], body["checked"], body["problems"]) == (True, 7, [])
    assert body["revisions"]["combined"]
    denied = await client.get("/v1/decisions/verify", headers=auth(keys["user"]))
    assert denied.status == 403
    with db(state) as conn:
        _edit(conn, ids)
    body = await (await client.get("/v1/decisions/verify", headers=auth(keys["auditor"]))).json()
    assert body["ok"] is False
    assert [(p["kind"], p["decision_id"]) for p in body["problems"]] == [("edited", ids[2])]
    # A malformed row is shown by the read endpoints, flagged, instead of failing them.
    with db(state) as conn:
        _malformed(conn, ids)
    page = await (await client.get("/v1/decisions", headers=auth(keys["auditor"]))).json()
    flagged = [d["decision_id"] for d in page["decisions"] if "malformed" in d]
    assert flagged == [ids[5]]
    one = await client.get(f"/v1/decisions/{ids[5]}", headers=auth(keys["auditor"]))
    assert one.status == 200
    assert "malformed" in await one.json()


# --- prune, checkpoints and the head witness ---------------------------------------------------


async def test_prune_exports_and_verify_proves_the_rest_and_the_export(
    logged: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, state, ids, _ = logged
    await client.close()
    export = tmp_path / "pruned.jsonl"
    assert (
        await run(
            *cli("prune", "--before", "4", "--export", str(export), "--state-dir", str(state))
        )
        == 0
    )
    checkpoint = json.loads(capsys.readouterr().out)
    assert (checkpoint["first_seq"], checkpoint["through_seq"], checkpoint["count"]) == (1, 3, 3)
    assert [json.loads(line)["decision_id"] for line in export.read_text().splitlines()] == [
        ids[1],
        ids[2],
        ids[3],
    ]
    with db(state) as conn:
        assert [r[0] for r in conn.execute("SELECT seq FROM decisions ORDER BY seq")] == [4, 5, 6]
    assert await run(*cli("verify", "--state-dir", str(state))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("OK: 3 records checked")
    assert out[0].startswith("CHECKPOINT: records seq 1..3 were pruned")
    assert checkpoint["export_sha256"] in out[0]
    assert await run(*cli("verify", "--export", str(export), "--state-dir", str(state))) == 0
    assert capsys.readouterr().out.startswith("OK: 3 records checked in")
    # The export tampered with: caught against the checkpoint, and named.
    lines = export.read_text().splitlines()
    forged = json.loads(lines[1])
    forged["result"] = {"allow": True, "reasons": ["allowed"]}
    lines[1] = json.dumps(forged, sort_keys=True)
    export.write_text("\n".join(lines) + "\n")
    assert await run(*cli("verify", "--export", str(export), "--state-dir", str(state))) == 1
    out = capsys.readouterr().out
    assert "SHA-256" in out and f"({ids[2]}): record seq 2" in out
    assert out.splitlines()[-1].startswith("TAMPERED: ")
    assert (
        await run(*cli("verify", "--export", str(tmp_path / "none"), "--state-dir", str(state)))
        == 2
    )
    assert "cannot read" in capsys.readouterr().err
    no_cp = ["--checkpoint", "7", "--state-dir", str(state)]
    assert await run(*cli("verify", "--export", str(export), *no_cp)) == 2
    assert "no checkpoint 7" in capsys.readouterr().err


async def test_prune_is_refused_when_the_export_cannot_be_written(
    logged: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, state, _, _ = logged
    await client.close()
    export = tmp_path / "no-such-folder" / "pruned.jsonl"
    argv = cli("prune", "--before", "4", "--export", str(export), "--state-dir", str(state))
    assert await run(*argv) == 1
    assert "prune refused: cannot write the export" in capsys.readouterr().err
    with db(state) as conn:
        assert conn.execute("SELECT count(*) FROM decisions").fetchone()[0] == 6
        assert conn.execute("SELECT count(*) FROM decision_checkpoints").fetchone()[0] == 0
    assert not export.parent.exists()
    with pytest.raises(SystemExit):  # no --export: argparse's usage error
        await run(*cli("prune", "--before", "4", "--state-dir", str(state)))
    assert "--export" in capsys.readouterr().err


async def test_verify_reports_a_cut_tail_as_truncated(
    logged: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    client, state, _, _ = logged
    await client.close()
    with db(state) as conn:
        head = conn.execute("SELECT hash FROM decisions WHERE seq = 6").fetchone()[0]
        conn.execute("DELETE FROM decisions WHERE seq > 3")
    assert await run(*cli("verify", "--state-dir", str(state))) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TRUNCATED: ")
    assert "records seq 4..6 were deleted from the end" in out[0] and head[:12] in out[0]
    assert out[-1].startswith("TAMPERED: 3 records checked")


async def test_the_verify_endpoint_shows_the_checkpoint_and_a_truncation(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    # API reads not logged, so that the verify call itself appends nothing: a logged one
    # would continue the chain from the witness and turn the cut into a gap (``deleted``).
    settings = make_settings(tmp_path, reload_poll_s=0, log_api_reads=False)
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    hub = client.app[HUB]
    for who, body, _ in SUBMISSIONS:
        await submit_through_router(hub, keys[who], body)
    export = tmp_path / "pruned.jsonl"
    # Pruned from the command line while the hub runs, as an operator would.
    argv = cli("prune", "--before", "3", "--export", str(export))
    assert await run(*argv, "--state-dir", str(settings.state_dir)) == 0

    async def verify() -> dict[str, Any]:
        resp = await client.get("/v1/decisions/verify", headers=auth(keys["auditor"]))
        assert resp.status == 200
        return dict(await resp.json())

    body = await verify()
    assert (body["ok"], body["checked"], body["start_seq"]) == (True, 4, 3), body
    assert (body["checkpoint"]["through_seq"], body["checkpoint"]["count"]) == (2, 2)
    assert body["witness"]["count"] == 6
    # The hub keeps deciding after the prune: the chain still verifies.
    await submit_through_router(hub, keys["user"], SUBMISSIONS[0][1])
    body = await verify()
    assert (body["ok"], body["checked"], body["witness"]["count"]) == (True, 5, 7)
    head = body["head"]
    with db(settings.state_dir) as conn:
        conn.execute("DELETE FROM decisions WHERE seq > 4")
    body = await verify()
    assert body["ok"] is False
    assert [p["kind"] for p in body["problems"]] == ["truncated"]
    assert (body["problems"][0]["expected_count"], body["problems"][0]["expected_head"]) == (
        7,
        head,
    )
    assert body["checkpoint"]["through_seq"] == 2
