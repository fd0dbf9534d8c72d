"""PostgreSQL state: the ``TaskStore`` interface on a server that several hubs may share.

asyncpg (bench/bench_store_pg_drivers.py: faster than psycopg 3 on these statements) with a
pool of connections, each with ``synchronous_commit=on``: a write is acknowledged only once
its WAL is flushed, whatever the server's default. The guarantees of the SQLite store hold
across processes, not only within one:

- a transition reads its task ``FOR UPDATE``, so concurrent callers (in this hub or another)
  are serialized on the row and exactly one of them finds the state it may move from;
- a task created with an Idempotency-Key holds a transaction-scoped advisory lock on that
  key, so two hubs given the same key create one task;
- decision appends (and prunes) hold the log's advisory lock while they read the head and
  insert, so every hub's appends form one chain; within a hub, appends waiting for the lock
  are batched into one transaction (group commit, as the SQLite writer does), and so are
  task creations that append the decision that allowed them.

The pool connects on first use, not in the constructor: a server that is down leaves the
hub degraded (StoreUnavailable) until the store probe reaches it, and then the schema is
migrated (``gateway.store.pg_migrations``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from gateway.clock import utcnow
from gateway.errors import IdempotencyConflict, InvalidState, StoreUnavailable, UnknownTask
from gateway.logs import get_logger
from gateway.store.base import ChainConsumer, Seal
from gateway.store.pg_cluster import ClusterState, lease_new_task
from gateway.store.pg_migrations import migrate
from gateway.store.records import ACTIVE_STATES, TASK_COLUMNS, SealedDecision, Task, TaskEvent

T = TypeVar("T")
log = get_logger(__name__)
# A write that extends the decision chain: op(conn, head) runs in the chain's transaction,
# and moves ``head`` ([seq, hash] of the last record) past each record it appends.
ChainOp = Callable[[Any, list[Any]], Awaitable[Any]]

TASK_JSON_FIELDS = ("input", "result", "error", "labels", "sandbox")
# pg_advisory_xact_lock key that serializes the decision log's writers ("gw-dlog").
DECISION_LOCK = 0x67772D646C6F67
MAX_BATCH = 128
FETCH = 500  # rows per round trip when a reader thread consumes a cursor
# Failures of the server or the connection, not of the statement: the store is unavailable.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # The driver's protocol state broken by a connection cut mid-operation (asyncpg #784).
    asyncpg.InternalClientError,
)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _dumps(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for name in TASK_JSON_FIELDS:
        if out.get(name) is not None:
            out[name] = json.dumps(out[name])
    return out


def _task_from_row(row: Any, history: tuple[TaskEvent, ...] | None = None) -> Task:
    values = {name: row[name] for name in TASK_COLUMNS}
    for name in TASK_JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Task(**values, history=history)


def _placeholders(sql: str, start: int) -> tuple[str, int]:
    """``sql`` with each ``?`` made ``$n`` from ``start``; (sql, the next n)."""
    parts = sql.split("?")
    out = parts[0]
    for i, part in enumerate(parts[1:]):
        out += f"${start + i}{part}"
    return out, start + len(parts) - 1


class PostgresStore:
    """Async store on one PostgreSQL database (``postgresql://...``) through a pool."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        """Remember where the database is; nothing connects until the first call."""
        self.url = url
        self._sizes = (min_size, max_size)
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._appends: list[tuple[ChainOp, str, asyncio.Future[Any]]] = []
        self._appender: asyncio.Task[None] | None = None
        self._closed = False
        self.migrations_applied: list[str] = []
        # Several hubs on this database: the cluster tables, and (hub id, lease seconds)
        # once this store's hub leases the tasks it creates (gateway.cluster).
        self.cluster = ClusterState(self)
        self.lease: tuple[str, float] | None = None

    # -- plumbing

    async def connect(self) -> None:
        """Open the pool and migrate the schema, if not done yet; StoreUnavailable if the
        server cannot be reached."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._pool is not None:
            return
        async with self._opening:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(
                    self.url,
                    min_size=self._sizes[0],
                    max_size=self._sizes[1],
                    timeout=10,
                    server_settings={
                        # Durable before answering (see the module docstring).
                        "synchronous_commit": "on",
                        "application_name": "agent-gateway",
                    },
                )
            except _UNAVAILABLE as e:
                raise StoreUnavailable(f"cannot reach the state database: {e}") from e
            try:
                async with pool.acquire() as conn:
                    self.migrations_applied = await migrate(conn)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool

    @asynccontextmanager
    async def _conn(self, *, tx: bool = True, **options: Any) -> AsyncIterator[Any]:
        """A pooled connection, in a transaction unless ``tx`` is false; connection and
        server failures become StoreUnavailable (a statement's own errors pass through)."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        try:
            await self.connect()
            assert self._pool is not None
            async with self._pool.acquire() as conn:
                try:
                    if not tx:
                        yield conn
                        return
                    async with conn.transaction(**options):
                        yield conn
                except _UNAVAILABLE:
                    # A connection the server cut (a restart) can be left in a state the
                    # driver cannot use again (asyncpg #784): it goes, the pool opens another.
                    conn.terminate()
                    raise
        except StoreUnavailable:
            raise
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"state database error: {e}") from e

    async def _stream(
        self,
        sql: str,
        args: list[Any],
        consume: Callable[[Iterator[dict[str, Any]]], T],
        before: Callable[[Any], Any] | None = None,
    ) -> T:
        """``consume`` on a worker thread over the rows of ``sql``, fetched by the event loop
        as the thread asks for them, in one repeatable-read snapshot. ``before(conn)`` (a
        coroutine function) runs first in the snapshot; ``consume`` then gets its result too."""
        loop = asyncio.get_running_loop()
        async with self._conn(isolation="repeatable_read", readonly=True) as conn:
            extra = () if before is None else (await before(conn),)
            cursor = await conn.cursor(sql, *args)

            def rows() -> Iterator[dict[str, Any]]:
                while True:
                    batch = asyncio.run_coroutine_threadsafe(cursor.fetch(FETCH), loop).result()
                    yield from (dict(r) for r in batch)
                    if len(batch) < FETCH:
                        return

            return await asyncio.to_thread(lambda: consume(rows(), *extra))  # type: ignore[call-arg]

    async def close(self) -> None:
        """Finish the queued decision appends and close the pool."""
        if self._closed:
            return
        if self._appender is not None:
            await asyncio.gather(self._appender, return_exceptions=True)
        self._closed = True
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping_write(self) -> None:
        """A real, durable write (a WAL flush of a few pages): the probe for 'writable'."""
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO _probe (id, at, pad) VALUES (1, $1, $2) "
                "ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at, pad = EXCLUDED.pad",
                utcnow(),
                bytes(8192),
            )

    # -- tasks

    async def create_task(
        self,
        row: dict[str, Any],
        idempotency: tuple[str, str, str] | None = None,
        *,
        keys_since: str | None = None,
        decisions: Sequence[SealedDecision] = (),
        states: Sequence[str] = ("pending",),
    ) -> tuple[Task, bool]:
        """Insert a pending task (and its idempotency key) atomically; see ``TaskStore``.
        ``decisions`` are appended to the log in the same transaction (and batched with the
        other appends of this hub)."""
        if not decisions:
            async with self._conn() as conn:
                return await self._create_in(conn, row, idempotency, keys_since, states)

        async def op(conn: Any, head: list[Any]) -> tuple[Task, bool]:
            created = await self._create_in(conn, row, idempotency, keys_since, states)
            for sealed in decisions:
                await _append_in(conn, head, sealed.seal)
            return created

        return await self._chained(op, decisions[0].genesis)  # type: ignore[no-any-return]

    async def _create_in(
        self,
        conn: Any,
        row: dict[str, Any],
        idempotency: tuple[str, str, str] | None,
        keys_since: str | None,
        states: Sequence[str] = ("pending",),
    ) -> tuple[Task, bool]:
        if idempotency is not None:
            # Two hubs given the same key at once: the second waits, then replays.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))", *idempotency[:2]
            )
            existing = await _task_of_key(conn, *idempotency, since=keys_since)
            if existing is not None:
                found = await conn.fetchrow("SELECT * FROM tasks WHERE id = $1", existing)
                return _task_from_row(found), False
            await conn.execute(
                "DELETE FROM idempotency WHERE subject = $1 AND key = $2", *idempotency[:2]
            )
        now = utcnow()
        record = _dumps({**row, "state": states[-1], "created_at": now, "updated_at": now})
        names = ", ".join(_q(k) for k in record)
        marks = ", ".join(f"${i + 1}" for i in range(len(record)))
        created = await conn.fetchrow(
            f"INSERT INTO tasks ({names}) VALUES ({marks}) RETURNING *", *record.values()
        )
        events = [(row["id"], state, now) for state in states]
        insert = "INSERT INTO task_events (task_id, state, at) VALUES ($1, $2, $3)"
        if len(events) == 1:
            await conn.execute(insert, *events[0])
        else:
            await conn.executemany(insert, events)
        if self.lease is not None:
            await lease_new_task(conn, row["id"], *self.lease)
        if idempotency is not None:
            await conn.execute(
                "INSERT INTO idempotency VALUES ($1, $2, $3, $4, $5)",
                idempotency[0],
                idempotency[1],
                row["id"],
                idempotency[2],
                now,
            )
        return _task_from_row(created), True

    async def task_for_key(
        self, subject: str, key: str, request_hash: str, *, since: str | None = None
    ) -> Task | None:
        """The task (with its history) an Idempotency-Key of ``subject`` already created."""
        async with self._conn(isolation="repeatable_read", readonly=True) as conn:
            task_id = await _task_of_key(conn, subject, key, request_hash, since=since)
            if task_id is None:
                return None
            task = await _task_with_history(conn, task_id)
            if task is None:
                raise UnknownTask(f"no task {task_id!r}")
            return task

    async def prune_idempotency(self, before: str) -> int:
        """Delete the Idempotency-Keys recorded before ``before`` (RFC 3339); how many went."""
        async with self._conn() as conn:
            status = await conn.execute("DELETE FROM idempotency WHERE created_at < $1", before)
        return int(status.split()[-1])

    async def transition(
        self,
        task_id: str,
        state: str,
        *,
        allowed_from: tuple[str, ...],
        detail: str | None = None,
        via: str | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> Task:
        """Move a task to ``state`` if it is in one of ``allowed_from``; else InvalidState.

        The row is locked (``FOR UPDATE``) before its state is read, so of concurrent
        transitions from any hub exactly one sees the state it may move from. ``via`` is a
        state passed through in the same write (its history shows both). Returns the task
        with its history. ``durable`` false: committed with ``synchronous_commit`` off (the
        server's next flushed commit covers it).
        """
        async with self._conn() as conn:
            if not durable:
                await conn.execute("SET LOCAL synchronous_commit TO off")
            current = await conn.fetchrow(
                "SELECT state FROM tasks WHERE id = $1 FOR UPDATE", task_id
            )
            if current is None:
                raise UnknownTask(f"no task {task_id!r}")
            if current["state"] not in allowed_from:
                raise InvalidState(
                    f"task {task_id} is {current['state']}, cannot become {state}",
                    details={"state": current["state"]},
                )
            now = utcnow()
            update = _dumps({"state": state, "updated_at": now, **fields})
            await _update(conn, task_id, update)
            events = [(task_id, via, now, None)] if via is not None else []
            events.append((task_id, state, now, detail))
            await conn.executemany(
                "INSERT INTO task_events (task_id, state, at, detail) VALUES ($1, $2, $3, $4)",
                events,
            )
            task = await _task_with_history(conn, task_id)
            assert task is not None
            return task

    async def update_task(self, task_id: str, **fields: Any) -> None:
        """Set fields that are not a state change (e.g. the container id)."""
        async with self._conn() as conn:
            if await _update(conn, task_id, _dumps({**fields, "updated_at": utcnow()})) is None:
                raise UnknownTask(f"no task {task_id!r}")

    async def get_task(self, task_id: str) -> Task:
        """One task with its state history; UnknownTask when absent."""
        async with self._conn(isolation="repeatable_read", readonly=True) as conn:
            task = await _task_with_history(conn, task_id)
        if task is None:
            raise UnknownTask(f"no task {task_id!r}")
        return task

    async def ancestors(self, task_id: str) -> list[tuple[str, str]]:
        """(task id, agent) of every task ``task_id`` was delegated from, the root first."""
        async with self._conn(tx=False) as conn:
            rows = await conn.fetch(
                """
                WITH RECURSIVE up(id, agent, parent_id, depth) AS (
                    SELECT t.id, t.agent, t.parent_id, 1 FROM tasks t
                    WHERE t.id = (SELECT parent_id FROM tasks WHERE id = $1)
                    UNION ALL
                    SELECT t.id, t.agent, t.parent_id, up.depth + 1
                    FROM tasks t JOIN up ON t.id = up.parent_id
                    WHERE up.depth < 1000
                )
                SELECT id, agent FROM up ORDER BY depth DESC
                """,
                task_id,
            )
        return [(r[0], r[1]) for r in rows]

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        agent: str | None = None,
        subject: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[Task], int | None]:
        """Newest first; returns (tasks, cursor for the next page or None)."""
        rows, cursor = await self.page(
            "tasks",
            [("state = ?", state), ("agent = ?", agent), ("subject = ?", subject)],
            order="rowid",
            limit=limit,
            before=before,
        )
        return [_task_from_row(r) for r in rows], cursor

    async def page(
        self,
        table: str,
        conditions: list[tuple[str, Any]],
        *,
        order: str,
        limit: int,
        before: int | None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Rows of ``table`` newest first by the integer column ``order`` (``rowid``: the
        insertion order, ``tasks.pos`` here), keyset-paginated; see ``TaskStore.page``."""
        column = "pos" if order == "rowid" else _q(order)
        where, args, n = [], [], 1
        for sql, value in conditions:
            if value is not None:
                clause, n = _placeholders(sql, n)
                where.append(clause)
                args.append(value)
        if before is not None:
            where.append(f"{column} < ${n}")
            args.append(before)
            n += 1
        sql = f"SELECT {column} AS _cursor, * FROM {_q(table)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {column} DESC LIMIT ${n}"
        args.append(limit + 1)
        async with self._conn(tx=False) as conn:
            rows = [dict(r) for r in await conn.fetch(sql, *args)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["_cursor"] if more and rows else None)

    async def active_tasks(self) -> list[Task]:
        """Every task not yet in a terminal state (for recovery and shutdown)."""
        async with self._conn(tx=False) as conn:
            rows = await conn.fetch(
                "SELECT * FROM tasks WHERE state = ANY($1::text[]) ORDER BY pos",
                list(ACTIVE_STATES),
            )
        return [_task_from_row(r) for r in rows]

    async def count_tasks_by_state(self) -> dict[str, int]:
        """How many tasks are in each state."""
        async with self._conn(tx=False) as conn:
            rows = await conn.fetch("SELECT state, count(*) FROM tasks GROUP BY state")
        return {r[0]: r[1] for r in rows}

    # -- monitoring

    async def dispatch_watch(self, since: str) -> tuple[int, str | None]:
        """(tasks pending since ``since`` or longer, when the last dispatch happened)."""
        async with self._conn(isolation="repeatable_read", readonly=True) as conn:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM tasks WHERE state = 'pending' AND created_at <= $1", since
            )
            last = await conn.fetchval("SELECT max(at) FROM task_events WHERE state = 'dispatched'")
        return int(waiting), last

    async def active_task_ids(self) -> set[str]:
        """The ids of every task not yet in a terminal state (for the orphan scan)."""
        async with self._conn(tx=False) as conn:
            rows = await conn.fetch(
                "SELECT id FROM tasks WHERE state = ANY($1::text[])", list(ACTIVE_STATES)
            )
        return {r[0] for r in rows}

    # -- revisions and alerts

    async def record_policy_revision(self, revision: str, modules: list[str]) -> None:
        """Remember a policy revision that was put in force (idempotent)."""
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO policy_revisions VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                revision,
                utcnow(),
                json.dumps(modules),
            )

    async def record_alert(self, alert: dict[str, Any]) -> None:
        """Persist an alert raised, or its resolution (matched by name)."""
        async with self._conn() as conn:
            if alert.get("resolved_at"):
                await conn.execute(
                    "UPDATE alerts SET resolved_at = $1 WHERE name = $2 AND resolved_at IS NULL",
                    alert["resolved_at"],
                    alert["name"],
                )
                return
            await conn.execute(
                "INSERT INTO alerts (name, severity, message, details, started_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                alert["name"],
                alert["severity"],
                alert["message"],
                json.dumps(alert.get("details") or {}, default=str),
                alert["started_at"],
            )

    async def record_registry(self, revision: str, source: str, agents: dict[str, Any]) -> None:
        """Remember a loaded registry revision (idempotent)."""
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO registry_revisions VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                revision,
                utcnow(),
                source,
                json.dumps(agents),
            )

    # -- decisions

    async def append_decision(self, seal: Seal, *, genesis: str) -> dict[str, Any]:
        """Insert the row ``seal(seq, prev_hash)`` makes for the next seq; return that row.

        Serialized with every append from every hub by the log's advisory lock, taken
        before the head is read; appends queued meanwhile in this hub share a transaction.
        """

        async def op(conn: Any, head: list[Any]) -> dict[str, Any]:
            return await _append_in(conn, head, seal)

        return await self._chained(op, genesis)  # type: ignore[no-any-return]

    async def _chained(self, op: ChainOp, genesis: str) -> Any:
        """Run ``op`` in the next chain transaction of this hub; its result."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._appends.append((op, genesis, fut))
        if self._appender is None or self._appender.done():
            self._appender = asyncio.create_task(self._drain_appends())
        return await fut

    async def _drain_appends(self) -> None:
        while self._appends:
            batch, self._appends = self._appends[:MAX_BATCH], self._appends[MAX_BATCH:]
            # A caller that gave up before its write started: skip it (a started one commits).
            live = [item for item in batch if not item[2].cancelled()]
            try:
                outcomes = await self._chain_batch(live)
            except BaseException as e:  # handed to each waiting caller
                outcomes = [(fut, None, e) for _, _, fut in live]
            for fut, result, error in outcomes:
                if fut.cancelled():
                    continue
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

    async def _chain_batch(
        self, batch: list[tuple[ChainOp, str, asyncio.Future[Any]]]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        if not batch:
            return []
        async with self._conn() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", DECISION_LOCK)
            head = list(await _decision_head(conn, batch[0][1]))
            start = list(head)
            outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            for op, _, fut in batch:
                before = list(head)
                try:
                    # A savepoint each, so that one failing write fails alone.
                    async with conn.transaction():
                        result = await op(conn, head)
                except Exception as e:  # that caller's failure alone
                    head[:] = before
                    outcomes.append((fut, None, e))
                    continue
                outcomes.append((fut, result, None))
            if head == start:
                return outcomes  # nothing appended: the witness stays as it is
            await conn.execute(
                "INSERT INTO decision_heads (id, head_seq, head_hash) VALUES (1, $1, $2) "
                "ON CONFLICT (id) DO UPDATE SET head_seq = $1, head_hash = $2",
                head[0],
                head[1],
            )
        return outcomes

    async def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        """The stored row of one decision, or None."""
        async with self._conn(tx=False) as conn:
            row = await conn.fetchrow("SELECT * FROM decisions WHERE decision_id = $1", decision_id)
        return None if row is None else dict(row)

    async def list_decisions(
        self,
        *,
        allow: bool | None = None,
        agent: str | None = None,
        subject: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Stored decision rows newest first, filtered; (rows, cursor of the next page or None)."""
        conditions = [
            ("allow = ?", None if allow is None else int(allow)),
            ("agent = ?", agent),
            ("subject = ?", subject),
            ("kind = ?", kind),
            ('"timestamp" >= ?', since),
            ('"timestamp" <= ?', until),
        ]
        return await self.page("decisions", conditions, order="seq", limit=limit, before=before)

    async def iter_decisions_raw(self, consume: Callable[[Iterator[dict[str, Any]]], T]) -> T:
        """``consume(rows)`` on a worker thread, rows as dicts in seq order (the order of
        the primary key: a row cannot be stored out of it)."""
        return await self._stream("SELECT * FROM decisions ORDER BY seq", [], consume)

    async def read_decision_chain(self, consume: ChainConsumer[T]) -> T:
        """``consume(rows, checkpoints, witness)`` on a worker thread, from one snapshot."""

        async def first(conn: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
            checkpoints = [
                dict(r) for r in await conn.fetch("SELECT * FROM decision_checkpoints ORDER BY id")
            ]
            head = await conn.fetchrow(
                "SELECT head_seq, head_hash FROM decision_heads WHERE id = 1"
            )
            witness = None if head is None else {"count": head[0], "head": head[1]}
            return checkpoints, witness

        def both(rows: Iterator[dict[str, Any]], got: tuple[Any, Any]) -> T:
            return consume(rows, got[0], got[1])

        return await self._stream("SELECT * FROM decisions ORDER BY seq", [], both, first)

    async def decision_checkpoints(self) -> list[dict[str, Any]]:
        """Every prune's checkpoint row, oldest first."""
        async with self._conn(tx=False) as conn:
            rows = await conn.fetch("SELECT * FROM decision_checkpoints ORDER BY id")
        return [dict(r) for r in rows]

    async def decision_prune_point(self, *, before: int | None, until: str | None) -> int:
        """The last seq a prune removes (see ``TaskStore.decision_prune_point``)."""
        async with self._conn(isolation="repeatable_read", readonly=True) as conn:
            newest = await conn.fetchval("SELECT max(seq) FROM decisions") or 0
            if before is not None:
                return int(min(before - 1, newest))
            first_newer = await conn.fetchval(
                'SELECT min(seq) FROM decisions WHERE "timestamp" > $1', until
            )
        return int(newest if first_newer is None else min(first_newer - 1, newest))

    async def iter_decisions_range(
        self, first_seq: int, through_seq: int, consume: Callable[[Iterator[dict[str, Any]]], T]
    ) -> T:
        """``consume(rows)`` on a worker thread: the rows seq ``first_seq..through_seq``."""
        return await self._stream(
            "SELECT * FROM decisions WHERE seq BETWEEN $1 AND $2 ORDER BY seq",
            [first_seq, through_seq],
            consume,
        )

    async def prune_decisions(
        self,
        *,
        first_seq: int,
        through_seq: int,
        head_hash: str,
        last_checkpoint: str | None,
        seal: Seal,
        genesis: str,
    ) -> dict[str, Any]:
        """Delete seq ``first_seq..through_seq`` and insert the checkpoint ``seal`` makes, in
        one transaction under the log's lock; InvalidState, nothing changed, if it moved."""
        async with self._conn() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", DECISION_LOCK)
            last = await conn.fetchrow(
                "SELECT id, hash FROM decision_checkpoints ORDER BY id DESC LIMIT 1"
            )
            if (last["hash"] if last else None) != last_checkpoint:
                raise InvalidState("another prune ran meanwhile")
            at = await conn.fetchval("SELECT hash FROM decisions WHERE seq = $1", through_seq)
            if at is None or at != head_hash:
                raise InvalidState(f"record seq {through_seq} changed meanwhile")
            present = await conn.fetchval(
                "SELECT count(*) FROM decisions WHERE seq <= $1", through_seq
            )
            if present != through_seq - first_seq + 1:
                raise InvalidState(f"the records up to seq {through_seq} changed meanwhile")
            row = seal(last["id"] + 1, last["hash"]) if last else seal(1, genesis)
            await _insert(conn, "decision_checkpoints", row)
            await conn.execute("DELETE FROM decisions WHERE seq <= $1", through_seq)
            return row


async def _append_in(conn: Any, head: list[Any], seal: Seal) -> dict[str, Any]:
    """Insert ``seal``'s record after ``head`` (in the chain's transaction); move ``head``."""
    row = seal(int(head[0]) + 1, str(head[1]))
    await _insert(conn, "decisions", row)
    head[:] = [int(row["seq"]), str(row["hash"])]
    return row


async def _insert(conn: Any, table: str, row: dict[str, Any]) -> None:
    names = ", ".join(_q(k) for k in row)
    marks = ", ".join(f"${i + 1}" for i in range(len(row)))
    await conn.execute(f"INSERT INTO {_q(table)} ({names}) VALUES ({marks})", *row.values())


async def _update(conn: Any, task_id: str, values: dict[str, Any]) -> Any:
    sets = ", ".join(f"{_q(k)} = ${i + 2}" for i, k in enumerate(values))
    return await conn.fetchrow(
        f"UPDATE tasks SET {sets} WHERE id = $1 RETURNING *", task_id, *values.values()
    )


async def _decision_head(conn: Any, genesis: str) -> tuple[int, str]:
    """(seq, hash) the next decision is chained to, by the SQLite store's rule: the head
    witness unless rows were added past it, else the newest row, else the last checkpoint's
    head, else (0, ``genesis``)."""
    witness = await conn.fetchrow("SELECT head_seq, head_hash FROM decision_heads WHERE id = 1")
    last = await conn.fetchrow("SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1")
    if witness is not None and (last is None or witness[0] >= last[0]):
        return int(witness[0]), str(witness[1])
    if last is not None:
        return int(last[0]), str(last[1])
    cp = await conn.fetchrow(
        "SELECT through_seq, head_hash FROM decision_checkpoints ORDER BY id DESC LIMIT 1"
    )
    return (int(cp[0]), str(cp[1])) if cp else (0, genesis)


async def _task_with_history(conn: Any, task_id: str) -> Task | None:
    row = await conn.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    if row is None:
        return None
    events = await conn.fetch(
        "SELECT state, at, detail FROM task_events WHERE task_id = $1 ORDER BY id", task_id
    )
    return _task_from_row(row, tuple(TaskEvent(e["state"], e["at"], e["detail"]) for e in events))


async def _task_of_key(
    conn: Any, subject: str, key: str, request_hash: str, *, since: str | None = None
) -> str | None:
    """The id of the task ``subject``'s Idempotency-Key created, or None for a new (or
    expired) key; IdempotencyConflict when it was used for another request."""
    existing = await conn.fetchrow(
        "SELECT task_id, request_hash, created_at FROM idempotency WHERE subject = $1 AND key = $2",
        subject,
        key,
    )
    if existing is None or (since is not None and existing["created_at"] < since):
        return None
    if existing["request_hash"] != request_hash:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different request",
            details={"task_id": existing["task_id"]},
        )
    return str(existing["task_id"])
