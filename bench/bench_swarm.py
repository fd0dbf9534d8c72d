"""Cold start on Swarm against the local engine: the same hardened echo spec, both backends.

Each run starts one container through ``DockerBackend.start`` (create + start, address read
back) and one service through ``SwarmBackend.start`` (create service, scheduler, task
running, address read back), then removes each (the Swarm removal waits for the task's
container to go). Runs alternate so drift hits both. The agent's own start (Python import,
first ``/health``) is the same process in both and is not in these figures: the host cannot
reach an internal overlay (``gateway.containers.swarm``). The engine is made a one-node swarm
for the run if it is not one, and left again afterwards.

Usage: python bench/bench_swarm.py [runs]   (needs Docker, root for iptables, the echo image)
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker

from bench._stats import report, summary
from gateway.bundle.registry import AgentSpec
from gateway.containers import firewall
from gateway.containers.docker import DockerBackend
from gateway.containers.guardrails import build_spec
from gateway.containers.swarm import SwarmBackend

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
AGENT = AgentSpec(
    name="echo",
    image="agent-gateway/echo:dev",
    capabilities=("debug.echo",),
    input_schema="a.json",
    output_schema="b.json",
    port=8000,
)
SANDBOX = {
    "network": "internal",
    "memory_bytes": 64 * 2**20,
    "cpus": 0.5,
    "pids": 32,
    "read_only_root": True,
    "mounts": [],
    "swarm_acceptable": ["no-new-privileges", "icc", "memory-swap"],
}


def spec(networks: dict[str, str], hub_id: str) -> object:
    return build_spec(
        agent=AGENT,
        sandbox=SANDBOX,
        task_id=secrets.token_hex(18),
        hub_id=hub_id,
        networks=networks,
        timeout_s=60,
        ttl_grace_s=10,
        gateway_url="http://10.254.0.2:8080",
    )


async def timed(
    backend: DockerBackend, networks: dict[str, str], hub_id: str
) -> tuple[float, float]:
    s = spec(networks, hub_id)
    t0 = time.perf_counter()
    handle = await backend.start(s)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    await backend.remove(handle.id)
    return t1 - t0, time.perf_counter() - t1


async def main() -> None:
    api = docker.from_env(version="auto").api
    made_swarm = (api.info().get("Swarm") or {}).get("LocalNodeState") == "inactive"
    if made_swarm:
        api.init_swarm(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
    hub_id = "bench-" + secrets.token_hex(3)
    dnets = {"internal": f"{hub_id}-int", "egress": f"{hub_id}-egr"}
    snets = {"internal": f"{hub_id}-swarm-int", "egress": f"{hub_id}-swarm-egr"}
    local = DockerBackend(
        internal_network=dnets["internal"], egress_network=dnets["egress"], agent_port=8080
    )
    swarm = SwarmBackend(
        internal_network=snets["internal"],
        egress_network=snets["egress"],
        agent_port=8080,
        agent_address="10.254.0.2",
    )
    figures: dict[str, list[float]] = {k: [] for k in ("local", "local_rm", "swarm", "swarm_rm")}
    facts: dict[str, str] = {}
    try:
        facts = await local.prepare()
        await swarm.ping()
        await swarm.prepare()
        await timed(local, dnets, hub_id)  # warm up: image config cache, clients
        await timed(swarm, snets, hub_id)
        for _ in range(RUNS):
            for name, backend, nets in (("local", local, dnets), ("swarm", swarm, snets)):
                start_s, rm_s = await timed(backend, nets, hub_id)
                figures[name].append(start_s * 1000)
                figures[name + "_rm"].append(rm_s * 1000)
    finally:
        await local.close()
        await swarm.close()
        bridges = [b for b in (facts.get("bridges") or "").split(",") if b]
        firewall.remove(bridges, ipt=firewall.Iptables())
        for name in [*dnets.values(), *snets.values()]:
            for net in api.networks(names=[name]):
                if net["Name"] == name:
                    for _ in range(50):
                        try:
                            api.remove_network(net["Id"])
                            break
                        except docker.errors.APIError:
                            await asyncio.sleep(0.2)
        if made_swarm:
            api.leave_swarm(force=True)
    local_s, swarm_s = summary(figures["local"]), summary(figures["swarm"])
    report(
        "cold start, echo: Swarm service vs local container (ms)",
        {
            "local_start_ms": local_s,
            "swarm_start_ms": swarm_s,
            "local_remove_ms": summary(figures["local_rm"]),
            "swarm_remove_ms": summary(figures["swarm_rm"]),
            "ratio_start": swarm_s["median"] / local_s["median"],
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
