"""The stores: SQLite's single writer (group commit keeps each write's outcome its own),
then the ``TaskStore`` interface on both backends, and two hubs on one PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.decisionlog.log import DecisionLog
from gateway.errors import IdempotencyConflict, InvalidState, StoreUnavailable, UnknownTask
from gateway.policy.engine import Decision
from gateway.store import Store, TaskStore, open_store
from tests.pg import raw_sql


async def test_concurrent_writes_share_transactions_but_not_failures(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.write(lambda db: db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)"))

    def insert(k: int) -> Any:
        return lambda db: db.execute("INSERT INTO t VALUES (?)", [k]).rowcount

    # 200 writes in flight at once; k=7 is written twice, so its second insert must fail
    # alone while every other write in the same batch commits.
    keys = [*range(200), 7]
    results = await asyncio.gather(*(store.write(insert(k)) for k in keys), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], sqlite3.IntegrityError)
    rows = await store.read(lambda db: db.execute("SELECT count(*) FROM t").fetchone()[0])
    assert rows == 200
    await store.close()


async def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.write(lambda db: db.execute("CREATE TABLE t (k INTEGER)"))

    def half_then_fail(db: Any) -> None:
        db.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await store.write(half_then_fail)
    assert await store.read(lambda db: db.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    await store.close()


async def test_only_a_batch_of_non_durable_writes_is_committed_without_fsync(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.write(lambda db: db.execute("CREATE TABLE t (k INTEGER)"))
    modes: list[int] = []

    def insert(k: int) -> Any:
        def tx(db: Any) -> None:
            modes.append(db.execute("PRAGMA synchronous").fetchone()[0])
            db.execute("INSERT INTO t VALUES (?)", [k])

        return tx

    await store.write(insert(1), durable=False)  # alone in its batch: NORMAL (1)
    assert (modes, store.lazy_commits) == ([1], 1)
    # Hold the writer so the next two share one batch: the durable one makes it FULL (2).
    held = asyncio.ensure_future(store.write(lambda db: time.sleep(0.2)))
    await asyncio.sleep(0.05)
    both = asyncio.gather(store.write(insert(2), durable=False), store.write(insert(3)))
    await asyncio.gather(held, both)
    assert modes[1:] == [2, 2] and store.lazy_commits == 1
    # And the connection is back to FULL for the writes after a lazy one.
    await store.write(insert(4))
    assert modes[-1] == 2
    await store.close()


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.close()
    with pytest.raises(Exception, match="closed"):
        await store.ping_write()


# --- the TaskStore interface, on each backend (SQLite, and a real PostgreSQL) -------------


def task_row(task_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "agent": "echo",
        "capability": "debug.echo",
        "subject": "alice",
        "input": {"n": 1},
        "timeout_s": 30.0,
        "deadline": 1e10,
        "decision_id": "d",
        "sandbox": {"network": "internal"},
        "attempts": 0,
        **extra,
    }


@pytest.fixture
async def store(store_target: Any) -> Any:
    """A fresh store on each backend."""
    opened = open_store(store_target)
    yield opened
    await opened.close()


async def test_a_task_moves_only_from_the_states_it_may_leave(store: TaskStore) -> None:
    task, created = await store.create_task(task_row("t1"))
    assert (created, task.state, task.input, task.sandbox) == (
        True,
        "pending",
        {"n": 1},
        {"network": "internal"},
    )
    # As a warm dispatch writes it: not durable on its own (the next durable commit is).
    moved = await store.transition(
        "t1",
        "running",
        allowed_from=("pending",),
        via="dispatched",
        durable=False,
        container_id="c1",
    )
    assert (moved.state, moved.container_id) == ("running", "c1")
    assert [e.state for e in moved.history or ()] == ["pending", "dispatched", "running"]
    with pytest.raises(InvalidState) as refused:
        await store.transition("t1", "dispatched", allowed_from=("pending",))
    assert refused.value.details == {"state": "running"}
    with pytest.raises(UnknownTask):
        await store.transition("nope", "failed", allowed_from=("pending",))
    await store.update_task("t1", result={"ok": True})
    done = await store.transition("t1", "succeeded", allowed_from=("running",), detail="fine")
    got = await store.get_task("t1")
    assert (got.state, got.result, got.terminal) == ("succeeded", {"ok": True}, True)
    assert got.history is not None and got.history[-1].detail == "fine"
    assert done.updated_at == got.updated_at
    with pytest.raises(UnknownTask):
        await store.get_task("nope")


async def test_racing_transitions_end_a_task_exactly_once(store: TaskStore) -> None:
    await store.create_task(task_row("t1"))
    ends = ["succeeded", "failed", "timed_out", "cancelled"] * 5
    results = await asyncio.gather(
        *(store.transition("t1", s, allowed_from=("pending", "running")) for s in ends),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, InvalidState) for r in results if r not in winners)
    history = (await store.get_task("t1")).history or ()
    assert [e.state for e in history] == ["pending", winners[0].state]


async def test_an_idempotency_key_creates_one_task(store: TaskStore) -> None:
    idem = ("alice", "k1", "hash-a")
    first, created = await store.create_task(task_row("t1"), idem)
    assert first.id == "t1"
    again, created_again = await store.create_task(task_row("t2"), idem)
    assert (created, created_again, again.id) == (True, False, "t1")
    with pytest.raises(IdempotencyConflict):
        await store.create_task(task_row("t3"), ("alice", "k1", "hash-b"))
    found = await store.task_for_key("alice", "k1", "hash-a")
    assert found is not None and found.id == "t1" and found.history
    assert await store.task_for_key("bob", "k1", "hash-a") is None
    # Given at once, still one task.
    racing = await asyncio.gather(
        *(store.create_task(task_row(f"r{i}"), ("alice", "k2", "h")) for i in range(10))
    )
    assert sum(created for _, created in racing) == 1
    assert len({task.id for task, _ in racing}) == 1
    # Expired (recorded before keys_since): used afresh; pruned: gone.
    later = "9999-01-01T00:00:00Z"
    fresh, created = await store.create_task(task_row("t4"), idem, keys_since=later)
    assert (fresh.id, created) == ("t4", True)
    assert await store.prune_idempotency(later) == 2
    assert await store.task_for_key("alice", "k1", "hash-a") is None


async def test_lists_counts_and_lineage(store: TaskStore) -> None:
    for i in range(5):
        await store.create_task(task_row(f"t{i}", parent_id=f"t{i - 1}" if i else None))
    await store.transition("t1", "dispatched", allowed_from=("pending",))
    await store.transition("t2", "failed", allowed_from=("pending",))
    page1, cursor = await store.list_tasks(limit=2)
    assert [t.id for t in page1] == ["t4", "t3"] and cursor is not None
    page2, cursor2 = await store.list_tasks(limit=2, before=cursor)
    page3, cursor3 = await store.list_tasks(limit=2, before=cursor2)
    assert [t.id for t in page2 + page3] == ["t2", "t1", "t0"] and cursor3 is None
    assert [t.id for t in (await store.list_tasks(state="failed"))[0]] == ["t2"]
    assert [t.id for t in await store.active_tasks()] == ["t0", "t1", "t3", "t4"]
    assert await store.active_task_ids() == {"t0", "t1", "t3", "t4"}
    assert await store.count_tasks_by_state() == {"pending": 3, "dispatched": 1, "failed": 1}
    assert await store.ancestors("t3") == [("t0", "echo"), ("t1", "echo"), ("t2", "echo")]
    waiting, last = await store.dispatch_watch("9999-01-01T00:00:00Z")
    assert waiting == 3 and last is not None


async def test_revisions_and_alerts_are_recorded_once(store: TaskStore, store_target: Any) -> None:
    for _ in range(2):
        await store.record_policy_revision("p1", ["a.rego"])
        await store.record_registry("r1", "agents.yaml", {"echo": {}})
    alert = {"name": "x", "severity": "warning", "message": "m", "started_at": "t0"}
    await store.record_alert(alert)
    await store.record_alert({**alert, "resolved_at": "t1"})
    await store.ping_write()
    assert raw_sql(store_target, "SELECT count(*) FROM policy_revisions") == [(1,)]
    assert raw_sql(store_target, "SELECT count(*) FROM registry_revisions") == [(1,)]
    assert raw_sql(store_target, "SELECT name, resolved_at FROM alerts") == [("x", "t1")]


async def test_migrations_are_recorded_and_applied_once(store_target: Any) -> None:
    first = open_store(store_target)
    await first.ping_write()
    assert first.migrations_applied  # a new database: every migration
    await first.close()
    again = open_store(store_target)
    await again.ping_write()
    assert again.migrations_applied == []
    await again.close()
    names = {r[0] for r in raw_sql(store_target, "SELECT name FROM _migrations")}
    assert names == set(first.migrations_applied)


async def test_a_closed_store_refuses_writes(store_target: Any) -> None:
    closed = open_store(store_target)
    await closed.ping_write()
    await closed.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await closed.create_task(task_row("t1"))


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "a.db"), Store)
    assert isinstance(open_store(f"sqlite:///{tmp_path}/b.db"), Store)
    assert (tmp_path / "b.db").exists()
    assert type(open_store("postgresql:///x?host=/nonexistent")).__name__ == "PostgresStore"
    with pytest.raises(ValueError, match="neither"):
        open_store("mysql://db/x")


# --- what only a shared server shows: two stores (two hubs) on one PostgreSQL -------------


async def test_two_hubs_racing_one_transition_one_wins(pg_target: str) -> None:
    hubs = [open_store(pg_target), open_store(pg_target)]
    try:
        ids = [f"t{i}" for i in range(30)]
        for task_id in ids:
            await hubs[0].create_task(task_row(task_id))
        attempts = [
            hubs[n % 2].transition(task_id, end, allowed_from=("pending",))
            for task_id in ids
            for n, end in enumerate(("succeeded", "timed_out", "cancelled", "failed"))
        ]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        assert sorted(t.id for t in won) == sorted(ids)  # exactly one winner per task
        assert all(isinstance(r, InvalidState) for r in results if r not in won)
        events = raw_sql(pg_target, "SELECT task_id, count(*) FROM task_events GROUP BY task_id")
        assert {count for _, count in events} == {2}  # pending, then one terminal state
    finally:
        for hub in hubs:
            await hub.close()


async def test_two_hubs_appending_decisions_form_one_chain(pg_target: str) -> None:
    hubs = [open_store(pg_target), open_store(pg_target)]
    logs = [DecisionLog(hub, hub_id=f"h{n}") for n, hub in enumerate(hubs)]
    try:

        async def record(n: int) -> str:
            return await logs[n % 2].record(
                kind="dispatch",
                path="gateway/dispatch/decision",
                input={"task": {"input": {"n": n}}},
                decision=Decision(True, ("allowed",)),
                revision="r",
                subject="alice",
                agent="echo",
                task_id=f"t{n}",
            )

        async def create(n: int) -> None:
            sealed = logs[n % 2].prepare(
                kind="dispatch",
                path="gateway/dispatch/decision",
                input={"task": {"input": {"n": n}}},
                decision=Decision(True, ("allowed",)),
                revision="r",
                subject="alice",
                agent="echo",
                task_id=f"c{n}",
            )
            await hubs[n % 2].create_task(task_row(f"c{n}"), decisions=[sealed])

        await asyncio.gather(*(record(n) for n in range(120)), *(create(n) for n in range(40)))
        for log in logs:  # the existing verifier, from either hub
            report = await log.verify()
            assert (report.ok, report.checked) == (True, 160), report.problems
        seqs = [r[0] for r in raw_sql(pg_target, "SELECT seq FROM decisions ORDER BY seq")]
        assert seqs == list(range(1, 161))
        hub_ids = raw_sql(pg_target, "SELECT DISTINCT labels FROM decisions")
        assert len(hub_ids) == 2  # both hubs wrote into the one chain
        assert len((await hubs[1].list_tasks(limit=100))[0]) == 40
    finally:
        for hub in hubs:
            await hub.close()


async def test_an_unreachable_server_is_store_unavailable_until_it_is_back(
    tmp_path: Path,
) -> None:
    nowhere = open_store(f"postgresql:///gateway?host={tmp_path}&port=5432&user=gateway")
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        await nowhere.ping_write()
    await nowhere.close()


async def test_a_restarted_server_is_reconnected(pg_cluster: Any, pg_target: str) -> None:
    store = open_store(pg_target)
    try:
        await store.create_task(task_row("t1"))
        await asyncio.to_thread(pg_cluster.restart)
        outcomes = []
        for _ in range(20):  # the pool's connections died with the server: new ones come
            try:
                await store.ping_write()
                outcomes.append("ok")
                break
            except StoreUnavailable:
                outcomes.append("unavailable")
                await asyncio.sleep(0.1)
        assert outcomes[-1] == "ok", outcomes
        assert (await store.get_task("t1")).state == "pending"  # nothing committed was lost
    finally:
        await store.close()


async def test_a_hub_on_postgresql_runs_a_task_and_logs_its_decisions(
    pg_target: str, tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    from gateway.http.app import HUB, create_app
    from tests.conftest import FakeBackend, auth, make_settings

    app = create_app(make_settings(tmp_path, store=pg_target), backend=FakeBackend())
    client = await aiohttp_client(app)
    body = {"capability": "debug.echo", "input": {"hello": "world"}}
    headers = {**auth(keys["user"]), "Idempotency-Key": "once"}
    resp = await client.post("/v1/tasks?wait=10", json=body, headers=headers)
    task = await resp.json()
    assert (resp.status, task["state"]) == (200, "succeeded"), task
    again = await client.post("/v1/tasks?wait=10", json=body, headers=headers)
    assert (await again.json())["task_id"] == task["task_id"]
    hub = app[HUB]
    assert (await hub.store.get_task(task["task_id"])).state == "succeeded"
    assert raw_sql(pg_target, "SELECT count(*) FROM tasks") == [(1,)]
    report = await hub.decisions.verify()
    assert report.ok and report.checked >= 1, report.problems
