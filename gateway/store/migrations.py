"""The SQLite store's schema, as named, ordered migrations.

Each migration runs in one ``BEGIN IMMEDIATE`` transaction together with the row that
records it in ``_migrations``, so a crash leaves the schema at one migration or the next,
never between (the sqlite-utils/Datasette pattern). An old database is upgraded on open.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from gateway.clock import utcnow


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["tasks"].create(
        {
            "id": str,
            "state": str,
            "agent": str,
            "capability": str,
            "subject": str,
            "input": str,
            "timeout_s": float,
            "deadline": float,
            "decision_id": str,
            "sandbox": str,
            "container_id": str,
            "container_name": str,
            "result": str,
            "error": str,
            "labels": str,
            "attempts": int,
            "parent_id": str,
            "idempotency_key": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
    )
    db["tasks"].create_index(["state"])
    db["tasks"].create_index(["agent", "state"])
    db["task_events"].create(
        {"id": int, "task_id": str, "state": str, "at": str, "detail": str},
        pk="id",
        foreign_keys=[("task_id", "tasks", "id")],
    )
    db["task_events"].create_index(["task_id"])
    db["idempotency"].create(
        {"subject": str, "key": str, "task_id": str, "request_hash": str, "created_at": str},
        pk=("subject", "key"),
    )
    db["decisions"].create(
        {
            "seq": int,
            "decision_id": str,
            "timestamp": str,
            "path": str,
            "kind": str,
            "allow": int,
            "subject": str,
            "agent": str,
            "task_id": str,
            "input": str,
            "result": str,
            "revision": str,
            "labels": str,
            "metrics": str,
            "erased": str,
            "masked": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="seq",
    )
    db["decisions"].create_index(["decision_id"], unique=True)
    db["decisions"].create_index(["timestamp"])
    db["registry_revisions"].create(
        {"revision": str, "loaded_at": str, "source": str, "agents": str}, pk="revision"
    )


def _m002_revisions_and_alerts(db: sqlite_utils.Database) -> None:
    db["policy_revisions"].create(
        {"revision": str, "loaded_at": str, "modules": str}, pk="revision"
    )
    db["alerts"].create(
        {
            "id": int,
            "name": str,
            "severity": str,
            "message": str,
            "details": str,
            "started_at": str,
            "resolved_at": str,
        },
        pk="id",
    )
    db["alerts"].create_index(["name", "resolved_at"])
    db["_probe"].create({"id": int, "at": str, "pad": bytes}, pk="id")


def _m003_task_instance(db: sqlite_utils.Database) -> None:
    # The container instance (and so the JWT-SVID) that runs the task.
    db["tasks"].add_column("instance_id", str)


def _m004_task_key_id(db: sqlite_utils.Database) -> None:
    # The API key that submitted the task (or its root task), so that a hub restarted under
    # a running task can give it its submitter's roles back from the keys file.
    db["tasks"].add_column("key_id", str)


def _m005_decision_heads_and_checkpoints(db: sqlite_utils.Database) -> None:
    # The head witness: the seq and hash of the last decision the hub appended, updated in
    # the transaction of each append, so that verify can see a cut tail. One row.
    db.execute(
        "CREATE TABLE decision_heads (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "head_seq INTEGER NOT NULL, head_hash TEXT NOT NULL)"
    )
    last = db.execute("SELECT seq, hash FROM decisions ORDER BY seq DESC LIMIT 1").fetchone()
    # 64 zeros: the chain's genesis hash (gateway.decisionlog.records.GENESIS_HASH), spelt
    # here because the store does not import the decision log.
    db.execute(
        "INSERT INTO decision_heads VALUES (1, ?, ?)",
        [last[0], last[1]] if last else [0, "0" * 64],
    )
    # What each prune removed (gateway.decisionlog.checkpoint), oldest first.
    db["decision_checkpoints"].create(
        {
            "id": int,
            "first_seq": int,
            "through_seq": int,
            "count": int,
            "start_hash": str,
            "head_hash": str,
            "export_sha256": str,
            "export_name": str,
            "created_at": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="id",
    )


def _m006_task_dispatch(db: sqlite_utils.Database) -> None:
    # How the task's container was had: "warm" (from a pool) or "cold" (started for it).
    db["tasks"].add_column("dispatch", str)


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_initial", _m001_initial),
    ("002_revisions_and_alerts", _m002_revisions_and_alerts),
    ("003_task_instance", _m003_task_instance),
    ("004_task_key_id", _m004_task_key_id),
    ("005_decision_heads_and_checkpoints", _m005_decision_heads_and_checkpoints),
    ("006_task_dispatch", _m006_task_dispatch),
]


def migrate(
    db: sqlite_utils.Database,
    migrations: list[tuple[str, Callable[[sqlite_utils.Database], None]]] | None = None,
) -> list[str]:
    """Apply pending migrations (all by default) in order, each in its own transaction;
    return their names."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    applied = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
    done = []
    for name, func in MIGRATIONS if migrations is None else migrations:
        if name in applied:
            continue
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            func(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", [name, utcnow()])
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        done.append(name)
    return done
