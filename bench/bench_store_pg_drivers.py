"""asyncpg against psycopg 3 on the PostgreSQL store's kind of work, in one run.

A throwaway cluster (Debian's PostgreSQL, ``gateway.store.pg_server``) on the checkout's
disk; ``synchronous_commit=on``, so every commit waits for its WAL flush as the store's do.
Each driver, with a pool of ``POOL`` connections and 64 coroutines in flight:

- ``task_tx``: the store's task creation: one transaction of two INSERTs (task, event);
- ``guarded_update``: ``UPDATE ... WHERE state = ... RETURNING *``, a transition;
- ``read_by_pk``: ``SELECT * FROM tasks WHERE id = $1``;
- ``task_tx, 1 in flight``: one connection, one transaction at a time (latency bound).

Alternating rounds (asyncpg, psycopg, three times; medians). The store keeps the faster.

Usage: python bench/bench_store_pg_drivers.py [n]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import rate, report
from gateway.store.pg_server import PgServer

HERE = Path(__file__).resolve().parent
N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
POOL = 8
ROUNDS = 3
SCHEMA = """
CREATE TABLE tasks (id TEXT PRIMARY KEY, state TEXT NOT NULL, agent TEXT, input TEXT,
                    deadline DOUBLE PRECISION, created_at TEXT, updated_at TEXT);
CREATE TABLE task_events (id BIGSERIAL PRIMARY KEY, task_id TEXT REFERENCES tasks(id),
                          state TEXT, at TEXT);
"""
INSERT_TASK = "INSERT INTO tasks VALUES ($1, 'pending', 'echo', $2, 1.0, 'now', 'now')"
INSERT_EVENT = "INSERT INTO task_events (task_id, state, at) VALUES ($1, 'pending', 'now')"
UPDATE = "UPDATE tasks SET state = 'dispatched' WHERE id = $1 AND state = 'pending' RETURNING *"
SELECT = "SELECT * FROM tasks WHERE id = $1"
BODY = '{"msg": "' + "x" * 200 + '"}'

Ops = dict[str, Callable[[str], Awaitable[Any]]]


async def asyncpg_ops(url: str, size: int) -> tuple[Ops, Callable[[], Awaitable[None]]]:
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=size, max_size=size)

    async def task_tx(key: str) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_TASK, key, BODY)
            await conn.execute(INSERT_EVENT, key)

    async def guarded(key: str) -> None:
        async with pool.acquire() as conn:
            await conn.fetchrow(UPDATE, key)

    async def read(key: str) -> None:
        async with pool.acquire() as conn:
            await conn.fetchrow(SELECT, key)

    return {"task_tx": task_tx, "guarded_update": guarded, "read_by_pk": read}, pool.close


async def psycopg_ops(url: str, size: int) -> tuple[Ops, Callable[[], Awaitable[None]]]:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=size, max_size=size, open=False)
    await pool.open(wait=True)

    def q(sql: str) -> str:
        return sql.replace("$1", "%s").replace("$2", "%s")

    async def task_tx(key: str) -> None:
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(q(INSERT_TASK), (key, BODY))
            await conn.execute(q(INSERT_EVENT), (key,))

    async def guarded(key: str) -> None:
        async with pool.connection() as conn:
            await (await conn.execute(q(UPDATE), (key,))).fetchone()

    async def read(key: str) -> None:
        async with pool.connection() as conn:
            await (await conn.execute(q(SELECT), (key,))).fetchone()

    return {"task_tx": task_tx, "guarded_update": guarded, "read_by_pk": read}, pool.close


DRIVERS = {"asyncpg": asyncpg_ops, "psycopg": psycopg_ops}


async def one_round(url: str, driver: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for size, concurrency, suffix in ((POOL, 64, ""), (1, 1, ", 1 in flight")):
        ops, close = await DRIVERS[driver](url, size)
        keys = [str(uuid.uuid4()) for _ in range(N if size > 1 else max(200, N // 10))]
        names = ("task_tx", "guarded_update", "read_by_pk") if size > 1 else ("task_tx",)
        for name in names:
            op = ops[name]
            out[name + suffix] = await rate(
                len(keys), lambda i, op=op, keys=keys: op(keys[i]), concurrency
            )
        await close()
    return out


async def main() -> None:
    cluster = await asyncio.to_thread(PgServer.start, HERE)
    try:
        import asyncpg

        conn = await asyncpg.connect(cluster.url)
        await conn.execute(SCHEMA)
        await conn.close()
        available = []
        for driver in DRIVERS:
            try:
                __import__({"asyncpg": "asyncpg", "psycopg": "psycopg_pool"}[driver])
                available.append(driver)
            except ImportError:
                print(f"{driver}: not installed, not measured")
        rounds: dict[str, list[dict[str, float]]] = {d: [] for d in available}
        for _ in range(ROUNDS):
            for driver in available:
                rounds[driver].append(await one_round(cluster.url, driver))
        figures: dict[str, Any] = {}
        for key in rounds[available[0]][0]:
            figures[key + " per s"] = {
                d: round(statistics.median(r[key] for r in rounds[d])) for d in available
            }
        report("store PostgreSQL drivers (median of 3 alternating rounds)", figures)
    finally:
        await asyncio.to_thread(cluster.stop)


if __name__ == "__main__":
    asyncio.run(main())
