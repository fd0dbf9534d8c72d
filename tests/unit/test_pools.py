"""Warm pools (gateway.containers.pools) on the fake backend: what a warm container may run,
what it carries, and the faults around it (cancels, failing warm-ups, reloads, degraded).

The real-engine side (docker inspect, files between tasks, restarts) is in
tests/integration/test_pools_docker.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import pytest

from gateway.bundle.registry import AgentSpec, Resources
from gateway.containers.backend import (
    LABEL_AGENT,
    LABEL_POOL,
    LABEL_TASK,
    ContainerHandle,
    ContainerSpec,
)
from gateway.containers.pools import ALERT, PoolOptions, WarmPools
from gateway.errors import AgentUnavailable
from gateway.sdk import Agent
from gateway.sdk.client import HubError
from tests.conftest import REPO, FakeBackend, auth, load_example, make_settings

pytestmark = pytest.mark.timeout(60)
NETWORKS = {"internal": "net-int", "egress": "net-egr"}
MB = 1024 * 1024


@dataclass
class PoolBackend(FakeBackend):
    """The fake engine, plus ``docker update`` and an engine call a cancel cannot stop
    (as the Docker SDK's worker thread goes on after its awaiter is cancelled)."""

    updates: list[tuple[str, int, int, int]] = field(default_factory=list)
    update_delay_s: float = 0.0
    refuse_update: bool = False
    engine_s: float = 0.0

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        return await asyncio.shield(self._start(spec))

    async def _start(self, spec: ContainerSpec) -> ContainerHandle:
        await asyncio.sleep(self.engine_s)
        return await super().start(spec)

    async def update_limits(
        self, container_id: str, *, memory_bytes: int, nano_cpus: int, pids_limit: int
    ) -> None:
        await asyncio.sleep(self.update_delay_s)
        if self.refuse_update:
            raise AgentUnavailable("engine refused the update")
        self.updates.append((container_id, memory_bytes, nano_cpus, pids_limit))


def echo(**changes: Any) -> AgentSpec:
    base = AgentSpec(
        name="echo",
        image="agent-gateway/echo:dev",
        capabilities=("debug.echo",),
        input_schema="agents/echo.input.json",
        output_schema="agents/echo.output.json",
        port=8000,
        timeout_s=30,
        resources=Resources(memory="64m", cpus=0.5, pids=32),
        pool=MappingProxyType({"min": 2, "max": 3}),
    )
    return dataclasses.replace(base, **changes)


def sandbox(**changes: Any) -> dict[str, Any]:
    return {
        "network": "internal",
        "memory_bytes": 64 * MB,
        "cpus": 0.5,
        "pids": 32,
        "read_only_root": True,
        "mounts": [],
        **changes,
    }


async def ready(_handle: ContainerHandle, _timeout: float) -> None:
    return None


def make_pools(
    backend: PoolBackend, agents: dict[str, AgentSpec], *, check_s: float = 2.0, **kw: Any
) -> WarmPools:
    return WarmPools(
        backend=backend,
        agents=lambda: agents,
        wait_ready=kw.pop("wait_ready", ready),
        options=PoolOptions(
            hub_id="h", networks=NETWORKS, gateway_url="http://hub", interval_s=0, check_s=check_s
        ),
        **kw,
    )


async def until(check: Callable[[], bool], within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def filled(pools: WarmPools, agent: str, n: int, within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while pools._sizes(agent)["idle"] < n:
        assert time.monotonic() < deadline, pools.to_json()
        await pools.tick()
        await asyncio.sleep(0.02)


async def test_warm_containers_have_no_identity_no_task_and_a_ttl() -> None:
    backend = PoolBackend()
    pools = make_pools(backend, {"echo": echo()})
    await filled(pools, "echo", 2)
    assert len(backend.started) == 2
    for spec in backend.started:
        assert "AGENT_SVID" not in spec.env and "AGENT_TASK_ID" not in spec.env
        assert LABEL_TASK not in spec.labels and spec.labels[LABEL_POOL] == "echo"
        assert spec.ttl_s == 300 + 30 + 60  # idle_s + the agent's timeout + the grace
        assert spec.read_only and spec.cap_drop == ("ALL",) and spec.memory_bytes == 64 * MB
    await pools.stop()
    assert backend.servers == {}


@pytest.mark.parametrize(
    ("note", "grant", "hit", "tightened"),
    [
        ("the same sandbox", sandbox(), True, None),
        (
            "tighter: applied before the hand-off",
            sandbox(memory_bytes=32 * MB, pids=16),
            True,
            (32 * MB, 500_000_000, 16),
        ),
        ("more memory than warm: cold, never less", sandbox(memory_bytes=128 * MB), False, None),
        ("more cpus than warm", sandbox(cpus=1), False, None),
        ("another network", sandbox(network="egress"), False, None),
        ("mounts granted", sandbox(mounts=[{"src": "/x"}]), False, None),
        ("a writable root", sandbox(read_only_root=False), False, None),
    ],
)
async def test_a_warm_container_runs_only_the_sandbox_granted(
    note: str, grant: dict[str, Any], hit: bool, tightened: tuple[int, int, int] | None
) -> None:
    backend = PoolBackend()
    pools = make_pools(backend, {"echo": echo()})
    await filled(pools, "echo", 2)
    warm = await pools.acquire(echo(), grant, owner="alice", reuse=False, timeout_s=30)
    assert (warm is not None) is hit, note
    if tightened is not None:
        assert warm is not None
        assert backend.updates == [(warm.handle.id, *tightened)]
        assert (warm.memory_bytes, warm.nano_cpus, warm.pids) == tightened
    else:
        assert backend.updates == []
    await pools.stop()


async def test_a_limit_the_engine_will_not_tighten_is_a_cold_start() -> None:
    backend = PoolBackend(refuse_update=True)
    pools = make_pools(backend, {"echo": echo()})
    await filled(pools, "echo", 2)
    warm = await pools.acquire(
        echo(), sandbox(memory_bytes=32 * MB), owner="a", reuse=False, timeout_s=30
    )
    assert warm is None
    assert len(backend.removed) == 1  # the container that could not be tightened is gone
    assert pools.misses == {"echo": 1}
    await pools.stop()


async def test_reuse_only_for_the_same_owner_and_only_when_the_decision_allows() -> None:
    backend = PoolBackend()
    agent = echo(reuse=True, pool=MappingProxyType({"min": 1, "max": 3, "max_tasks": 2}))
    pools = make_pools(backend, {"echo": agent})
    await filled(pools, "echo", 1)
    first = await pools.acquire(agent, sandbox(), owner="alice", reuse=True, timeout_s=30)
    assert first is not None
    await pools.release(first, owner="alice")  # ran alice's task, reuse allowed
    assert pools._sizes("echo")["reusable"] == 1
    bob = await pools.acquire(agent, sandbox(), owner="bob", reuse=True, timeout_s=30)
    assert bob is None or bob.handle.id != first.handle.id  # never alice's container
    no_reuse = await pools.acquire(agent, sandbox(), owner="alice", reuse=False, timeout_s=30)
    assert no_reuse is None or no_reuse.handle.id != first.handle.id
    again = await pools.acquire(agent, sandbox(), owner="alice", reuse=True, timeout_s=30)
    assert again is not None and again.handle.id == first.handle.id
    await pools.release(again, owner="alice")  # max_tasks 2 reached: removed
    assert first.handle.id in backend.removed
    await pools.stop()


async def test_a_failing_warm_up_backs_off_with_an_alert_instead_of_looping() -> None:
    backend = PoolBackend(fail_start=True)
    alerts: list[str] = []
    pools = make_pools(backend, {"echo": echo()}, alert=lambda name, msg, **_: alerts.append(name))
    attempts = 0
    original = backend.start

    async def counting(spec: ContainerSpec) -> ContainerHandle:
        nonlocal attempts
        attempts += 1
        return await original(spec)

    backend.start = counting  # type: ignore[method-assign]
    for _ in range(20):  # 20 rounds within a second: one backoff window
        await pools.tick()
        await asyncio.sleep(0.02)
    assert attempts == 2  # the first round's starts_per_tick, then nothing until the retry
    assert alerts[0] == ALERT
    assert pools.to_json()["echo"]["failures"] == 2
    await pools.stop()


async def test_an_image_that_never_answers_health_is_removed_and_backed_off() -> None:
    backend = PoolBackend()

    async def never(_h: ContainerHandle, _t: float) -> None:
        raise AgentUnavailable("no answer on /health")

    pools = make_pools(backend, {"echo": echo()}, wait_ready=never)
    await pools.tick()
    # Both warm-ups started, failed their check and were removed...
    await until(
        lambda: (
            len(backend.started) == 2 and backend.servers == {} and not any(pools._warming.values())
        )
    )
    await pools.tick()
    await asyncio.sleep(0.05)
    assert len(backend.started) == 2  # ...and the next round backs off instead of retrying
    await pools.stop()


async def test_degraded_mode_stops_refilling() -> None:
    backend = PoolBackend()
    ok = False
    pools = make_pools(backend, {"echo": echo()}, can_refill=lambda: ok)
    for _ in range(3):
        await pools.tick()
    assert backend.started == []
    ok = True
    await filled(pools, "echo", 2)
    await pools.stop()


async def test_a_reload_that_changes_the_entry_drains_and_refills() -> None:
    backend = PoolBackend()
    agents = {"echo": echo()}
    pools = make_pools(backend, agents)
    await filled(pools, "echo", 2)
    old = set(backend.servers)
    agents["echo"] = echo(env=MappingProxyType({"MODE": "new"}))
    await pools.tick()
    await asyncio.sleep(0.05)
    await filled(pools, "echo", 2)
    assert old.isdisjoint(backend.servers)
    assert all(s.env.get("MODE") == "new" for s in backend.started[2:])
    # An old-entry container never serves the new entry.
    assert await pools.acquire(echo(), sandbox(), owner="a", reuse=False, timeout_s=30) is None
    await pools.stop()


async def test_a_pool_larger_than_the_engine_can_start_keeps_what_it_got() -> None:
    backend = PoolBackend()
    made = 0
    original = backend.start

    async def limited(spec: ContainerSpec) -> ContainerHandle:
        nonlocal made
        if made >= 2:
            raise AgentUnavailable("engine out of memory")
        made += 1
        return await original(spec)

    backend.start = limited  # type: ignore[method-assign]
    agent = echo(pool=MappingProxyType({"min": 5, "max": 5}))
    pools = make_pools(backend, {"echo": agent}, alert=lambda *a, **k: None)
    for _ in range(5):
        await pools.tick()
        await asyncio.sleep(0.02)
    assert pools._sizes("echo")["idle"] == 2
    assert pools.to_json()["echo"]["failures"] >= 1
    assert await pools.acquire(agent, sandbox(), owner="a", reuse=False, timeout_s=30)
    await pools.stop()


async def test_a_cancel_during_a_warm_assignment_removes_the_container() -> None:
    backend = PoolBackend(update_delay_s=0.3)
    pools = make_pools(backend, {"echo": echo()})
    await filled(pools, "echo", 2)
    job = asyncio.ensure_future(
        pools.acquire(echo(), sandbox(pids=16), owner="a", reuse=False, timeout_s=30)
    )
    await asyncio.sleep(0.05)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert len(backend.removed) == 1 and len(pools.owned()) == 1
    await pools.stop()


# -- through the hub


@dataclass
class EnvPoolBackend(PoolBackend):
    """PoolBackend whose agents see the environment their container would get (and call
    the hub over real HTTP with it)."""

    gateway_url: str = ""
    agents: dict[str, Agent] = field(default_factory=dict)
    envs: list[dict[str, str]] = field(default_factory=list)

    def point_at(self, url: str) -> None:
        """The hub's address, known once it listens (the pool may have warmed already)."""
        self.gateway_url = url
        for env in self.envs:
            env["GATEWAY_URL"] = url

    async def _start(self, spec: ContainerSpec) -> ContainerHandle:
        await asyncio.sleep(self.engine_s)
        self.started.append(spec)
        agent = load_example(spec.labels[LABEL_AGENT])
        env = {**spec.env, "GATEWAY_URL": self.gateway_url}
        self.envs.append(env)
        agent.env = env  # read when the agent first calls the hub
        server = agent.serve_in_thread()
        cid = f"fake-env{len(self.started)}"
        self.servers[cid], self.labels[cid] = server, dict(spec.labels)
        self.ports[cid], self.agents[cid] = server.server_port, agent
        return ContainerHandle(id=cid, name=spec.name, address="127.0.0.1", port=server.server_port)


def pooled_registry(tmp_path: Path, entry: str) -> Path:
    text = (REPO / "agents.yaml").read_text()
    marker = "    resources: {memory: 64m, cpus: 0.5, pids: 32}\n"
    assert text.count(marker) == 1
    path = tmp_path / "agents.yaml"
    path.write_text(text.replace(marker, marker + entry))
    return path


@pytest.fixture
async def pool_hub(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> Callable[..., Awaitable[tuple[Any, PoolBackend]]]:
    from gateway.http.app import create_app

    async def make(
        entry: str, backend_cls: type[PoolBackend] = PoolBackend, **backend_kw: Any
    ) -> tuple[Any, PoolBackend]:
        backend = backend_cls(**backend_kw)
        settings = make_settings(tmp_path, agents_file=pooled_registry(tmp_path, entry))
        client = await aiohttp_client(create_app(settings, backend=backend))
        if isinstance(backend, EnvPoolBackend):
            backend.point_at(str(client.make_url("")).rstrip("/"))
        return client, backend

    return make


async def _task(client: Any, key: str, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/tasks/{task_id}?wait=10", headers=auth(key))
    body: dict[str, Any] = await resp.json()
    return body


async def test_warm_dispatch_through_the_hub_runs_in_the_pooled_container(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    client, backend = await pool_hub("    pool: {min: 1, max: 2}\n")
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    await filled(hub.pools, "echo", 1)
    pooled = next(iter(hub.pools.owned()))
    # (That the token in the body works is checked on the real engine.)
    body = {"agent": "echo", "input": {"n": 1}}
    resp = await client.post("/v1/tasks", json=body, headers=auth(keys["user"]))
    task = await _task(client, keys["user"], (await resp.json())["task_id"])
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "warm" and task["container"]["id"] == pooled
    await until(lambda: pooled in backend.removed)  # one task, then removed
    await filled(hub.pools, "echo", 1)  # and refilled
    status = await (await client.get("/v1/status", headers=auth(keys["operator"]))).json()
    assert status["pools"]["echo"]["hits"] == 1
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'gateway_pool_dispatches_total{agent="echo",result="hit"} 1.0' in metrics


async def test_a_warm_task_is_created_running_in_the_write_that_accepts_it(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    """Placed at submission: the task is written once, already running in its container
    (pending, dispatched and running in one write), and ends with its result: the only
    other write. Its quota slot was reserved for it and is free again after."""
    client, _backend = await pool_hub("    pool: {min: 1, max: 2}\n")
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    await filled(hub.pools, "echo", 1)
    pooled = next(iter(hub.pools.owned()))
    writes: list[tuple[str, Any]] = []

    def spy(name: str, real: Any) -> Any:
        def write(task_id: str, *args: Any, **kw: Any) -> Any:
            writes.append((name, args[0] if args else sorted(kw)))
            return real(task_id, *args, **kw)

        return write

    for name in ("transition", "update_task"):
        setattr(hub.store, name, spy(name, getattr(hub.store, name)))
    resp = await client.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {"n": 1}}, headers=auth(keys["user"])
    )
    task = await resp.json()
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "warm" and task["container"]["id"] == pooled
    history = task["history"]
    assert [e["state"] for e in history] == ["pending", "dispatched", "running", "succeeded"]
    assert len({e["at"] for e in history[:3]}) == 1, history
    assert writes == [("transition", "succeeded")]
    assert hub.router.quotas.to_json()["running"] == {}
    assert hub.router._slots._value == hub.router.options.max_running


async def test_a_warm_container_dead_when_its_task_is_accepted_is_replaced(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    """The probe made while the task is written finds the container dead: the task goes
    back to pending ("placed again") and runs elsewhere; the dead one is removed."""
    client, backend = await pool_hub("    pool: {min: 1, max: 1}\n")
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    # Every assigned container is probed, and no idle round finds the dead one first.
    hub.pools.options = dataclasses.replace(hub.pools.options, fresh_s=0.0, check_s=3600.0)
    await filled(hub.pools, "echo", 1)
    dead = next(iter(hub.pools.owned()))
    kill(backend, dead)
    resp = await client.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {"n": 2}}, headers=auth(keys["user"])
    )
    task = await resp.json()
    assert task["state"] == "succeeded", task
    assert task["container"]["id"] != dead
    details = [e.get("detail") or "" for e in task["history"]]
    assert any("did not answer: placed again" in d for d in details), task["history"]
    assert [e["state"] for e in task["history"]][:5] == [
        "pending", "dispatched", "running", "pending", "dispatched"
    ]  # fmt: skip
    assert dead in backend.removed


async def test_a_placement_whose_task_was_not_created_gives_back_its_container_and_slot(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    """Two submissions with one Idempotency-Key racing past the key check: both place a
    warm container, one task is written, and the other placement is undone."""
    client, backend = await pool_hub("    pool: {min: 2, max: 2}\n")
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    await filled(hub.pools, "echo", 2)
    pooled = set(hub.pools.owned())

    async def unseen(*_args: Any, **_kw: Any) -> None:
        return None  # both get past the key check before either writes

    hub.store.task_for_key = unseen
    headers = {**auth(keys["user"]), "Idempotency-Key": "race-1"}
    body = {"agent": "echo", "input": {"n": 3}}
    first, second = await asyncio.gather(
        client.post("/v1/tasks", json=body, headers=headers),
        client.post("/v1/tasks", json=body, headers=headers),
    )
    ids = {(await first.json())["task_id"], (await second.json())["task_id"]}
    assert len(ids) == 1
    task = await _task(client, keys["user"], ids.pop())
    assert task["state"] == "succeeded", task
    await until(lambda: pooled <= set(backend.removed))  # the task's, and the undone one
    assert hub.router.quotas.to_json()["running"] == {}
    assert hub.router._slots._value == hub.router.options.max_running
    assert hub.instances.for_task(task["task_id"]) is None


async def test_a_task_the_pool_has_no_container_for_starts_cold_counted_once(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    client, _backend = await pool_hub("    pool: {min: 1, max: 1}\n")
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    await filled(hub.pools, "echo", 1)
    slow = {"agent": "echo", "input": {"progress_steps": 4, "progress_delay_s": 0.25}}
    first = await client.post("/v1/tasks", json=slow, headers=auth(keys["user"]))
    second = await client.post("/v1/tasks", json=slow, headers=auth(keys["user"]))
    tasks = [
        await _task(client, keys["user"], (await r.json())["task_id"]) for r in (first, second)
    ]
    assert [t["state"] for t in tasks] == ["succeeded", "succeeded"], tasks
    assert [t["dispatch"] for t in tasks] == ["warm", "cold"]
    assert hub.pools.hits == {"echo": 1} and hub.pools.misses == {"echo": 1}


async def test_a_grant_no_warm_container_can_take_starts_cold(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    # calc's grant (tightened by the policy for developers) is wider than this pool's echo.
    client, _backend = await pool_hub("    pool: {min: 1, max: 1}\n")
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    await filled(hub.pools, "echo", 1)
    resp = await client.post(
        "/v1/tasks",
        json={"agent": "calc", "input": {"expression": "1+2"}},
        headers=auth(keys["developer"]),
    )
    task = await _task(client, keys["developer"], (await resp.json())["task_id"])
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "cold"


async def test_tasks_cancelled_right_after_submission_leave_no_container(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    """The engine goes on creating a container after its caller is cancelled: each cancel
    must still end with no container and no orphan alert."""
    client, backend = await pool_hub("", engine_s=1.0)
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    for _ in range(5):
        resp = await client.post(
            "/v1/tasks", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
        )
        task_id = (await resp.json())["task_id"]
        await asyncio.sleep(0.02)  # its container's start is under way (it takes 1 s)
        resp = await client.delete(f"/v1/tasks/{task_id}", headers=auth(keys["user"]))
        assert resp.status == 200, await resp.text()
    await asyncio.sleep(1.2)  # what the engine made meanwhile is removed
    assert len(backend.started) == 5  # they were all created: the case that leaked
    assert backend.servers == {}, backend.servers
    assert hub.alerts.active.get("orphan_container") is None
    assert await hub.monitor.orphan_scan() == []


# -- a warm container that died or stopped answering while it waited


def kill(backend: PoolBackend, cid: str) -> None:
    """Stop the agent in ``cid`` as ``docker kill`` would; the container stays listed."""
    server = backend.servers[cid]
    server.shutdown()
    server.server_close()

    def dead(handler: Any) -> None:
        # A keep-alive connection opened before the kill dies with the process too.
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    server.RequestHandlerClass.do_GET = server.RequestHandlerClass.do_POST = dead


@pytest.fixture
async def probing() -> Any:
    """The hub's own readiness probe (real HTTP to the in-process agents)."""
    from gateway.agents.http import AgentClient

    client = AgentClient()
    yield client.wait_ready
    await client.close()


async def test_a_dead_warm_container_is_never_handed_out(probing: Any) -> None:
    backend = PoolBackend()
    pools = make_pools(backend, {"echo": echo()}, wait_ready=probing)
    await filled(pools, "echo", 2)
    first, second = list(pools._warm)
    kill(backend, first)  # the one a pick takes first (the oldest)
    warm = await pools.acquire(echo(), sandbox(), owner="a", reuse=False, timeout_s=30)
    assert warm is not None and warm.handle.id == second  # the live one
    assert first in backend.removed and first not in pools.owned()
    kill(backend, second)  # assigned already: not probed again
    await pools.release(warm, owner=None)
    # Every warm container dead: a cold start (a miss), and the dead ones removed.
    await filled(pools, "echo", 2)
    for cid in pools.owned():
        kill(backend, cid)
    assert await pools.acquire(echo(), sandbox(), owner="a", reuse=False, timeout_s=30) is None
    assert pools.owned() == set() and pools.misses == {"echo": 1}
    assert pools.hits == {"echo": 1}
    await pools.stop()


async def test_an_idle_container_that_dies_or_turns_unhealthy_is_replaced(probing: Any) -> None:
    backend = PoolBackend()
    sick: set[str] = set()

    async def wait_ready(handle: ContainerHandle, timeout_s: float) -> None:
        if handle.id in sick:  # answers, but not 200
            raise AgentUnavailable(f"agent {handle.name} not ready (HTTP 503)")
        await probing(handle, timeout_s)

    pools = make_pools(backend, {"echo": echo()}, wait_ready=wait_ready, check_s=0.05)
    await filled(pools, "echo", 2)
    dead, unhealthy = list(pools._warm)
    kill(backend, dead)
    sick.add(unhealthy)
    # Noticed by the periodic probe, before any task asks: removed and replaced.
    deadline = time.monotonic() + 5
    while not {dead, unhealthy} <= set(backend.removed) or pools._sizes("echo")["idle"] < 2:
        assert time.monotonic() < deadline, (backend.removed, pools.to_json())
        await pools.tick()
        await asyncio.sleep(0.02)
    assert pools.owned().isdisjoint({dead, unhealthy})
    assert len(backend.started) == 4
    warm = await pools.acquire(echo(), sandbox(), owner="a", reuse=False, timeout_s=30)
    assert warm is not None and warm.handle.id not in (dead, unhealthy)
    await pools.stop()


async def test_a_live_idle_container_is_probed_but_kept() -> None:
    backend = PoolBackend()
    probes: list[str] = []

    async def counting(handle: ContainerHandle, _timeout: float) -> None:
        probes.append(handle.id)

    pools = make_pools(backend, {"echo": echo()}, wait_ready=counting, check_s=0.05)
    await filled(pools, "echo", 2)
    warmed = set(pools.owned())
    probes.clear()
    for _ in range(10):
        await pools.tick()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    assert set(probes) == warmed and len(probes) >= 4  # re-probed every check_s...
    assert len(probes) <= 2 * 10  # ...at most once a round each, not in a loop
    assert pools.owned() == warmed and backend.removed == []
    await pools.stop()


async def test_a_removal_the_engine_refuses_is_retried_and_not_an_orphan(probing: Any) -> None:
    backend = PoolBackend()
    engine_up = True
    original = backend.remove

    async def remove(cid: str) -> None:
        if not engine_up:
            raise AgentUnavailable("Docker engine unreachable")
        await original(cid)

    backend.remove = remove  # type: ignore[method-assign]
    pools = make_pools(
        backend, {"echo": echo()}, wait_ready=probing, check_s=0.05, can_refill=lambda: engine_up
    )
    await filled(pools, "echo", 2)
    warmed = set(pools.owned())
    # The engine goes away and takes its containers with it.
    engine_up = False
    for cid in warmed:
        kill(backend, cid)
    starts = len(backend.started)
    for _ in range(15):
        await pools.tick()
        await asyncio.sleep(0.02)
    assert pools._sizes("echo")["idle"] == 0  # noticed dead...
    assert pools.owned() == warmed  # ...but still the pool's to remove (no orphan alert)
    assert len(backend.started) == starts  # and no refill while degraded
    engine_up = True
    await filled(pools, "echo", 2)
    await until(lambda: warmed <= set(backend.removed))
    assert pools.owned().isdisjoint(warmed)
    await pools.stop()


# -- the agent SDK: a warm container's identity comes with its task


async def test_the_sdk_calls_the_hub_with_the_svid_its_task_brought(
    pool_hub: Any, keys: dict[str, str]
) -> None:
    client, backend = await pool_hub("    pool: {min: 1, max: 1}\n", backend_cls=EnvPoolBackend)
    from gateway.http.appkeys import HUB

    hub = client.app[HUB]
    await filled(hub.pools, "echo", 1)
    cid = next(iter(hub.pools.owned()))
    agent = backend.agents[cid]
    # Before its task: no token anywhere in the container, and the hub refuses its calls.
    assert "AGENT_SVID" not in agent.env and "AGENT_TASK_ID" not in agent.env
    assert agent.client.token == ""
    with pytest.raises(HubError) as refused:
        await asyncio.to_thread(agent.client.progress, "any-task", "too early")
    assert refused.value.status == 401
    body = {"agent": "echo", "input": {"progress_steps": 2, "progress_delay_s": 0.01}}
    resp = await client.post("/v1/tasks", json=body, headers=auth(keys["user"]))
    task_id = (await resp.json())["task_id"]
    task = await _task(client, keys["user"], task_id)
    assert task["state"] == "succeeded", task
    assert task["dispatch"] == "warm" and task["container"]["id"] == cid
    # The progress reports (calls to the hub the hub verifies) went in with the token the
    # task brought: minted for this task's instance, the only token the container ever had.
    events = await client.get(f"/v1/tasks/{task_id}/events", headers=auth(keys["user"]))
    assert b"step 2 of 2" in await events.read()
    token = agent.client.token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["gw_instance"] == (await hub.store.get_task(task_id)).instance_id
    assert claims["sub"].endswith("/echo")


def test_the_sdk_takes_the_svid_from_the_task_body_and_keeps_it_for_messages() -> None:
    agent = Agent("echo", env={"GATEWAY_URL": "http://hub.invalid"})
    assert agent.client.token == ""  # a warm container: nothing in its environment
    first = agent.context({"task_id": "t1", "svid": "h.first.s"})
    assert first.client is not None and first.client.token == "h.first.s"
    assert agent.client.token == "h.first.s"
    assert first.task_id == "t1"
    # A message (no body token) is answered as the task's instance.
    assert agent.context({}).client is first.client
    # The same token handed over again keeps the client; a new task's token replaces it.
    assert agent.context({"task_id": "t1", "svid": "h.first.s"}).client is first.client
    second = agent.context({"task_id": "t2", "svid": "h.second.s"})
    assert second.client is not None and second.client.token == "h.second.s"
    # Junk in place of a token changes nothing.
    for junk in ("", 42, None, ["x"]):
        assert agent.context({"task_id": "t2", "svid": junk}).client is second.client
