"""Warm pools against the real engine: warm dispatch end to end, the warm container's
``docker inspect`` against the decision's sandbox, nothing passing between tasks, reuse
for one owner only, refill, a restart with a full pool, a reload draining a pool, a warm
container killed while idle, and the engine stopping under a full pool."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from gateway.containers.backend import LABEL_POOL, LABEL_TASK
from gateway.errors import AgentUnreachable
from gateway.http.agent_app import start_listeners
from gateway.http.app import HUB
from tests.conftest import auth, make_settings
from tests.integration.conftest import RUN_ID, cleanup_hub, registry_file
from tests.integration.test_crash_docker import _engine_controls, _wait_engine, free_port

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]
ECHO_RESOURCES = "    resources: {memory: 64m, cpus: 0.5, pids: 32}\n"


def pooled(path: Path, entry: str) -> Path:
    text = path.read_text()
    assert text.count(ECHO_RESOURCES) == 1
    path.write_text(text.replace(ECHO_RESOURCES, ECHO_RESOURCES + entry))
    return path


class Client:
    """A live hub (as ``serve`` runs it: agents reach its agent routes) and a session."""

    def __init__(self, session: aiohttp.ClientSession, app: Any, listeners: Any) -> None:
        self.session, self.app, self.listeners = session, app, listeners

    def post(self, path: str, **kw: Any) -> Any:
        return self.session.post(path, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.session.get(path, **kw)

    async def close(self) -> None:
        await self.session.close()
        await self.listeners.close()


@pytest.fixture
async def pool_hub(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """``start(entry)`` runs a hub whose echo has ``entry`` (e.g. a pool); calling it again
    stops the running hub first and starts one on the same state and hub id (a restart)."""
    from gateway.http.app import create_app

    networks = [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]
    hub_id = f"test-{RUN_ID}-pool-{secrets.token_hex(3)}"
    clients: list[Client] = []

    async def start(entry: str | None = None) -> Client:
        if clients:
            await clients[-1].close()
        if entry is not None:
            pooled(registry_file(tmp_path, agent_images), entry)
        port = free_port()
        settings = make_settings(
            tmp_path,
            agents_file=tmp_path / "agents.yaml",
            network=networks[0],
            egress_network=networks[1],
            hub_id=hub_id,
            port=port,
        )
        app = create_app(settings)
        listeners = await start_listeners(app, host="127.0.0.1", port=port)
        client = Client(aiohttp.ClientSession(f"http://127.0.0.1:{port}"), app, listeners)
        clients.append(client)
        return client

    try:
        yield start
    finally:
        if clients:
            await clients[-1].close()
        cleanup_hub(docker_api, hub_id, networks)


async def until(check: Callable[[], Any], within_s: float = 30) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def idle(client: Any) -> int:
    return int(client.app[HUB].pools._sizes("echo")["idle"])


async def run(client: Any, key: str, input: Any, **extra: Any) -> dict[str, Any]:
    resp = await client.post(
        "/v1/tasks?wait=30", json={"agent": "echo", "input": input, **extra}, headers=auth(key)
    )
    body: dict[str, Any] = await resp.json()
    return body


def running_echo(docker_api: docker.APIClient, client: Any) -> list[dict[str, Any]]:
    hub_id = client.app[HUB].hub_id
    return list(docker_api.containers(filters={"label": [f"io.agent-gateway.hub={hub_id}"]}))


def exists(docker_api: docker.APIClient, cid: str) -> bool:
    """True while the container exists (False once removed)."""
    try:
        docker_api.inspect_container(cid)
    except docker.errors.NotFound:
        return False
    return True


def exec_in(docker_api: docker.APIClient, cid: str, *cmd: str) -> str:
    ex = docker_api.exec_create(cid, list(cmd), user="65534:65534")
    return docker_api.exec_start(ex["Id"]).decode()


async def test_warm_dispatch_runs_the_granted_sandbox_and_shares_nothing(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    client = await pool_hub("    pool: {min: 2, max: 3}\n")
    await until(lambda: idle(client) == 2)
    warm_ids = set(client.app[HUB].pools.owned())
    hosts = {}
    for cid in warm_ids:
        info = docker_api.inspect_container(cid)
        hosts[cid] = info["HostConfig"]
        env = "\n".join(info["Config"]["Env"])
        assert "AGENT_SVID" not in env and "AGENT_TASK_ID" not in env  # no identity yet
        assert LABEL_TASK not in info["Config"]["Labels"]
        assert info["Config"]["Labels"][LABEL_POOL] == "echo"
        # Something a task left behind, in every container it could have run in.
        exec_in(docker_api, cid, "sh", "-c", "echo secret > /tmp/left-by-task-1")

    # Progress reaches the hub only with the token the task brought in its body.
    first = await run(client, keys["user"], {"progress_steps": 2, "progress_delay_s": 0.2})
    assert first["state"] == "succeeded", first
    assert first["dispatch"] == "warm" and first["container"]["id"] in warm_ids
    granted, host = first["sandbox"], hosts[first["container"]["id"]]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (
        granted["memory_bytes"],
        int(granted["cpus"] * 1e9),
        granted["pids"],
    )
    assert host["ReadonlyRootfs"] is granted["read_only_root"] and not host.get("Binds")
    resp = await client.get(f"/v1/tasks/{first['task_id']}/events", headers=auth(keys["user"]))
    assert b"step 2 of 2" in await resp.read()

    # One task per container: it is gone, and the next task never sees its file.
    await until(lambda: not exists(docker_api, first["container"]["id"]))
    await until(lambda: idle(client) == 2)  # refilled
    fresh = client.app[HUB].pools.owned() - warm_ids
    assert fresh
    for cid in fresh:
        assert "left-by-task-1" not in exec_in(docker_api, cid, "ls", "/tmp")
    status = await (await client.get("/v1/status", headers=auth(keys["operator"]))).json()
    assert status["pools"]["echo"]["hits"] == 1


async def test_inspect_of_a_tightened_warm_container_equals_the_grant(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    # The pool warms with what echo asks (64m, 0.5 CPU, 32 pids); a decision granting less
    # gets the container tightened with docker update before the task is handed over.
    client = await pool_hub("    pool: {min: 1, max: 1}\n")
    hub = client.app[HUB]
    await until(lambda: idle(client) == 1)
    cid = next(iter(hub.pools.owned()))
    agent = hub.config.registry.agents["echo"]
    grant = {
        "network": "internal",
        "memory_bytes": 48 * 1024 * 1024,
        "cpus": 0.25,
        "pids": 24,
        "read_only_root": True,
        "mounts": [],
    }
    warm = await hub.pools.acquire(agent, grant, owner="alice", reuse=False, timeout_s=10)
    assert warm is not None and warm.handle.id == cid
    host = docker_api.inspect_container(cid)["HostConfig"]
    assert host["Memory"] == grant["memory_bytes"] and host["MemorySwap"] == grant["memory_bytes"]
    assert host["NanoCpus"] == 250_000_000 and host["PidsLimit"] == 24
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    net = list(docker_api.inspect_container(cid)["NetworkSettings"]["Networks"])
    assert net == [hub.settings.containers.internal_network]
    # A grant wider than the container: a cold start, never the warm one.
    wider = {**grant, "memory_bytes": 512 * 1024 * 1024}
    assert await hub.pools.acquire(agent, wider, owner="a", reuse=False, timeout_s=10) is None
    await hub.pools.release(warm, owner=None)


async def test_reuse_is_for_the_same_owner_only(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    client = await pool_hub("    reuse: true\n    pool: {min: 1, max: 3, max_tasks: 3}\n")
    await until(lambda: idle(client) == 1)
    a1 = await run(client, keys["user"], {"n": 1})
    a2 = await run(client, keys["user"], {"n": 2})
    assert a1["dispatch"] == a2["dispatch"] == "warm"
    assert a1["container"]["id"] == a2["container"]["id"]  # the policy allows it for echo
    await until(lambda: idle(client) == 1)
    other = await run(client, keys["developer"], {"n": 3})  # another owner
    assert other["container"]["id"] != a1["container"]["id"]


async def test_a_restart_with_a_full_pool_leaves_no_container_behind(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    client = await pool_hub("    pool: {min: 2, max: 2}\n")
    await until(lambda: idle(client) == 2)
    before = set(client.app[HUB].pools.owned())
    # Stopped with a full pool: the idle containers are removed; what a killed hub leaves
    # is removed by recovery (below, simulated by leaving one behind on purpose).
    left = next(iter(before))
    client.app[HUB].pools.forget(left)
    client = await pool_hub()
    hub = client.app[HUB]
    assert hub.last_recovery is not None
    assert hub.last_recovery.pooled_removed and not hub.last_recovery.orphans
    await until(lambda: idle(client) == 2)
    ids = {c["Id"] for c in running_echo(docker_api, client)}
    assert ids == hub.pools.owned() and ids.isdisjoint(before)
    assert "orphan_container" not in hub.alerts.active
    task = await run(client, keys["user"], {"n": 1})
    assert task["dispatch"] == "warm"


async def test_a_reload_that_changes_echo_drains_its_pool_and_refills(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient, tmp_path: Path
) -> None:
    client = await pool_hub("    pool: {min: 2, max: 2}\n")
    await until(lambda: idle(client) == 2)
    before = set(client.app[HUB].pools.owned())
    path = tmp_path / "agents.yaml"
    path.write_text(
        path.read_text().replace(
            ECHO_RESOURCES, "    resources: {memory: 64m, cpus: 0.4, pids: 32}\n"
        )
    )
    resp = await client.post("/v1/admin/reload", headers=auth(keys["operator"]))
    assert resp.status == 200, await resp.text()
    hub = client.app[HUB]
    await until(lambda: idle(client) == 2 and hub.pools.owned().isdisjoint(before))
    for cid in hub.pools.owned():
        assert docker_api.inspect_container(cid)["HostConfig"]["NanoCpus"] == 400_000_000
    await until(lambda: not any(exists(docker_api, cid) for cid in before))


def kill(docker_api: docker.APIClient, cid: str) -> None:
    """SIGKILL a container and wait until it has exited (the kill call does not wait)."""
    docker_api.kill(cid)
    with contextlib.suppress(docker.errors.NotFound):  # exited and removed already
        docker_api.wait(cid, timeout=10)


async def test_a_warm_container_killed_while_idle_never_gets_a_task(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    client = await pool_hub("    pool: {min: 2, max: 2}\n")
    pools = client.app[HUB].pools
    await until(lambda: idle(client) == 2)
    # The container a pick takes first dies; a task comes before the periodic probe.
    first, second = list(pools._warm)
    kill(docker_api, first)
    task = await run(client, keys["user"], {"n": 1})
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "warm" and task["container"]["id"] == second
    await until(lambda: not exists(docker_api, first))  # removed, not left to the orphan scan
    # Dead while idle, no task asking: the periodic probe replaces it.
    await until(lambda: idle(client) == 2)
    victim = next(iter(pools._warm))
    docker_api.kill(victim)
    await until(lambda: victim not in pools.owned() and idle(client) == 2, within_s=15)
    assert not exists(docker_api, victim)
    # Every warm container dead at once: the task still succeeds, never in a dead one (cold,
    # or in one the pool warmed meanwhile while the dead ones were found out).
    killed = set(pools._warm)
    for cid in killed:
        kill(docker_api, cid)
    task = await run(client, keys["user"], {"n": 2})
    assert task["state"] == "succeeded", task
    assert task["container"]["id"] not in killed, (task["dispatch"], task["history"])
    assert "orphan_container" not in client.app[HUB].alerts.active


async def test_the_engine_stopping_under_a_full_pool(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    """Stop the real engine with a full pool: degraded, no refill and no busy loop; start
    it: the dead pooled containers are removed, the pool refills, a task runs warm."""
    stop, start = _engine_controls()
    if stop is None:
        message = "cannot stop and start this machine's Docker engine (not root, no pid file)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    client = await pool_hub("    pool: {min: 2, max: 2}\n")
    hub = client.app[HUB]
    await until(lambda: idle(client) == 2)
    before = set(hub.pools.owned())
    starts: list[float] = []
    original = hub.backend.start

    async def counted(spec: Any) -> Any:
        starts.append(time.monotonic())
        return await original(spec)

    hub.backend.start = counted
    stop()
    try:
        await asyncio.to_thread(_wait_engine, False, 30)
        await hub.monitor.tick()
        assert hub.mode == "degraded" and "container_engine" in hub.degraded_reasons
        degraded_at = time.monotonic()
        # The engine stopped the pooled containers on its way out: noticed, not handed out.
        await until(lambda: idle(client) == 0, within_s=10)
        # Still the pool's to remove (the engine refused): no orphan, nothing forgotten.
        assert hub.pools.owned() == before
        await asyncio.sleep(2)  # four refill rounds while degraded
        assert [t for t in starts if t > degraded_at] == []
        status = await (await client.get("/v1/status", headers=auth(keys["operator"]))).json()
        assert status["pools"]["echo"]["containers"]["idle"] == 0
    finally:
        start()
        await asyncio.to_thread(_wait_engine, True, 90)
    await hub.monitor.tick()
    assert hub.mode == "normal"
    await until(lambda: idle(client) == 2 and hub.pools.owned().isdisjoint(before), within_s=30)
    await until(lambda: not any(exists(docker_api, cid) for cid in before), within_s=15)
    assert {c["Id"] for c in running_echo(docker_api, client)} == hub.pools.owned()
    task = await run(client, keys["user"], {"n": 1})
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "warm"
    assert "orphan_container" not in hub.alerts.active


async def test_a_fresh_warm_container_gone_before_its_hand_off_is_replaced(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    """A container probed within ``fresh_s`` is handed the task unprobed; if it died in
    between, the hand-off cannot connect, nothing reached it, and the task is placed again
    (another warm container) instead of failing."""
    client = await pool_hub("    pool: {min: 2, max: 2}\n")
    pools = client.app[HUB].pools
    await until(lambda: idle(client) == 2)
    pools.options = dataclasses.replace(pools.options, fresh_s=600.0, check_s=600.0)
    first, second = list(pools._warm)
    kill(docker_api, first)
    task = await run(client, keys["user"], {"n": 1})
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "warm" and task["container"]["id"] == second
    details = [e.get("detail") or "" for e in task["history"]]
    assert any("did not answer: placed again" in d for d in details), task["history"]
    assert [e["state"] for e in task["history"]].count("succeeded") == 1
    await until(lambda: not exists(docker_api, first))


async def test_a_hand_off_reaching_another_container_is_refused(
    pool_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    """The engine may give a dead container's address to a new one: the hub names the
    container it means (its hostname), and the real image's SDK refuses another's task."""
    client = await pool_hub("    pool: {min: 2, max: 2}\n")
    hub = client.app[HUB]
    await until(lambda: idle(client) == 2)
    meant, other = (w.handle for w in hub.pools._warm.values())
    assert meant.hostname == docker_api.inspect_container(meant.id)["Config"]["Hostname"]
    # `other`'s address, as if `meant` had died and `other` had been given its address.
    moved = dataclasses.replace(other, hostname=meant.hostname)
    with pytest.raises(AgentUnreachable):
        await hub.agents.post(moved, "/task", {"task_id": "t-misdirected", "input": {}}, 5)
    await hub.agents.wait_ready(other, 5)  # its own name: it answers
    task = await run(client, keys["user"], {"n": 1})
    assert task["state"] == "succeeded" and task["dispatch"] == "warm", task
