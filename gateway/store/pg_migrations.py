"""The PostgreSQL store's schema, as named, ordered migrations.

The same tables and columns as the SQLite schema (``gateway.store.migrations``) at its
latest migration, and the same stored forms (JSON as text, timestamps as RFC 3339 text,
``allow`` as 0/1) so that a decision row hashes the same on either backend. Two additions:
``tasks.pos``, an identity column that gives tasks the insertion order SQLite's rowid
gives them (the list cursor), and ``_migrations`` holds the names applied.

Each migration runs in one transaction together with the row that records it, under an
advisory lock, so hubs starting at once on one database apply each migration once.
"""

from __future__ import annotations

from typing import Any

from gateway.clock import utcnow
from gateway.store.pg_cluster import MIGRATION as CLUSTER_MIGRATION

# pg_advisory_xact_lock key for schema changes ("gw-mig" in ASCII).
MIGRATION_LOCK = 0x67772D6D6967

_M001_TASKS = """
CREATE TABLE tasks (
    pos BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    agent TEXT,
    capability TEXT,
    subject TEXT,
    input TEXT,
    timeout_s DOUBLE PRECISION,
    deadline DOUBLE PRECISION,
    decision_id TEXT,
    sandbox TEXT,
    container_id TEXT,
    container_name TEXT,
    result TEXT,
    error TEXT,
    labels TEXT,
    attempts BIGINT,
    parent_id TEXT,
    idempotency_key TEXT,
    created_at TEXT,
    updated_at TEXT,
    instance_id TEXT,
    key_id TEXT,
    dispatch TEXT
);
CREATE INDEX tasks_state ON tasks (state);
CREATE INDEX tasks_agent_state ON tasks (agent, state);
CREATE INDEX tasks_parent ON tasks (parent_id);
CREATE TABLE task_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks (id),
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX task_events_task ON task_events (task_id);
CREATE INDEX task_events_state_at ON task_events (state, at);
CREATE TABLE idempotency (
    subject TEXT NOT NULL,
    key TEXT NOT NULL,
    task_id TEXT,
    request_hash TEXT,
    created_at TEXT,
    PRIMARY KEY (subject, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);
CREATE TABLE registry_revisions (
    revision TEXT PRIMARY KEY, loaded_at TEXT, source TEXT, agents TEXT
);
CREATE TABLE policy_revisions (revision TEXT PRIMARY KEY, loaded_at TEXT, modules TEXT);
CREATE TABLE alerts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT,
    severity TEXT,
    message TEXT,
    details TEXT,
    started_at TEXT,
    resolved_at TEXT
);
CREATE INDEX alerts_name_resolved ON alerts (name, resolved_at);
CREATE TABLE _probe (id BIGINT PRIMARY KEY, at TEXT, pad BYTEA);
"""

_M002_DECISIONS = """
CREATE TABLE decisions (
    seq BIGINT PRIMARY KEY,
    decision_id TEXT,
    "timestamp" TEXT,
    path TEXT,
    kind TEXT,
    allow INTEGER,
    subject TEXT,
    agent TEXT,
    task_id TEXT,
    input TEXT,
    result TEXT,
    revision TEXT,
    labels TEXT,
    metrics TEXT,
    erased TEXT,
    masked TEXT,
    prev_hash TEXT,
    hash TEXT
);
CREATE UNIQUE INDEX decisions_decision_id ON decisions (decision_id);
CREATE INDEX decisions_timestamp ON decisions ("timestamp");
-- The head witness: the seq and hash of the last decision appended, moved in the
-- transaction of each append, so that verify sees a cut tail. One row.
CREATE TABLE decision_heads (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    head_seq BIGINT NOT NULL,
    head_hash TEXT NOT NULL
);
-- 64 zeros: the chain's genesis hash (gateway.decisionlog.records.GENESIS_HASH).
INSERT INTO decision_heads VALUES (1, 0, repeat('0', 64));
CREATE TABLE decision_checkpoints (
    id BIGINT PRIMARY KEY,
    first_seq BIGINT,
    through_seq BIGINT,
    count BIGINT,
    start_hash TEXT,
    head_hash TEXT,
    export_sha256 TEXT,
    export_name TEXT,
    created_at TEXT,
    prev_hash TEXT,
    hash TEXT
);
"""

MIGRATIONS: list[tuple[str, str]] = [
    ("001_tasks_revisions_alerts", _M001_TASKS),
    ("002_decisions_heads_checkpoints", _M002_DECISIONS),
    # Several hubs on one database (gateway.store.pg_cluster).
    CLUSTER_MIGRATION,
]


async def migrate(conn: Any, migrations: list[tuple[str, str]] | None = None) -> list[str]:
    """Apply pending migrations (all by default) in order on the asyncpg connection
    ``conn``, each in its own transaction with the row recording it; return their names."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
    done = []
    for name, sql in MIGRATIONS if migrations is None else migrations:
        async with conn.transaction():
            # Under the lock, so that another hub's migration is seen as applied, not redone.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if await conn.fetchval("SELECT 1 FROM _migrations WHERE name = $1", name):
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO _migrations VALUES ($1, $2)", name, utcnow())
        done.append(name)
    return done
