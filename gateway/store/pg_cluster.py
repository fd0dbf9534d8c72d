"""Several hubs on one PostgreSQL: who is alive, who owns which task, who runs the singletons,
which keys sign the trust domain's JWT-SVIDs, and where each agent instance lives.

Every clock here is the database server's (``clock_timestamp()``), so hubs whose clocks
drift still agree on whether a lease has expired.

- ``hubs``: one row per hub, its heartbeat and what it shows in ``/v1/status``;
- ``task_leases``: the owning hub of each unfinished task and until when its lease runs;
  the owner renews all of its leases with each heartbeat, and another hub may claim a task
  only once its lease has expired (``claim_expired``, ``FOR UPDATE SKIP LOCKED``: two hubs
  claiming at once take disjoint tasks);
- ``singletons``: named leases (orphan scan, watchdog, revision recording) held by one hub;
- ``svid_keys``: the public keys every hub signs with, so a token issued by any hub
  verifies on all;
- ``instances``: the directory of running agent instances (hub, agent, owner, address), for
  delivering a message to an instance another hub runs.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.store.records import ACTIVE_STATES

MIGRATION = (
    "003_cluster_hubs_leases_keys_instances",
    """
CREATE TABLE hubs (
    id TEXT PRIMARY KEY,
    url TEXT,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat DOUBLE PRECISION NOT NULL,
    info TEXT
);
CREATE TABLE task_leases (
    task_id TEXT PRIMARY KEY REFERENCES tasks (id),
    hub_id TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
CREATE INDEX task_leases_hub ON task_leases (hub_id);
CREATE INDEX task_leases_until ON task_leases (until);
CREATE TABLE singletons (
    name TEXT PRIMARY KEY,
    hub_id TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
CREATE TABLE svid_keys (
    kid TEXT PRIMARY KEY,
    hub_id TEXT NOT NULL,
    trust_domain TEXT NOT NULL,
    jwk TEXT NOT NULL,
    published_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    hub_id TEXT NOT NULL,
    task_id TEXT,
    agent TEXT NOT NULL,
    owner TEXT,
    url TEXT,
    lineage TEXT,
    opened_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX instances_agent ON instances (agent);
""",
)

NOW = "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"
_ACTIVE = "(" + ", ".join(f"'{s}'" for s in ACTIVE_STATES) + ")"


async def lease_new_task(conn: Any, task_id: str, hub_id: str, lease_s: float) -> None:
    """Give a task created in this transaction its first lease (same commit as the task)."""
    await conn.execute(
        f"INSERT INTO task_leases (task_id, hub_id, until) VALUES ($1, $2, {NOW} + $3) "
        "ON CONFLICT (task_id) DO NOTHING",
        task_id,
        hub_id,
        lease_s,
    )


class ClusterState:
    """The cluster tables of one PostgreSQL store (``PostgresStore.cluster``)."""

    def __init__(self, store: Any) -> None:
        # The PostgresStore whose pool and transactions these statements use.
        self._store = store

    async def heartbeat(self, hub_id: str, url: str, info: dict[str, Any], lease_s: float) -> float:
        """Record that ``hub_id`` is alive and renew the leases of its unfinished tasks;
        returns the server's clock."""
        async with self._store._conn() as conn:
            now = float(await conn.fetchval(f"SELECT {NOW}"))
            await conn.execute(
                "INSERT INTO hubs (id, url, started_at, heartbeat, info)"
                " VALUES ($1, $2, $3, $3, $4) ON CONFLICT (id) DO UPDATE"
                " SET url = EXCLUDED.url, heartbeat = EXCLUDED.heartbeat, info = EXCLUDED.info",
                hub_id,
                url,
                now,
                json.dumps(info),
            )
            await conn.execute(
                "UPDATE task_leases SET until = $2 WHERE hub_id = $1", hub_id, now + lease_s
            )
            return now

    async def restarted(self, hub_id: str) -> None:
        """A hub starts: its started_at is now (its row, if any, is an earlier run)."""
        async with self._store._conn() as conn:
            await conn.execute(
                f"UPDATE hubs SET started_at = {NOW}, heartbeat = {NOW} WHERE id = $1", hub_id
            )

    async def hubs(self, lease_s: float) -> list[dict[str, Any]]:
        """Every hub that ever beat, newest heartbeat first, each with ``alive`` (a beat
        within ``lease_s``) and the number of unfinished tasks it holds leases on."""
        async with self._store._conn(tx=False) as conn:
            rows = await conn.fetch(
                f"SELECT h.id, h.url, h.started_at, h.heartbeat, h.info, {NOW} AS now,"
                " (SELECT count(*) FROM task_leases l JOIN tasks t ON t.id = l.task_id"
                f"  WHERE l.hub_id = h.id AND t.state IN {_ACTIVE}) AS tasks"
                " FROM hubs h ORDER BY h.heartbeat DESC"
            )
        return [
            {
                "id": r["id"],
                "url": r["url"],
                "alive": r["now"] - r["heartbeat"] <= lease_s,
                "heartbeat_age_s": round(r["now"] - r["heartbeat"], 3),
                "started_at": r["started_at"],
                "leased_tasks": int(r["tasks"]),
                **(json.loads(r["info"]) if r["info"] else {}),
            }
            for r in rows
        ]

    async def owned_active(self, hub_id: str) -> set[str]:
        """Ids of the unfinished tasks whose lease ``hub_id`` holds (expired or not)."""
        async with self._store._conn(tx=False) as conn:
            rows = await conn.fetch(
                "SELECT l.task_id FROM task_leases l JOIN tasks t ON t.id = l.task_id"
                f" WHERE l.hub_id = $1 AND t.state IN {_ACTIVE}",
                hub_id,
            )
        return {r["task_id"] for r in rows}

    async def ended_held(self, hub_id: str, task_ids: list[str]) -> set[str]:
        """Which of ``task_ids`` ended while ``hub_id`` held their lease (it drove them last:
        their containers were its to remove)."""
        if not task_ids:
            return set()
        async with self._store._conn(tx=False) as conn:
            rows = await conn.fetch(
                "SELECT l.task_id FROM task_leases l JOIN tasks t ON t.id = l.task_id"
                " WHERE l.hub_id = $1 AND l.task_id = ANY($2::text[])"
                f" AND t.state NOT IN {_ACTIVE}",
                hub_id,
                task_ids,
            )
        return {r["task_id"] for r in rows}

    async def claim_expired(
        self, hub_id: str, lease_s: float, *, limit: int = 100
    ) -> list[tuple[str, str]]:
        """Take over unfinished tasks whose lease has expired (their hub stopped beating);
        returns (task id, the hub that held it)."""
        async with self._store._conn() as conn:
            rows = await conn.fetch(
                "WITH c AS ("
                " SELECT l.task_id, l.hub_id FROM task_leases l JOIN tasks t ON t.id = l.task_id"
                f" WHERE t.state IN {_ACTIVE} AND l.until < {NOW} AND l.hub_id <> $1"
                " ORDER BY l.until LIMIT $3 FOR UPDATE OF l SKIP LOCKED)"
                f" UPDATE task_leases l SET hub_id = $1, until = {NOW} + $2 FROM c"
                " WHERE l.task_id = c.task_id RETURNING l.task_id, c.hub_id AS previous",
                hub_id,
                lease_s,
                limit,
            )
        return [(r["task_id"], r["previous"]) for r in rows]

    async def hold(self, name: str, hub_id: str, lease_s: float) -> bool:
        """Take or renew the singleton ``name`` for ``hub_id``: true if this hub holds it
        now (it was free, expired, or already this hub's)."""
        async with self._store._conn() as conn:
            holder = await conn.fetchval(
                f"INSERT INTO singletons (name, hub_id, until) VALUES ($1, $2, {NOW} + $3)"
                " ON CONFLICT (name) DO UPDATE SET hub_id = EXCLUDED.hub_id,"
                " until = EXCLUDED.until"
                f" WHERE singletons.hub_id = EXCLUDED.hub_id OR singletons.until < {NOW}"
                " RETURNING hub_id",
                name,
                hub_id,
                lease_s,
            )
        return holder == hub_id

    async def release(self, hub_id: str) -> None:
        """A hub stopping cleanly gives up its singletons at once (no lease to wait out)."""
        async with self._store._conn() as conn:
            await conn.execute("DELETE FROM singletons WHERE hub_id = $1", hub_id)

    async def singletons(self) -> dict[str, str]:
        """Which live lease each singleton is held under: name -> hub id."""
        async with self._store._conn(tx=False) as conn:
            rows = await conn.fetch(f"SELECT name, hub_id FROM singletons WHERE until >= {NOW}")
        return {r["name"]: r["hub_id"] for r in rows}

    async def publish_keys(self, hub_id: str, trust_domain: str, jwks: dict[str, Any]) -> None:
        """Publish this hub's public signing keys for the trust domain's shared bundle."""
        async with self._store._conn() as conn:
            for jwk in jwks.get("keys", []):
                await conn.execute(
                    "INSERT INTO svid_keys (kid, hub_id, trust_domain, jwk, published_at)"
                    f" VALUES ($1, $2, $3, $4, {NOW}) ON CONFLICT (kid) DO NOTHING",
                    jwk["kid"],
                    hub_id,
                    trust_domain,
                    json.dumps(jwk),
                )

    async def trusted_keys(self, trust_domain: str) -> list[dict[str, Any]]:
        """Every hub's published public keys for ``trust_domain``."""
        async with self._store._conn(tx=False) as conn:
            rows = await conn.fetch(
                "SELECT jwk FROM svid_keys WHERE trust_domain = $1 ORDER BY published_at",
                trust_domain,
            )
        return [json.loads(r["jwk"]) for r in rows]

    async def open_instance(self, hub_id: str, entry: dict[str, Any]) -> None:
        """List a running instance in the directory (or move it to ``hub_id``)."""
        async with self._store._conn() as conn:
            await conn.execute(
                "INSERT INTO instances"
                " (instance_id, hub_id, task_id, agent, owner, url, lineage, opened_at)"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7, {NOW}) ON CONFLICT (instance_id)"
                " DO UPDATE SET hub_id = EXCLUDED.hub_id, url = EXCLUDED.url",
                entry["instance_id"],
                hub_id,
                entry.get("task_id"),
                entry["agent"],
                entry.get("owner"),
                entry.get("url"),
                json.dumps(entry.get("lineage") or []),
            )

    async def close_instance(self, instance_id: str) -> None:
        """Take an instance out of the directory (its task ended)."""
        async with self._store._conn() as conn:
            await conn.execute("DELETE FROM instances WHERE instance_id = $1", instance_id)

    async def instances(self, *, except_hub: str) -> list[dict[str, Any]]:
        """The directory's instances of unfinished tasks that other hubs run, dead hubs'
        included: their containers run on, and their tokens stay good until they expire."""
        async with self._store._conn(tx=False) as conn:
            rows = await conn.fetch(
                "SELECT i.instance_id, i.hub_id, i.task_id, i.agent, i.owner, i.url, i.lineage"
                " FROM instances i JOIN tasks t ON t.id = i.task_id"
                f" WHERE i.hub_id <> $1 AND t.state IN {_ACTIVE}",
                except_hub,
            )
        return [{**dict(r), "lineage": json.loads(r["lineage"] or "[]")} for r in rows]
