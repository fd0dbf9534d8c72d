"""SQLite state: tasks and their history, idempotency keys, registry revisions, decisions.

One writer thread owns the only writing connection and runs each write as one
``BEGIN IMMEDIATE`` transaction; callers await a future (the Datasette pattern). Reads run
on a small pool of threads, each with its own connection; WAL mode lets them proceed while
the writer writes. Schema changes are named, ordered migrations recorded in the same
transaction that applies them.

Durability: ``synchronous=FULL``, so a write acknowledged to its caller survives a power
loss (NORMAL in WAL mode may lose the last commits); group commit shares each fsync among
the writes of a batch. A write nobody is answered on (``durable=False``: a warm task's move
to running) may be committed without an fsync when it is alone in its batch: the next
durable commit's fsync of the WAL covers it, and a crash before that loses it, never a later
one (the WAL is replayed as a prefix). The state directory is 0700 and the database 0600,
whatever the umask (SQLite gives its -wal and -shm files the database file's mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from gateway.clock import utcnow
from gateway.errors import IdempotencyConflict, InvalidState, StoreUnavailable, UnknownTask
from gateway.logs import get_logger
from gateway.store.migrations import migrate
from gateway.store.records import ACTIVE_STATES, TASK_COLUMNS, SealedDecision, Task, TaskEvent

T = TypeVar("T")
log = get_logger(__name__)

MAX_BATCH = 128
TASK_JSON_FIELDS = ("input", "result", "error", "labels", "sandbox")


SYNCHRONOUS = ("FULL", "NORMAL")


def make_private(path: Path) -> None:
    """Create (or tighten) ``path``'s directory to 0700 and the file at ``path`` to 0600,
    whatever the umask, with any -wal and -shm files beside it.

    A mode that cannot be changed (a read-only volume) is logged, not raised: the store then
    opens read-only and the hub starts degraded, as it would have anyway.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        pass  # there already, or not creatable: then SQLite says why it cannot open it
    else:
        os.close(fd)
    for each in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        _tighten(each, 0o600)


def _tighten(path: Path, mode: int) -> None:
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current != mode:
            os.chmod(path, mode)
            if current & ~mode:
                log.warning(
                    "tightened permissions",
                    extra={"path": str(path), "was": f"{current:04o}", "now": f"{mode:04o}"},
                )
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning(
            "cannot set permissions",
            extra={"path": str(path), "mode": f"{mode:04o}", "error": str(e)},
        )


def _connect(
    path: Path, *, readonly: bool = False, synchronous: str = "FULL"
) -> sqlite_utils.Database:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # An acknowledged write must survive power loss (see the module docstring).
        conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return sqlite_utils.Database(conn)


# --- the store ------------------------------------------------------------------------


def _settle(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the caller's event loop: hand each write's outcome to its caller."""
    for fut, result, error in settled:
        if fut.cancelled():
            continue  # the caller gave up waiting; the write happened (or failed) all the same
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class Store:
    """Async facade over one SQLite file: a single writer thread plus reader threads."""

    def __init__(self, path: Path, *, readers: int = 2, synchronous: str = "FULL") -> None:
        """Open (creating, private to this user) the database at ``path``; ``synchronous``
        is FULL but for benchmarks that measure what it costs against NORMAL."""
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous: {synchronous!r} is not one of {SYNCHRONOUS}")
        self.path = Path(path)
        self._synchronous = synchronous
        make_private(self.path)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._local = threading.local()
        # Every reader connection, so close() can close them: left to the garbage collector,
        # their file handles outlive the store (a volume then cannot be unmounted).
        self._reader_dbs: list[sqlite_utils.Database] = []
        self._reader_lock = threading.Lock()
        setup = _connect(self.path, synchronous=synchronous)
        self.migrations_applied = migrate(setup)
        setup.close()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="store-reader")
        self._closed = False
        self.lazy_commits = 0  # batches of non-durable writes only, committed without fsync

    # -- plumbing

    def _write_loop(self) -> None:
        db = _connect(self.path, synchronous=self._synchronous)
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            # Group commit: whatever else is already queued joins this transaction, each
            # write in its own savepoint so one failure does not undo the others. Callers
            # hear back only after COMMIT, so every acknowledged write is durable.
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._run_batch(db, batch)
        db.close()

    def _run_batch(self, db: sqlite_utils.Database, batch: list[Any]) -> None:
        # A caller cancelled before its write started: skip it (a started write commits).
        live = [(func, fut, loop) for func, fut, loop, _ in batch if not fut.cancelled()]
        outcomes: list[tuple[asyncio.Future[Any], asyncio.AbstractEventLoop, Any, Any]] = []
        # One durable write in the batch makes the whole commit durable (its caller is told).
        lazy = self._synchronous == "FULL" and not any(durable for *_, durable in batch)
        if lazy:
            db.conn.execute("PRAGMA synchronous=NORMAL")
            self.lazy_commits += 1
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            for func, fut, loop in live:
                db.conn.execute("SAVEPOINT w")
                try:
                    result = func(db)
                except BaseException as e:
                    if not db.conn.in_transaction:
                        raise  # SQLite dropped the whole transaction: nothing committed
                    db.conn.execute("ROLLBACK TO w")
                    db.conn.execute("RELEASE w")
                    outcomes.append((fut, loop, None, e))
                else:
                    db.conn.execute("RELEASE w")
                    outcomes.append((fut, loop, result, None))
            db.conn.execute("COMMIT")
        except BaseException as e:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            outcomes = [(fut, loop, None, e) for _, fut, loop in live]
        finally:
            if lazy:
                db.conn.execute("PRAGMA synchronous=FULL")
        # One wake-up of each waiting event loop per batch, not one per write: each costs
        # the loop a self-pipe write and read and the writer a hand-over of the GIL.
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for fut, loop, result, error in outcomes:
            by_loop.setdefault(loop, []).append((fut, result, error))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, settled)

    async def write(self, func: Callable[[sqlite_utils.Database], T], *, durable: bool = True) -> T:
        """Run ``func(db)`` as one transaction on the writer thread; with ``durable`` false
        it may return before the commit is on disk (see the module docstring)."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((func, fut, loop, durable))
        try:
            return await fut
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"cannot write the state database: {e}") from e
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.IntegrityError):
                raise
            raise StoreUnavailable(f"state database error: {e}") from e

    def _reader_db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = _connect(self.path, readonly=True)
            self._local.db = db
            with self._reader_lock:
                self._reader_dbs.append(db)
        return db

    async def read(self, func: Callable[[sqlite_utils.Database], T]) -> T:
        """Run ``func(db)`` on a reader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: func(self._reader_db()))

    async def close(self) -> None:
        """Finish queued writes and stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            for db in self._reader_dbs:
                db.close()  # their threads have ended (check_same_thread is off)
            self._reader_dbs.clear()

    async def ping_write(self) -> None:
        """A real write to the database file (a few pages), the probe for 'store writable'.

        It appends to the WAL like any task write, so a full disk or a read-only file
        fails it the same way.
        """
        await self.write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO _probe (id, at, pad) VALUES (1, ?, zeroblob(8192))",
                [utcnow()],
            )
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
        """Insert a pending task (and its idempotency key) atomically (``states``: the
        history it starts with, see ``TaskStore.create_task``).

        Returns (task, created). With an idempotency key already used for the same request,
        returns the original task and False; for a different request, IdempotencyConflict.
        A key recorded before ``keys_since`` (RFC 3339) has expired: it is used afresh.
        ``decisions``, the records of the decisions that allowed the call and the task, are
        appended in the same transaction: the task exists only if they are logged, with one
        commit.
        """

        def tx(db: sqlite_utils.Database) -> tuple[Task, bool]:
            for sealed in decisions:
                _append_decision(db, sealed.seal, sealed.genesis)
            if idempotency is not None:
                existing = _task_of_key(db, *idempotency, since=keys_since)
                if existing is not None:
                    return _task_from_row(_select_task(db, existing)), False
                db.execute(  # an expired key not pruned yet
                    "DELETE FROM idempotency WHERE subject = ? AND key = ?", list(idempotency[:2])
                )
            now = utcnow()
            record = {**row, "state": states[-1], "created_at": now, "updated_at": now}
            for name in TASK_JSON_FIELDS:
                if name in record and record[name] is not None:
                    record[name] = json.dumps(record[name])
            _insert(db, "tasks", record)
            for state in states:
                _insert(db, "task_events", {"task_id": row["id"], "state": state, "at": now})
            if idempotency is not None:
                _insert(
                    db,
                    "idempotency",
                    {
                        "subject": idempotency[0],
                        "key": idempotency[1],
                        "task_id": row["id"],
                        "request_hash": idempotency[2],
                        "created_at": now,
                    },
                )
            return _task_from_row(_select_task(db, row["id"])), True

        return await self.write(tx)

    async def task_for_key(
        self, subject: str, key: str, request_hash: str, *, since: str | None = None
    ) -> Task | None:
        """The task (with its history) an Idempotency-Key of ``subject`` already created.

        None for a key not used yet (or recorded before ``since``: expired);
        IdempotencyConflict when it was used for another request.
        """

        def q(db: sqlite_utils.Database) -> Task | None:
            task_id = _task_of_key(db, subject, key, request_hash, since=since)
            if task_id is None:
                return None
            task = _task_with_history(db, task_id)
            if task is None:
                raise UnknownTask(f"no task {task_id!r}")
            return task

        return await self.read(q)

    async def prune_idempotency(self, before: str) -> int:
        """Delete the Idempotency-Keys recorded before ``before`` (RFC 3339); how many went.

        Their tasks stay; the keys no longer replay them and may be used again.
        """

        def tx(db: sqlite_utils.Database) -> int:
            return db.execute("DELETE FROM idempotency WHERE created_at < ?", [before]).rowcount

        return await self.write(tx)

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

        The guard runs inside the write transaction, so a task reaches a terminal state
        exactly once even when a timeout, a cancel and a result race. ``via`` is a state the
        task passes through in the same write (a warm dispatch: dispatched, then running);
        its history shows both. ``durable`` false: see ``write``. Returns the task with its
        history.
        """

        def tx(db: sqlite_utils.Database) -> Task:
            current = db.execute("SELECT state FROM tasks WHERE id = ?", [task_id]).fetchone()
            if current is None:
                raise UnknownTask(f"no task {task_id!r}")
            if current["state"] not in allowed_from:
                raise InvalidState(
                    f"task {task_id} is {current['state']}, cannot become {state}",
                    details={"state": current["state"]},
                )
            now = utcnow()
            _update_task(db, task_id, {"state": state, "updated_at": now, **fields})
            events = [(task_id, via, now, None)] if via is not None else []
            events.append((task_id, state, now, detail))
            db.conn.executemany(
                "INSERT INTO task_events (task_id, state, at, detail) VALUES (?, ?, ?, ?)", events
            )
            task = _task_with_history(db, task_id)
            assert task is not None
            return task

        return await self.write(tx, durable=durable)

    async def update_task(self, task_id: str, **fields: Any) -> None:
        """Set fields that are not a state change (e.g. the container id)."""

        def tx(db: sqlite_utils.Database) -> None:
            _update_task(db, task_id, {**fields, "updated_at": utcnow()})

        await self.write(tx)

    async def get_task(self, task_id: str) -> Task:
        """One task with its state history; UnknownTask when absent."""
        task = await self.read(lambda db: _task_with_history(db, task_id))
        if task is None:
            raise UnknownTask(f"no task {task_id!r}")
        return task

    async def ancestors(self, task_id: str) -> list[tuple[str, str]]:
        """(task id, agent) of every task ``task_id`` was delegated from, the root first."""

        def q(db: sqlite_utils.Database) -> list[tuple[str, str]]:
            rows = db.execute(
                """
                WITH RECURSIVE up(id, agent, parent_id, depth) AS (
                    SELECT t.id, t.agent, t.parent_id, 1 FROM tasks t
                    WHERE t.id = (SELECT parent_id FROM tasks WHERE id = ?)
                    UNION ALL
                    SELECT t.id, t.agent, t.parent_id, up.depth + 1
                    FROM tasks t JOIN up ON t.id = up.parent_id
                    WHERE up.depth < 1000
                )
                SELECT id, agent FROM up ORDER BY depth DESC
                """,
                [task_id],
            ).fetchall()
            return [(r[0], r[1]) for r in rows]

        return await self.read(q)

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
        """Rows of ``table`` newest first by the integer column ``order``, keyset-paginated.

        ``conditions`` are ``(sql with one ?, value)`` pairs; a None value is no filter.
        Returns (rows, the cursor for the next page or None).
        """
        where = [sql for sql, value in conditions if value is not None]
        args = [value for _, value in conditions if value is not None]
        if before is not None:
            where.append(f"{order} < ?")
            args.append(before)
        sql = f"SELECT {order} AS _cursor, * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order} DESC LIMIT ?"
        args.append(limit + 1)
        rows = await self.read(lambda db: [dict(r) for r in db.execute(sql, args)])
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["_cursor"] if more and rows else None)

    async def active_tasks(self) -> list[Task]:
        """Every task not yet in a terminal state (for recovery and shutdown)."""

        def q(db: sqlite_utils.Database) -> list[Task]:
            marks = ",".join("?" * len(ACTIVE_STATES))
            return [
                _task_from_row(r)
                for r in db.execute(
                    f"SELECT * FROM tasks WHERE state IN ({marks}) ORDER BY rowid", ACTIVE_STATES
                ).fetchall()
            ]

        return await self.read(q)

    async def count_tasks_by_state(self) -> dict[str, int]:
        def q(db: sqlite_utils.Database) -> dict[str, int]:
            return {
                r[0]: r[1]
                for r in db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
            }

        return await self.read(q)

    # -- monitoring

    async def dispatch_watch(self, since: str) -> tuple[int, str | None]:
        """(tasks pending since ``since`` or longer, when the last dispatch happened)."""

        def q(db: sqlite_utils.Database) -> tuple[int, str | None]:
            waiting = db.execute(
                "SELECT count(*) FROM tasks WHERE state = 'pending' AND created_at <= ?", [since]
            ).fetchone()[0]
            last = db.execute(
                "SELECT max(at) FROM task_events WHERE state = 'dispatched'"
            ).fetchone()[0]
            return int(waiting), last

        return await self.read(q)

    async def active_task_ids(self) -> set[str]:
        """The ids of every task not yet in a terminal state (for the orphan scan)."""

        def q(db: sqlite_utils.Database) -> set[str]:
            marks = ",".join("?" * len(ACTIVE_STATES))
            rows = db.execute(f"SELECT id FROM tasks WHERE state IN ({marks})", ACTIVE_STATES)
            return {r[0] for r in rows.fetchall()}

        return await self.read(q)

    # -- revisions and alerts

    async def record_policy_revision(self, revision: str, modules: list[str]) -> None:
        """Remember a policy revision that was put in force (idempotent)."""

        def tx(db: sqlite_utils.Database) -> None:
            db["policy_revisions"].insert(
                {"revision": revision, "loaded_at": utcnow(), "modules": json.dumps(modules)},
                ignore=True,
            )

        await self.write(tx)

    async def record_alert(self, alert: dict[str, Any]) -> None:
        """Persist an alert raised, or its resolution (matched by name)."""

        def tx(db: sqlite_utils.Database) -> None:
            if alert.get("resolved_at"):
                db.execute(
                    "UPDATE alerts SET resolved_at = ? WHERE name = ? AND resolved_at IS NULL",
                    [alert["resolved_at"], alert["name"]],
                )
                return
            db["alerts"].insert(
                {
                    "name": alert["name"],
                    "severity": alert["severity"],
                    "message": alert["message"],
                    "details": json.dumps(alert.get("details") or {}, default=str),
                    "started_at": alert["started_at"],
                    "resolved_at": None,
                }
            )

        await self.write(tx)

    # -- registry

    async def record_registry(self, revision: str, source: str, agents: dict[str, Any]) -> None:
        """Remember a loaded registry revision (idempotent)."""

        def tx(db: sqlite_utils.Database) -> None:
            db["registry_revisions"].insert(
                {
                    "revision": revision,
                    "loaded_at": utcnow(),
                    "source": source,
                    "agents": json.dumps(agents),
                },
                ignore=True,
            )

        await self.write(tx)

    # -- decisions

    async def append_decision(
        self, seal: Callable[[int, str], dict[str, Any]], *, genesis: str
    ) -> dict[str, Any]:
        """Insert the row ``seal(seq, prev_hash)`` makes for the next seq; return that row.

        ``seal`` runs inside the write transaction that reads the chain head, so concurrent
        appends cannot fork the chain. The first row is chained to ``genesis``. The head
        witness (``decision_heads``) moves with the row, in the same transaction.
        """

        return await self.write(lambda db: _append_decision(db, seal, genesis))

    async def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        """The stored row of one decision, or None."""

        def q(db: sqlite_utils.Database) -> dict[str, Any] | None:
            row = db.execute("SELECT * FROM decisions WHERE decision_id = ?", [decision_id])
            found = row.fetchone()
            return None if found is None else dict(found)

        return await self.read(q)

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
        return await self.page(
            "decisions",
            _decision_conditions(allow, agent, subject, kind, since, until),
            order="seq",
            limit=limit,
            before=before,
        )

    async def iter_decisions_raw(self, consume: Callable[[Iterator[dict[str, Any]]], T]) -> T:
        """``consume(rows)`` on a reader thread, rows as dicts in physical (rowid) order.

        The physical order, not seq: a verifier must see rows where they are stored.
        """

        def q(db: sqlite_utils.Database) -> T:
            cursor = db.execute("SELECT * FROM decisions ORDER BY rowid")
            return consume(dict(row) for row in cursor)

        return await self.read(q)

    async def read_decision_chain(
        self,
        consume: Callable[
            [Iterator[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None], T
        ],
    ) -> T:
        """``consume(rows, checkpoints, witness)`` on a reader thread, from one snapshot.

        Rows as ``iter_decisions_raw`` gives them; checkpoints oldest first; the witness as
        ``{"count", "head"}`` or None. One read transaction: a decision appended between
        reading the witness and the rows would otherwise look like a cut or an append.
        """

        def q(db: sqlite_utils.Database) -> T:
            db.conn.execute("BEGIN")
            try:
                checkpoints = [
                    dict(r) for r in db.execute("SELECT * FROM decision_checkpoints ORDER BY id")
                ]
                head = db.execute(
                    "SELECT head_seq, head_hash FROM decision_heads WHERE id = 1"
                ).fetchone()
                witness = None if head is None else {"count": head[0], "head": head[1]}
                cursor = db.execute("SELECT * FROM decisions ORDER BY rowid")
                return consume((dict(row) for row in cursor), checkpoints, witness)
            finally:
                db.conn.execute("COMMIT")

        return await self.read(q)

    async def decision_checkpoints(self) -> list[dict[str, Any]]:
        """Every prune's checkpoint row, oldest first."""

        def q(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            rows = db.execute("SELECT * FROM decision_checkpoints ORDER BY id").fetchall()
            return [dict(r) for r in rows]

        return await self.read(q)

    async def decision_prune_point(self, *, before: int | None, until: str | None) -> int:
        """The last seq a prune removes: the record before seq ``before``, or the last of the
        oldest records whose timestamp is at most ``until`` (never one newer than that), at
        most the newest record; 0 when the log is empty."""

        def q(db: sqlite_utils.Database) -> int:
            newest = db.execute("SELECT max(seq) FROM decisions").fetchone()[0] or 0
            if before is not None:
                return min(before - 1, newest)
            first_newer = db.execute(
                "SELECT min(seq) FROM decisions WHERE timestamp > ?", [until]
            ).fetchone()[0]
            return newest if first_newer is None else min(first_newer - 1, newest)

        return await self.read(q)

    async def iter_decisions_range(
        self, first_seq: int, through_seq: int, consume: Callable[[Iterator[dict[str, Any]]], T]
    ) -> T:
        """``consume(rows)`` on a reader thread: the rows seq ``first_seq..through_seq`` by seq."""

        def q(db: sqlite_utils.Database) -> T:
            cursor = db.execute(
                "SELECT * FROM decisions WHERE seq BETWEEN ? AND ? ORDER BY seq",
                [first_seq, through_seq],
            )
            return consume(dict(row) for row in cursor)

        return await self.read(q)

    async def prune_decisions(
        self,
        *,
        first_seq: int,
        through_seq: int,
        head_hash: str,
        last_checkpoint: str | None,
        seal: Callable[[int, str], dict[str, Any]],
        genesis: str,
    ) -> dict[str, Any]:
        """Delete the records seq ``first_seq..through_seq`` and insert the checkpoint row
        ``seal(id, prev_hash)`` makes, in one transaction; return that row.

        InvalidState, with nothing changed, unless the log is still as the export saw it:
        the last checkpoint's hash ``last_checkpoint`` (None: no checkpoint), exactly those
        records before ``through_seq`` and record ``through_seq`` with ``head_hash``.
        """

        def tx(db: sqlite_utils.Database) -> dict[str, Any]:
            last = db.execute(
                "SELECT id, hash FROM decision_checkpoints ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if (last["hash"] if last else None) != last_checkpoint:
                raise InvalidState("another prune ran meanwhile")
            at = db.execute("SELECT hash FROM decisions WHERE seq = ?", [through_seq]).fetchone()
            if at is None or at["hash"] != head_hash:
                raise InvalidState(f"record seq {through_seq} changed meanwhile")
            present = db.execute(
                "SELECT count(*) FROM decisions WHERE seq <= ?", [through_seq]
            ).fetchone()[0]
            if present != through_seq - first_seq + 1:
                raise InvalidState(f"the records up to seq {through_seq} changed meanwhile")
            row = seal(last["id"] + 1, last["hash"]) if last else seal(1, genesis)
            db.conn.execute(
                f"INSERT INTO decision_checkpoints ({', '.join(row)}) "
                f"VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            db.conn.execute("DELETE FROM decisions WHERE seq <= ?", [through_seq])
            return row

        return await self.write(tx)


def _append_decision(
    db: sqlite_utils.Database, seal: Callable[[int, str], dict[str, Any]], genesis: str
) -> dict[str, Any]:
    seq, prev_hash = _decision_head(db, genesis)
    row = seal(seq + 1, prev_hash)
    # A plain INSERT: sqlite-utils' insert() introspects the table on every call, which
    # cost more than the rest of the write (bench/bench_messages.py).
    _insert(db, "decisions", row)
    db.conn.execute(
        "INSERT OR REPLACE INTO decision_heads (id, head_seq, head_hash) VALUES (1, ?, ?)",
        [row["seq"], row["hash"]],
    )
    return row


def _decision_head(db: sqlite_utils.Database, genesis: str) -> tuple[int, str]:
    """(seq, hash) the next decision is chained to: the head witness, so that records cut
    from the end stay a visible gap; the newest record if rows were added past the witness
    (or it is missing), else the last checkpoint's head; (0, ``genesis``) for a new log."""
    witness = db.execute("SELECT head_seq, head_hash FROM decision_heads WHERE id = 1").fetchone()
    last = db.execute("SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
    if witness is not None and (last is None or witness[0] >= last[0]):
        return int(witness[0]), str(witness[1])
    if last is not None:
        return int(last[0]), str(last[1])
    cp = db.execute(
        "SELECT through_seq, head_hash FROM decision_checkpoints ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return (int(cp[0]), str(cp[1])) if cp else (0, genesis)


def _decision_conditions(
    allow: bool | None,
    agent: str | None,
    subject: str | None,
    kind: str | None,
    since: str | None,
    until: str | None,
) -> list[tuple[str, Any]]:
    return [
        ("allow = ?", None if allow is None else int(allow)),
        ("agent = ?", agent),
        ("subject = ?", subject),
        ("kind = ?", kind),
        ("timestamp >= ?", since),
        ("timestamp <= ?", until),
    ]


def read_decisions_file(
    path: Path,
    *,
    allow: bool | None = None,
    agent: str | None = None,
    subject: str | None = None,
    kind: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(the newest ``limit`` matching decision rows, oldest first; every stored registry
    revision as (revision, agents JSON), oldest first) from a database opened read-only.

    No ``Store``: a review tool reads a hub's file as it is, without migrating or writing it.
    """
    conditions = _decision_conditions(allow, agent, subject, kind, since, until)
    where = [sql for sql, value in conditions if value is not None]
    params: list[Any] = [value for _, value in conditions if value is not None]
    sql = "SELECT * FROM decisions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    try:
        db = _connect(path, readonly=True)
        try:
            rows = [dict(r) for r in db.execute(sql, params)]
            registries = [
                (r["revision"], r["agents"])
                for r in db.execute(
                    "SELECT revision, agents FROM registry_revisions ORDER BY loaded_at"
                ).fetchall()
            ]
        finally:
            db.close()
    except sqlite3.Error as e:
        raise StoreUnavailable(str(e)) from e
    rows.reverse()
    return rows, registries


def _update_task(db: sqlite_utils.Database, task_id: str, fields: dict[str, Any]) -> None:
    # Plain SQL: sqlite-utils' update() and insert() read the table's schema on every call,
    # which cost more than the write itself on the dispatch path.
    values = [
        json.dumps(v) if name in TASK_JSON_FIELDS and v is not None else v
        for name, v in fields.items()
    ]
    assignments = ", ".join(f"{name} = ?" for name in fields)
    db.conn.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", [*values, task_id])


def _insert(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    db.conn.execute(
        f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )


def _select_task(db: sqlite_utils.Database, task_id: str) -> Any:
    return db.execute("SELECT * FROM tasks WHERE id = ?", [task_id]).fetchone()


def _task_from_row(row: Any, history: tuple[TaskEvent, ...] | None = None) -> Task:
    values = {name: row[name] for name in TASK_COLUMNS}
    for name in TASK_JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return Task(**values, history=history)


def _task_with_history(db: sqlite_utils.Database, task_id: str) -> Task | None:
    row = _select_task(db, task_id)
    if row is None:
        return None
    events = db.execute(
        "SELECT state, at, detail FROM task_events WHERE task_id = ? ORDER BY id", [task_id]
    ).fetchall()
    return _task_from_row(row, tuple(TaskEvent(e["state"], e["at"], e["detail"]) for e in events))


def _task_of_key(
    db: sqlite_utils.Database,
    subject: str,
    key: str,
    request_hash: str,
    *,
    since: str | None = None,
) -> str | None:
    """The id of the task ``subject``'s Idempotency-Key created, or None for a new key (or
    one recorded before ``since``, expired).

    IdempotencyConflict when the key was used for a request with another hash.
    """
    existing = db.execute(
        "SELECT task_id, request_hash, created_at FROM idempotency WHERE subject = ? AND key = ?",
        [subject, key],
    ).fetchone()
    if existing is None or (since is not None and existing["created_at"] < since):
        return None
    if existing["request_hash"] != request_hash:
        raise IdempotencyConflict(
            "Idempotency-Key was already used with a different request",
            details={"task_id": existing["task_id"]},
        )
    return str(existing["task_id"])
