"""Store and restart figures: single-writer throughput, start-to-ready, recovery time.

1. Writes per second through the one writer thread, with 64 coroutines writing at once:
   task creation, state transitions, and chained + masked decision records.
2. Hub start to ready (config, store, engine, recovery) with 1,000 tasks in the database,
   against the real Docker engine: (a) all finished; (b) 1,000 unfinished whose deadlines
   passed while the hub was down, so recovery must end each one.

``--durability`` instead measures what ``synchronous=FULL`` (the store's setting: every
commit is fsynced) costs against NORMAL, in one run: the writes of 1. with each, in
alternating rounds (NORMAL then FULL, three times; medians), and task creations one at a
time, where no group commit shares the fsync. The databases are made under ``bench/``, on
the checkout's disk: in a tmpfs /tmp an fsync would cost nothing. No Docker needed.

``--postgres`` (or ``--store postgresql://...``) instead measures the writes of 1. on
SQLite (synchronous=FULL) and on PostgreSQL (synchronous_commit=on) in one run, alternating
rounds (SQLite then PostgreSQL, three times; medians): on the URL given, else on a
throwaway cluster of Debian's PostgreSQL made under ``bench/`` (gateway.store.pg_server).
Both on the same disk, each durable before it answers. No Docker needed.

Usage: python bench/bench_store.py [n_writes] [--durability | --postgres | --store URL]
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import rate, report
from gateway.decisionlog.log import DecisionLog
from gateway.hub import Hub
from gateway.policy.engine import Decision
from gateway.settings import REPO_ROOT, Settings
from gateway.store import Store, TaskStore, open_store

STORE_URL = next(
    (sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--store" and i > 0), None
)
ARGS = [a for a in sys.argv[1:] if not a.startswith("--") and a != STORE_URL]
POSTGRES = "--postgres" in sys.argv[1:] or STORE_URL is not None
N = int(ARGS[0]) if ARGS else 5000
DURABILITY = "--durability" in sys.argv[1:]
ROUNDS = 3
HERE = Path(__file__).resolve().parent
CONCURRENCY = 64
INPUT = {
    "subject": {"id": "alice", "roles": ["user"], "key_id": "abc"},
    "task": {"capability": "debug.echo", "input": {"msg": "x" * 200, "password": "hunter2"}},
    "agent": {"name": "echo", "image": "agent-gateway/echo:dev", "capabilities": ["debug.echo"]},
    "request": {"method": "POST", "path": "/v1/tasks", "remote_addr": "127.0.0.1"},
}


def row(task_id: str, deadline: float) -> dict[str, object]:
    return {
        "id": task_id,
        "agent": "echo",
        "capability": "debug.echo",
        "subject": "bench",
        "input": {"n": 1},
        "timeout_s": 30.0,
        "deadline": deadline,
        "decision_id": "d",
        "sandbox": {},
        "attempts": 0,
    }


async def writes(
    tmp: Path, synchronous: str = "FULL", n: int = N, store: TaskStore | None = None
) -> dict[str, float]:
    if store is None:
        path = tmp / f"w-{synchronous}-{uuid.uuid4().hex[:6]}.db"
        store = Store(path, synchronous=synchronous)
    ids = [str(uuid.uuid4()) for _ in range(n)]
    deadline = time.time() + 3600
    create = await rate(n, lambda i: store.create_task(row(ids[i], deadline)), CONCURRENCY)
    move = await rate(
        n,
        lambda i: store.transition(ids[i], "dispatched", allowed_from=("pending",)),
        CONCURRENCY,
    )
    log = DecisionLog(store, hub_id="bench", masking=[("/task/input/password", "mask")])
    decision = Decision(True, ("allowed",), {"network": "internal"})

    def record(i: int) -> object:
        return log.record(
            kind="dispatch",
            path="gateway/dispatch/decision",
            input=INPUT,
            decision=decision,
            revision="bench",
            subject="alice",
            agent="echo",
            task_id=ids[i],
        )

    decisions = await rate(n, record, CONCURRENCY)
    verify_start = time.perf_counter()
    verified = await log.verify()
    verify_rate = verified.checked / (time.perf_counter() - verify_start)
    assert verified.ok
    await store.close()
    return {
        "task_creates_per_s": create,
        "transitions_per_s": move,
        "decisions_per_s (chained, masked)": decisions,
        "verify_records_per_s": verify_rate,
    }


async def start_to_ready(tmp: Path, *, unfinished: bool) -> dict[str, float]:
    state = tmp / ("unfinished" if unfinished else "finished")
    store = Store(state / "gateway.db")
    deadline = time.time() - 1 if unfinished else time.time() + 3600

    async def seed(i: int) -> None:
        task_id = str(uuid.uuid4())
        await store.create_task(row(task_id, deadline))
        if not unfinished:
            await store.transition(task_id, "succeeded", allowed_from=("pending",))

    await rate(1000, seed, CONCURRENCY)
    await store.close()
    hub_id = "bench-" + secrets.token_hex(3)
    settings = Settings(
        state_dir=state,
        keys_file=tmp / "keys.json",
        agents_file=REPO_ROOT / "agents.yaml",
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
        hub_id=hub_id,
        network=f"{hub_id}-int",
        egress_network=f"{hub_id}-egr",
        probe_interval_s=0,
    )
    hub = Hub(settings)
    start = time.perf_counter()
    await hub.start()
    ready_s = time.perf_counter() - start
    recovery = hub.last_recovery
    assert recovery is not None
    assert len(recovery.timed_out) == (1000 if unfinished else 0)
    await hub.stop()
    import docker

    api = docker.from_env(version="auto").api
    for name in (settings.network, settings.egress_network):
        for net in api.networks(names=[name]):
            api.remove_network(net["Id"])
    return {"start_to_ready_ms": ready_s * 1000, "recovery_ms": recovery.seconds * 1000}


async def one_at_a_time(tmp: Path, synchronous: str, n: int) -> float:
    """Task creations per second with one in flight: every commit pays its own fsync."""
    store = Store(tmp / f"s-{synchronous}-{uuid.uuid4().hex[:6]}.db", synchronous=synchronous)
    deadline = time.time() + 3600
    created = await rate(n, lambda i: store.create_task(row(str(uuid.uuid4()), deadline)), 1)
    await store.close()
    return created


def _compare(normal: list[float], full: list[float]) -> dict[str, float]:
    """Medians of the rounds, their ratio, and what FULL adds to one write (µs)."""
    n, f = statistics.median(normal), statistics.median(full)
    return {
        "NORMAL": round(n),
        "FULL": round(f),
        "FULL/NORMAL": round(f / n, 3),
        "extra_us_per_write": round((1 / f - 1 / n) * 1e6, 1),
    }


async def durability() -> dict[str, object]:
    """FULL against NORMAL, alternating rounds in one run; the cost of FULL per write."""
    rounds: dict[str, list[dict[str, float]]] = {"NORMAL": [], "FULL": []}
    single: dict[str, list[float]] = {"NORMAL": [], "FULL": []}
    # Commits (batches) counted, to show how many writes share one fsync at 64 in flight.
    batches = {"writes": 0, "commits": 0}
    run_batch = Store._run_batch

    def counting(self: Store, db: object, batch: list[object]) -> None:
        if self.path.name.startswith("w-FULL"):
            batches["writes"] += len(batch)
            batches["commits"] += 1
        run_batch(self, db, batch)  # type: ignore[arg-type]

    Store._run_batch = counting  # type: ignore[method-assign, assignment]
    try:
        with tempfile.TemporaryDirectory(dir=HERE, prefix=".durability-") as tmp:
            for _ in range(ROUNDS):
                for mode in ("NORMAL", "FULL"):
                    rounds[mode].append(await writes(Path(tmp), mode))
                    single[mode].append(await one_at_a_time(Path(tmp), mode, max(200, N // 10)))
    finally:
        Store._run_batch = run_batch  # type: ignore[method-assign]
    figures: dict[str, object] = {
        key: _compare([r[key] for r in rounds["NORMAL"]], [r[key] for r in rounds["FULL"]])
        for key in rounds["FULL"][0]
        if not key.startswith("verify")
    }
    figures["task_creates_per_s, 1 in flight"] = _compare(single["NORMAL"], single["FULL"])
    figures["writes_per_commit (FULL, 64 in flight)"] = round(
        batches["writes"] / max(1, batches["commits"]), 1
    )
    return figures


async def sqlite_vs_postgres() -> dict[str, object]:
    """The writes of 1. on each backend, alternating rounds in one run; medians."""
    from gateway.store.pg_server import PgServer

    cluster = None if STORE_URL else await asyncio.to_thread(PgServer.start, HERE)
    rounds: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    try:
        with tempfile.TemporaryDirectory(dir=HERE, prefix=".stores-") as tmp:
            for i in range(ROUNDS):
                rounds["sqlite"].append(await writes(Path(tmp)))
                url = (
                    STORE_URL if cluster is None else await asyncio.to_thread(cluster.new_database)
                )
                store = open_store(url)
                if STORE_URL:  # a server of one's own: each round on empty tables
                    await store.ping_write()  # connects, migrates
                    await _empty(url)
                rounds["postgresql"].append(await writes(Path(tmp), store=store))
                print(f"round {i + 1}: {rounds['postgresql'][-1]}", file=sys.stderr)
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
    figures: dict[str, object] = {}
    for key in rounds["sqlite"][0]:
        lite = statistics.median(r[key] for r in rounds["sqlite"])
        pg = statistics.median(r[key] for r in rounds["postgresql"])
        figures[key] = {
            "SQLite": round(lite),
            "PostgreSQL": round(pg),
            "PG/SQLite": round(pg / lite, 3),
        }
    return figures


async def _empty(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "TRUNCATE tasks, task_events, idempotency, decisions, decision_checkpoints; "
            "UPDATE decision_heads SET head_seq = 0, head_hash = repeat('0', 64)"
        )
    finally:
        await conn.close()


async def main() -> None:
    if POSTGRES:
        figures = await sqlite_vs_postgres()
        where = "the server given" if STORE_URL else "a throwaway cluster, same disk"
        report(
            f"store writes, SQLite vs PostgreSQL ({N} writes, {CONCURRENCY} concurrent, "
            f"{ROUNDS} rounds each; PostgreSQL on {where})",
            figures,
        )
        return
    if DURABILITY:
        figures = await durability()
        report(
            f"store durability, synchronous FULL vs NORMAL ({N} writes, {CONCURRENCY} "
            f"concurrent, {ROUNDS} rounds each)",
            figures,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures = await writes(Path(tmp))
        figures["start_1000_finished"] = await start_to_ready(Path(tmp), unfinished=False)
        figures["start_1000_unfinished"] = await start_to_ready(Path(tmp), unfinished=True)
    report(f"store and restart ({N} writes, {CONCURRENCY} concurrent)", figures)


if __name__ == "__main__":
    asyncio.run(main())
