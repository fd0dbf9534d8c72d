"""Two real hubs (HTTP API, policies, identity, routers) on one real PostgreSQL: a task of a
hub that dies is taken over by the other, tokens of the dead hub keep working, a message
crosses hubs, and /v1/status shows both. Agents run in-process (the fake engine, shared by
both hubs as one engine would be); tests/integration/test_cluster_docker.py does the same
with real containers and SIGKILLs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.containers.backend import LABEL_HUB
from gateway.http.app import HUB, create_app
from gateway.identity.service import SVID_ENV
from gateway.store import ACTIVE_STATES
from tests.conftest import FakeBackend, auth, make_settings
from tests.messaging import svid_auth
from tests.pg import pg_cluster, pg_target  # noqa: F401  (fixtures)

LEASE = 1.0
SLOW = {"progress_steps": 12, "progress_delay_s": 0.25}  # echo, about 3 s


@pytest.fixture
async def engine() -> Any:
    """One fake engine both hubs use; only the test closes it (a hub's stop would not)."""
    shared = FakeBackend()
    close = shared.close

    async def keep() -> None:
        return None

    shared.close = keep  # type: ignore[method-assign]
    yield shared
    await close()


async def two_hubs(
    pg_target: str,  # noqa: F811
    tmp_path: Path,
    engine: FakeBackend,
    aiohttp_client: Any,
) -> tuple[Any, Any]:
    clients = []
    for name in ("a", "b"):
        settings = make_settings(
            tmp_path / name,
            keys_file=tmp_path / "keys.json",
            store=pg_target,
            lease_s=LEASE,
            hub_id=f"hub-{name}",
        )
        clients.append(await aiohttp_client(create_app(settings, backend=engine)))
    return clients[0], clients[1]


async def until(check: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def running_on(client: Any, key: str) -> str:
    """Submit a slow echo task through ``client``'s hub; its id once its container runs."""
    resp = await client.post("/v1/tasks", json={"agent": "echo", "input": SLOW}, headers=auth(key))
    assert resp.status == 202, await resp.text()
    task_id: str = (await resp.json())["task_id"]
    instances = client.app[HUB].instances

    async def running() -> bool:
        inst = instances.for_task(task_id)
        return inst is not None and inst.handle is not None

    await until(running)
    return task_id


def die(hub: Any) -> None:
    """Stop a hub the way a SIGKILL would, as far as the others can tell: no heartbeat, no
    runner finishing its tasks, nothing released."""
    assert hub.cluster is not None and hub.cluster._task is not None
    hub.cluster._task.cancel()
    if hub.monitor._task is not None:
        hub.monitor._task.cancel()
    hub.router._detaching = True
    for runner in list(hub.router._runners.values()):
        runner.cancel()


async def test_a_dead_hubs_task_is_taken_over_and_its_tokens_stay_good(
    pg_target: str,  # noqa: F811
    tmp_path: Path,
    keys: dict[str, str],
    engine: FakeBackend,
    aiohttp_client: Any,
) -> None:
    a, b = await two_hubs(pg_target, tmp_path, engine, aiohttp_client)
    hub_a, hub_b = a.app[HUB], b.app[HUB]
    task_id = await running_on(a, keys["user"])
    token = hub_a.instances.for_task(task_id).env[SVID_ENV]
    await hub_b.cluster.beat()  # learns hub a's keys and instances
    assert (
        hub_b.identities.verify(token).instance_id == hub_a.instances.for_task(task_id).instance_id
    )

    die(hub_a)
    assert await hub_b.store.cluster.owned_active("hub-a") == {task_id}
    # The dead hub's token keeps working on the live one (until it expires).
    await hub_b.cluster.beat()
    assert hub_b.identities.verify(token).agent == "echo"

    async def ended() -> bool:
        return (await hub_b.store.get_task(task_id)).terminal

    await until(ended, within_s=15)
    task = await hub_b.store.get_task(task_id)
    assert task.state == "succeeded", task
    assert task.result == {"echo": SLOW, "agent": "echo"}
    states = [e.state for e in task.history or ()]
    assert states.count("succeeded") == 1 and states[0] == "pending"
    assert await hub_b.store.cluster.owned_active("hub-b") == set()
    assert hub_b.cluster.takeovers == 1
    assert "hub_takeover" in {a["name"] for a in hub_b.alerts.to_json()["active"]}
    status = await (await b.get("/v1/status", headers=auth(keys["operator"]))).json()
    hubs = {h["id"]: h for h in status["cluster"]["hubs"]}
    assert set(hubs) == {"hub-a", "hub-b"} and hubs["hub-b"]["alive"]
    assert sorted(status["cluster"]["singletons"]) == ["orphan_scan", "watchdog"]
    report = await hub_b.decisions.verify()
    assert report.ok, report.problems


async def test_a_taken_over_container_is_removed_by_the_restart_of_the_hub_that_drove_it(
    pg_target: str,  # noqa: F811
    tmp_path: Path,
    keys: dict[str, str],
    engine: FakeBackend,
    aiohttp_client: Any,
) -> None:
    """Hub b re-attaches hub a's container after a takeover, and dies after the task ended
    but before removing it. The container carries a's label; b's lease on the ended task
    says it was b's to remove, and b's restart does."""
    a, b = await two_hubs(pg_target, tmp_path, engine, aiohttp_client)
    hub_a, hub_b = a.app[HUB], b.app[HUB]
    task_id = await running_on(a, keys["user"])
    container = (await hub_a.store.get_task(task_id)).container_id
    assert engine.labels[container][LABEL_HUB] == "hub-a"
    die(hub_a)

    async def driven_by_b() -> bool:
        return hub_b.router.drives(task_id)

    await until(driven_by_b)
    runners = list(hub_b.router._runners.values())
    die(hub_b)
    # Its cancelled runners have stopped (a SIGKILLed hub's never run again) before the end
    # is recorded: else one finds the task ended and removes the container itself.
    await asyncio.wait(runners)
    # Its agent reports the result to a's address, where a restarted hub records it.
    await hub_a.store.transition(
        task_id, "succeeded", allowed_from=ACTIVE_STATES, result={"echo": SLOW, "agent": "echo"}
    )
    assert container in engine.servers
    restarted = make_settings(
        tmp_path / "b2", keys_file=tmp_path / "keys.json", store=pg_target, lease_s=LEASE,
        hub_id="hub-b",
    )  # fmt: skip
    b2 = await aiohttp_client(create_app(restarted, backend=engine))
    report = b2.app[HUB].last_recovery
    assert report is not None and report.orphans == [container], report
    assert container not in engine.servers
    assert "orphan_container" in {x["name"] for x in b2.app[HUB].alerts.to_json()["active"]}


async def test_a_message_reaches_an_instance_the_other_hub_runs(
    pg_target: str,  # noqa: F811
    tmp_path: Path,
    keys: dict[str, str],
    engine: FakeBackend,
    aiohttp_client: Any,
) -> None:
    a, b = await two_hubs(pg_target, tmp_path, engine, aiohttp_client)
    hub_a, hub_b = a.app[HUB], b.app[HUB]
    ids = []
    for client in (a, b):
        resp = await client.post(
            "/v1/tasks", json={"agent": "echo", "input": SLOW}, headers=auth(keys["user"])
        )
        ids.append((await resp.json())["task_id"])

    async def both_ready() -> bool:
        ia, ib = hub_a.instances.for_task(ids[0]), hub_b.instances.for_task(ids[1])
        return bool(ia and ia.handle and ib and ib.handle)

    await until(both_ready)
    # Each hub learns what the other runs.
    await hub_a.cluster.beat()
    await hub_b.cluster.beat()
    on_a = hub_a.instances.for_task(ids[0])
    sender = hub_b.instances.for_task(ids[1])
    assert [i.instance_id for i in hub_b.instances.running("echo", exclude=sender.instance_id)] == [
        on_a.instance_id
    ]
    envelope = {"type": "request", "to": "echo", "kind": "ping", "payload": {"n": 1}}
    resp = await b.post("/v1/messages", json=envelope, headers=svid_auth(sender.env[SVID_ENV]))
    body = await resp.json()
    assert resp.status == 200, body
    assert body["reply"] == {"echo": {"n": 1}, "agent": "echo", "from": "echo"}
    # The same message through the hub that runs the recipient gives the same answer.
    resp = await a.post("/v1/messages", json=envelope, headers=svid_auth(sender.env[SVID_ENV]))
    assert resp.status == 200, await resp.text()
