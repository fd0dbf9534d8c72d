"""Warm pools: warm and cold dispatch of ``echo`` through the hub, each beside a fair floor.

In one run, against a real hub on loopback (schema, policy, decision log, store) and the
local engine:

- warm: ``POST /v1/tasks?wait=`` with ``pool: {min: 4}`` on echo, one task per container
  (submit to result), each run starting with the pool refilled and the last task's container
  removed;
- direct floor: the same task POSTed by the same HTTP client straight to an echo container
  that already runs (one of the pool's, taken out of it, kept for every call), starting from
  the same state;
- fresh direct floor: the same POST to a pool container that never ran a task, on a new
  connection, removed after the call (so the pool refills): what the hub's hand-off in this
  mode meets, a container's first request, on both sides;
- reused: ``reuse: true`` (the shipped policy allows it for echo), the same owner's tasks
  back to back in one kept container, alternating with the direct call, nothing in between;
- cold: the same submission with the pool switched off;
- engine floor for cold: create, start, ``/health`` until it answers and ``POST /task``
  through the hub's own persistent Docker client and agent client, clock stopped at the
  result (removal after the clock, as for the hub);
- sustained: warm dispatches per second with 4 callers in parallel and min = 4, and the
  share that ran warm.

Targets (issue 13): warm p50 at most 5 ms over the direct call; cold p50 at most 1.1x the
engine floor.

Usage: python bench/bench_pool.py [runs] [--client inline|process]
(needs Docker and the example images)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import docker
from aiohttp import web

from bench._client import ProcessClient
from bench._stats import report, summary
from gateway.containers.pools import fingerprint, warm_sandbox
from gateway.http.app import HUB, create_app
from gateway.identity.apikeys import KeyStore
from gateway.settings import REPO_ROOT, Settings

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20
# ``--client process``: the measured POSTs (hub and direct alike) come from a client in a
# process of its own (bench/_client.py), as a real caller's would; default: this process.
CLIENT = sys.argv[sys.argv.index("--client") + 1] if "--client" in sys.argv else "inline"
INPUT = {"msg": "hello", "n": [1, 2, 3]}
POOL_MIN = 4
ECHO = "    resources: {memory: 64m, cpus: 0.5, pids: 32}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(check, within_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"pool did not settle ({getattr(check, '__name__', '')})")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def hub_on_loopback(tmp: Path, agents: Path) -> AsyncIterator[tuple[Any, Settings, str]]:
    """A real hub on loopback (``agents``, the shipped policies and schemas, its state under
    ``tmp``, the local engine) and a user's API key; its runner and networks go at the end."""
    keys = KeyStore.load(tmp / "keys.json")
    key = keys.create("bench", ["user"])
    hub_id = "bench-" + secrets.token_hex(3)
    settings = Settings(
        port=free_port(),
        state_dir=tmp / "state",
        keys_file=tmp / "keys.json",
        agents_file=agents,
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
        hub_id=hub_id,
        network=f"{hub_id}-int",
        egress_network=f"{hub_id}-egr",
    )
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        yield app[HUB], settings, key
    finally:
        await runner.cleanup()
        api = docker.from_env(version="auto").api
        for name in (settings.network, settings.egress_network):
            for net in api.networks(names=[name]):
                api.remove_network(net["Id"])


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        agents = Path(tmp) / "agents.yaml"
        text = (REPO_ROOT / "agents.yaml").read_text()
        agents.write_text(text.replace(ECHO, ECHO + f"    pool: {{min: {POOL_MIN}, max: 8}}\n"))
        async with hub_on_loopback(Path(tmp), agents) as (hub, settings, key):
            pools = hub.pools
            url = f"http://127.0.0.1:{settings.port}/v1/tasks?wait=60"
            figures: dict[str, list[float]] = {
                k: [] for k in ("warm", "direct", "fresh", "cold", "floor", "reused", "direct_b2b")
            }
            direct = None
            outside = ProcessClient() if CLIENT == "process" else None
            if outside is not None:
                await outside.start()
            try:
                async with aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {key}"}
                ) as http:
                    auth = {"Authorization": f"Bearer {key}"}

                    async def timed_post(to: str, body: Any) -> tuple[float, Any]:
                        """One measured POST: seconds to the parsed answer, and the answer."""
                        if outside is not None:
                            elapsed, _, out = await outside.post(to, body, auth)
                            return elapsed, out
                        start = time.perf_counter()
                        async with http.post(to, json=body) as resp:
                            out = await resp.json()
                        return time.perf_counter() - start, out

                    async def via_hub(expect: str | None) -> float:
                        elapsed, body = await timed_post(url, {"agent": "echo", "input": INPUT})
                        if body.get("state") != "succeeded" or expect not in (
                            None,
                            body["dispatch"],
                        ):
                            raise SystemExit(f"hub task not {expect}: {body}")
                        return elapsed

                    agent = hub.config.registry.agents["echo"]

                    def full() -> bool:
                        return pools._sizes("echo")["idle"] >= POOL_MIN

                    def quiet() -> bool:
                        # Full with containers of the current entry, nothing warming, draining
                        # or being removed: no engine work under the measured call.
                        current = fingerprint(hub.config.registry.agents["echo"])
                        idle = [w for w in pools._warm.values() if w.state == "idle"]
                        return (
                            full()
                            and all(w.fingerprint == current for w in idle)
                            and not pools._sizes("echo")["warming"]
                            and not pools._jobs
                            and not hub.router._removals
                        )

                    sandbox = warm_sandbox(agent)
                    # The floor's container is one of the pool's, taken out of it: built by the
                    # same guardrails, probed, and known to the pool (so no scan removes it).
                    await until(full)
                    direct = await pools.acquire(
                        agent, sandbox, owner="bench-direct", reuse=False, timeout_s=30
                    )
                    assert direct is not None
                    direct_url = direct.handle.base_url + "/task"

                    async def straight() -> float:
                        body = {"task_id": str(uuid.uuid4()), "input": INPUT}
                        elapsed, out = await timed_post(direct_url, body)
                        assert out["output"]["echo"] == INPUT
                        return elapsed

                    async def straight_to_fresh() -> float:
                        # Taken before the clock: a direct caller knows its address already.
                        fresh = await pools.acquire(
                            agent, sandbox, owner="bench-fresh", reuse=False, timeout_s=30
                        )
                        assert fresh is not None
                        try:
                            body = {"task_id": str(uuid.uuid4()), "input": INPUT}
                            elapsed, out = await timed_post(fresh.handle.base_url + "/task", body)
                        finally:
                            await pools.release(fresh, owner=None)
                        assert out["output"]["echo"] == INPUT
                        return elapsed

                    async def engine_floor() -> float:
                        cold = hub.router._spec(agent, sandbox, str(uuid.uuid4()), 30)
                        start = time.perf_counter()
                        handle = await hub.backend.start(cold)
                        await hub.agents.wait_ready(handle, 20)
                        out = await hub.agents.post(
                            handle, "/task", {"task_id": "floor", "input": INPUT}, 30
                        )
                        elapsed = time.perf_counter() - start
                        assert out["output"]["echo"] == INPUT
                        await hub.backend.remove(handle.id)
                        return elapsed

                    await until(full)
                    await via_hub("warm")  # warm-up: connections, caches
                    await straight()
                    for _ in range(RUNS):
                        # Each side starts alike: the pool full, the last container removed.
                        await until(quiet)
                        figures["warm"].append(await via_hub("warm"))
                        await until(quiet)
                        figures["direct"].append(await straight())
                        await until(quiet)
                        figures["fresh"].append(await straight_to_fresh())
                    hub.router.pool = None  # the same hub, no pool: every dispatch cold
                    await via_hub("cold")
                    for _ in range(RUNS):
                        figures["cold"].append(await via_hub("cold"))
                        figures["floor"].append(await engine_floor())
                        await asyncio.sleep(0.3)  # let the removals finish
                    hub.router.pool = pools

                    await until(full)
                    n, callers = 0, 4
                    warm_runs = 0
                    deadline = time.perf_counter() + 10

                    async def caller() -> None:
                        nonlocal n, warm_runs
                        while time.perf_counter() < deadline:
                            async with http.post(url, json={"agent": "echo", "input": INPUT}) as r:
                                body = await r.json()
                            assert body["state"] == "succeeded", body
                            n += 1
                            warm_runs += body["dispatch"] == "warm"

                    began = time.perf_counter()
                    await asyncio.gather(*(caller() for _ in range(callers)))
                    sustained = n / (time.perf_counter() - began)

                    # Reuse (agents.yaml ``reuse: true``, which the shipped policy allows for echo):
                    # the same owner's tasks back to back in one container, alternating with the
                    # direct call, neither side waiting in between.
                    agents.write_text(
                        text.replace(
                            ECHO, ECHO + f"    pool: {{min: {POOL_MIN}, max: 8}}\n    reuse: true\n"
                        )
                    )
                    await hub.reload()
                    agent = hub.config.registry.agents["echo"]
                    assert agent.reuse
                    await until(quiet)
                    for _ in range(3):  # the first takes a container (warm or cold), then kept
                        await via_hub(None)
                        await straight()
                    for _ in range(RUNS):
                        figures["reused"].append(await via_hub("warm"))
                        figures["direct_b2b"].append(await straight())
            finally:
                if direct is not None:
                    await pools.release(direct, owner=None)
                if outside is not None:
                    await outside.close()
    ms = {k: summary([s * 1000 for s in v]) for k, v in figures.items()}
    report(
        f"warm pools, echo (ms), client {CLIENT}",
        {
            "warm_submit_to_result_ms": ms["warm"],
            "direct_post_to_running_ms": ms["direct"],
            "warm_overhead_p50_ms": ms["warm"]["median"] - ms["direct"]["median"],
            "direct_to_fresh_container_ms": ms["fresh"],
            "warm_overhead_vs_fresh_p50_ms": ms["warm"]["median"] - ms["fresh"]["median"],
            "reused_submit_to_result_ms": ms["reused"],
            "direct_back_to_back_ms": ms["direct_b2b"],
            "reused_overhead_p50_ms": ms["reused"]["median"] - ms["direct_b2b"]["median"],
            "cold_submit_to_result_ms": ms["cold"],
            "engine_floor_ms": ms["floor"],
            "cold_ratio_vs_floor": ms["cold"]["median"] / ms["floor"]["median"],
            "sustained": {
                "dispatches_per_s": sustained,
                "callers": callers,
                "min": POOL_MIN,
                "tasks": n,
                "warm_share": warm_runs / max(1, n),
            },
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
