"""Several hubs on one real PostgreSQL: heartbeats, task leases and takeover, singletons,
shared SVID keys, the instance directory, and the membership loop that drives them."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from gateway.cluster import ClusterHooks, Membership
from gateway.store.postgres import PostgresStore
from tests.pg import pg_cluster, pg_target  # noqa: F401  (fixtures)

LEASE = 0.6


def task_row(**extra: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "agent": "echo",
        "capability": None,
        "subject": "alice",
        "key_id": "k1",
        "input": {"msg": "hi"},
        "timeout_s": 30.0,
        "deadline": time.time() + 30,
        "decision_id": "d1",
        "sandbox": {},
        "labels": None,
        "attempts": 0,
        "idempotency_key": None,
        "parent_id": None,
        **extra,
    }


@pytest.fixture
async def two(pg_target: str) -> Any:  # noqa: F811
    """Two hubs' stores on one database, each leasing the tasks it creates."""
    a, b = PostgresStore(pg_target), PostgresStore(pg_target)
    a.lease = ("hub-a", LEASE)
    b.lease = ("hub-b", LEASE)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_task_is_leased_by_its_creator_and_claimed_only_after_expiry(two: Any) -> None:
    a, b = two
    task, _ = await a.create_task(task_row())
    assert await a.cluster.owned_active("hub-a") == {task.id}
    # Hub a beats: its lease is renewed, so hub b may not claim it.
    await a.cluster.heartbeat("hub-a", "http://a", {}, LEASE)
    assert await b.cluster.claim_expired("hub-b", LEASE) == []
    await asyncio.sleep(LEASE + 0.2)
    assert await b.cluster.claim_expired("hub-b", LEASE) == [(task.id, "hub-a")]
    assert await b.cluster.owned_active("hub-b") == {task.id}
    assert await a.cluster.owned_active("hub-a") == set()
    # Hub a comes back and beats: the task stays hub b's (a renews only its own leases).
    await a.cluster.heartbeat("hub-a", "http://a", {}, LEASE)
    assert await a.cluster.owned_active("hub-a") == set()


async def test_a_finished_task_is_never_claimed(two: Any) -> None:
    a, b = two
    task, _ = await a.create_task(task_row())
    await a.transition(task.id, "failed", allowed_from=("pending",))
    await asyncio.sleep(LEASE + 0.2)
    assert await b.cluster.claim_expired("hub-b", LEASE) == []


async def test_two_hubs_claiming_at_once_take_disjoint_tasks(pg_target: str) -> None:  # noqa: F811
    dead = PostgresStore(pg_target)
    dead.lease = ("hub-dead", 0.01)
    ids = {(await dead.create_task(task_row()))[0].id for _ in range(20)}
    await asyncio.sleep(0.1)
    b, c = PostgresStore(pg_target), PostgresStore(pg_target)
    try:
        got_b, got_c = await asyncio.gather(
            b.cluster.claim_expired("hub-b", 30, limit=100),
            c.cluster.claim_expired("hub-c", 30, limit=100),
        )
        claimed_b = {t for t, _ in got_b}
        claimed_c = {t for t, _ in got_c}
        assert not claimed_b & claimed_c
        assert claimed_b | claimed_c == ids
    finally:
        for s in (dead, b, c):
            await s.close()


async def test_a_singleton_has_one_holder_and_moves_when_its_lease_expires(two: Any) -> None:
    a, b = two
    assert await a.cluster.hold("orphan_scan", "hub-a", LEASE)
    assert not await b.cluster.hold("orphan_scan", "hub-b", LEASE)
    assert await a.cluster.hold("orphan_scan", "hub-a", LEASE)  # renewed by its holder
    await asyncio.sleep(LEASE + 0.2)
    assert await b.cluster.hold("orphan_scan", "hub-b", LEASE)
    assert not await a.cluster.hold("orphan_scan", "hub-a", LEASE)
    assert await a.cluster.singletons() == {"orphan_scan": "hub-b"}
    await b.cluster.release("hub-b")
    assert await a.cluster.hold("orphan_scan", "hub-a", LEASE)


async def test_hubs_are_listed_alive_or_not_with_their_leased_tasks(two: Any) -> None:
    a, b = two
    await a.create_task(task_row())
    await a.cluster.heartbeat("hub-a", "http://a:1", {"mode": "normal"}, LEASE)
    await b.cluster.heartbeat("hub-b", "http://b:1", {"mode": "degraded"}, LEASE)
    hubs = {h["id"]: h for h in await a.cluster.hubs(LEASE)}
    assert hubs["hub-a"]["alive"] and hubs["hub-b"]["alive"]
    assert hubs["hub-a"]["leased_tasks"] == 1 and hubs["hub-b"]["leased_tasks"] == 0
    assert hubs["hub-b"]["mode"] == "degraded"
    await asyncio.sleep(LEASE + 0.2)
    await a.cluster.heartbeat("hub-a", "http://a:1", {}, LEASE)
    hubs = {h["id"]: h for h in await a.cluster.hubs(LEASE)}
    assert hubs["hub-a"]["alive"] and not hubs["hub-b"]["alive"]


async def test_keys_and_instances_published_by_one_hub_are_seen_by_the_other(two: Any) -> None:
    a, b = two
    jwk = {"kid": "k-a", "kty": "EC", "crv": "P-256", "x": "x", "y": "y"}
    await a.cluster.publish_keys("hub-a", "example.org", {"keys": [jwk]})
    assert await b.cluster.trusted_keys("example.org") == [jwk]
    assert await b.cluster.trusted_keys("other.org") == []
    task, _ = await a.create_task(task_row())
    entry = {
        "instance_id": "i-1",
        "agent": "echo",
        "task_id": task.id,
        "owner": "alice",
        "url": "http://10.0.0.5:8080",
        "lineage": [{"task_id": "t0", "agent": "coordinator"}],
    }
    await a.cluster.open_instance("hub-a", entry)
    seen = await b.cluster.instances(except_hub="hub-b")
    assert seen == [{**entry, "hub_id": "hub-a"}]
    assert await a.cluster.instances(except_hub="hub-a") == []
    # The task ends: its instance leaves the directory as far as peers can tell.
    await a.transition(task.id, "succeeded", allowed_from=("pending",))
    assert await b.cluster.instances(except_hub="hub-b") == []


async def test_membership_takes_over_a_dead_hubs_tasks_and_its_singletons(two: Any) -> None:
    a, b = two
    taken: list[list[tuple[str, str]]] = []
    trusted: list[list[dict[str, Any]]] = []
    took = asyncio.Event()

    async def take_over(claims: list[tuple[str, str]]) -> None:
        taken.append(claims)
        took.set()

    def hooks(kid: str) -> ClusterHooks:
        return ClusterHooks(
            info=lambda: {"mode": "normal"},
            take_over=take_over,
            own_jwks=lambda: {"keys": [{"kid": kid, "kty": "EC"}]},
            trust_keys=trusted.append,
            remote_instances=lambda entries: None,
            trust_domain="example.org",
        )

    ma = Membership(a.cluster, "hub-a", "http://a", hooks("ka"), lease_s=LEASE, beat_s=0.1)
    mb = Membership(b.cluster, "hub-b", "http://b", hooks("kb"), lease_s=LEASE, beat_s=0.1)
    await ma.start()
    await mb.start()
    try:
        task, _ = await a.create_task(task_row())
        await asyncio.sleep(LEASE * 2)
        assert taken == []  # hub a is alive: its lease is renewed
        assert ma.leads("orphan_scan") != mb.leads("orphan_scan")
        assert {k["kid"] for k in trusted[-1]} == {"ka", "kb"}
        # Hub a dies (no clean stop: its loop just ends).
        assert ma._task is not None
        ma._task.cancel()
        await asyncio.wait_for(took.wait(), 5)
        assert taken == [[(task.id, "hub-a")]]
        await asyncio.sleep(0.3)
        assert all(mb.leads(n) for n in ("orphan_scan", "watchdog"))
        assert mb.live_hubs() == 1
        status = mb.status()
        assert {h["id"]: h["alive"] for h in status["hubs"]} == {"hub-a": False, "hub-b": True}
    finally:
        await mb.stop()
        await ma.stop()
