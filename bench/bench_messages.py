"""Agent-to-agent messages: hub-routed request/reply vs the same agents calling each other.

Two ``probe`` agents run as tasks of a real hub (HTTP API, JWT-SVID checked on every
message, envelope and payload schemas, the ``gateway.messages`` policy, a chained decision
record written to SQLite, then the hand-off to the target's ``POST /message``). One holds
and answers; the other, with the SDK's ``GatewayClient``, sends ``n`` pings from
``concurrency`` threads and measures each round trip. The direct baseline is the same
sender posting the same pings straight to the target's ``/message``. Routed and direct runs
alternate in one run.

For the direct baseline to be possible the agents run as host processes on loopback (the
``ProcessBackend`` below starts ``examples/agents/probe/agent.py`` with the environment a
container would get): inside the hub's internal network a direct connection is refused by
design (tests/integration/test_messages_docker.py). ``--docker`` instead runs the routed
side between real containers (no direct baseline there).

Also measured: token verification, cold (a token never seen: py-spiffe's full validation)
and cached (a token seen before), through the hub's own ``AgentIdentities``.

Usage: python bench/bench_messages.py [n] [--docker]    (targets: >= 3000 msg/s, <= 5 µs)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from bench._stats import report, summary
from gateway.containers.backend import LABEL_AGENT, ContainerHandle, ContainerSpec
from gateway.http.app import HUB, create_app
from gateway.identity.apikeys import KeyStore
from gateway.identity.service import AgentIdentities
from gateway.settings import REPO_ROOT, Settings

args = [a for a in sys.argv[1:] if not a.startswith("--")]
N = int(args[0]) if args else 6000
DOCKER = "--docker" in sys.argv
ROUNDS = 2
CONCURRENCY = (1, 16)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default), from /proc."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessBackend:
    """Runs each agent as a host process on loopback, with its container's environment."""

    def __init__(self) -> None:
        self.gateway_url = ""
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def ping(self) -> None:
        return None

    async def prepare(self) -> dict[str, str]:
        return {"internal_gateway": "127.0.0.1"}

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        port = free_port()
        script = REPO_ROOT / "examples" / "agents" / spec.labels[LABEL_AGENT] / "agent.py"
        env = {
            **spec.env,
            "AGENT_PORT": str(port),
            "GATEWAY_URL": self.gateway_url,
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": os.environ.get("PATH", ""),
        }
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env)
        self.procs[str(proc.pid)] = proc
        return ContainerHandle(id=str(proc.pid), name=spec.name, address="127.0.0.1", port=port)

    async def attach(self, container_id: str, port: int) -> ContainerHandle:
        raise NotImplementedError

    async def is_running(self, container_id: str) -> bool:
        proc = self.procs.get(container_id)
        return proc is not None and proc.returncode is None

    async def remove(self, container_id: str) -> None:
        proc = self.procs.pop(container_id, None)
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        return []

    async def close(self) -> None:
        for pid in list(self.procs):
            await self.remove(pid)


async def wait_running(app: web.Application, task_id: str) -> Any:
    hub = app[HUB]
    for _ in range(600):
        inst = hub.instances.for_task(task_id)
        if inst is not None and inst.handle is not None:
            return inst
        await asyncio.sleep(0.05)
    raise SystemExit(f"task {task_id} never ran")


async def measure_routing(tmp: Path) -> dict[str, Any]:
    keys = KeyStore.load(tmp / "keys.json")
    key = keys.create("bench", ["user", "developer", "operator"])
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    backend = None if DOCKER else ProcessBackend()
    tag = secrets.token_hex(3)
    settings = Settings(
        port=port,
        state_dir=tmp / "state",
        keys_file=tmp / "keys.json",
        hub_id="bench-" + tag,
        network=f"agw-bench-{tag}-int",
        egress_network=f"agw-bench-{tag}-egr",
    )
    app = create_app(settings, backend=backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hub = app[HUB]
    hosts = ["127.0.0.1"]
    if DOCKER:
        hosts.append(hub.facts["internal_gateway"])
    for host in hosts:
        await web.TCPSite(runner, host, port).start()
    if backend is not None:
        backend.gateway_url = f"http://127.0.0.1:{port}"
    figures: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as http:

            async def submit(input: dict[str, Any]) -> str:
                async with http.post("/v1/tasks", json={"agent": "probe", "input": input}) as r:
                    body = await r.json()
                    assert r.status == 202, body
                    return str(body["task_id"])

            target = await wait_running(app, await submit({"hold_s": 300}))
            direct_url = target.handle.base_url
            script: list[dict[str, Any]] = [
                {"op": "load", "to": "probe", "n": 300, "concurrency": 4},  # warm-up
                {"op": "load", "to": "probe", "n": 300, "concurrency": 4, "direct_url": direct_url},
            ]
            for _ in range(ROUNDS):
                for c in CONCURRENCY:
                    n = N if c > 1 else N // 4
                    script.append({"op": "load", "to": "probe", "n": n, "concurrency": c})
                    if not DOCKER:
                        script.append({**script[-1], "direct_url": direct_url})
            cpu_before = {"hub": cpu_seconds()}
            if backend is not None:
                cpu_before["target"] = cpu_seconds(int(target.handle.id))
            sender_id = await submit({"script": script})
            async with http.get(f"/v1/tasks/{sender_id}?wait=60") as r:
                sender = await r.json()
            while sender["state"] not in ("succeeded", "failed", "timed_out"):
                async with http.get(f"/v1/tasks/{sender_id}?wait=60") as r:
                    sender = await r.json()
            if sender["state"] != "succeeded":
                raise SystemExit(f"sender {sender['state']}: {sender.get('error')}")
            cpu = {"hub": cpu_seconds() - cpu_before["hub"]}
            if backend is not None:
                cpu["target"] = cpu_seconds(int(target.handle.id)) - cpu_before["target"]
            cpu["sender"] = sum(r["cpu_s"] for r in sender["result"]["results"])
            results = sender["result"]["results"][2:]
            for c in CONCURRENCY:
                for mode in ("routed", "direct"):
                    runs = [
                        r
                        for r, step in zip(results, script[2:], strict=True)
                        if step["concurrency"] == c and ("direct_url" in step) == (mode == "direct")
                    ]
                    if not runs:
                        continue
                    bad = [r for r in runs if not r["ok"]]
                    if bad:
                        raise SystemExit(f"{mode} c={c} failed: {bad[0]['errors']}")
                    best = max(runs, key=lambda r: r["per_s"])
                    figures[f"{mode}_c{c}"] = {
                        "msgs_per_s": best["per_s"],
                        "p50_ms": best["p50_ms"],
                        "p99_ms": best["p99_ms"],
                        "runs_per_s": [r["per_s"] for r in runs],
                    }
                if f"direct_c{c}" in figures:
                    r, d = figures[f"routed_c{c}"], figures[f"direct_c{c}"]
                    figures[f"ratio_c{c}"] = {
                        "throughput_routed_over_direct": round(
                            r["msgs_per_s"] / d["msgs_per_s"], 3
                        ),
                        "p50_routed_over_direct": round(r["p50_ms"] / d["p50_ms"], 2),
                    }
            sent = sum(r["n"] for r in sender["result"]["results"])
            routed = sum(
                r["n"]
                for r, step in zip(sender["result"]["results"], script, strict=True)
                if "direct_url" not in step
            )
            figures["cpu_ms_per_message"] = {
                "hub_per_routed": round(cpu["hub"] / routed * 1000, 3),
                **{
                    f"{k}_per_sent": round(v / sent * 1000, 3) for k, v in cpu.items() if k != "hub"
                },
            }
            decisions, _ = await hub.decisions.list(kind="message", limit=1)
            figures["message_decisions_logged"] = decisions[0]["seq"] if decisions else 0
            async with http.delete(f"/v1/tasks/{target.task_id}"):
                pass
    finally:
        await runner.cleanup()
        if DOCKER:
            import docker

            from tests.integration.conftest import cleanup_hub

            cleanup_hub(
                docker.from_env(version="auto").api,
                settings.hub_id,
                [settings.network, settings.egress_network],
            )
    return figures


def measure_verification(tmp: Path) -> dict[str, Any]:
    live: set[str] = set()
    ids = AgentIdentities.create(
        tmp / "verify",
        trust_domain="agent-gateway.local",
        audience="agent-gateway",
        ttl_s=300,
        is_active=live.__contains__,
    )
    tokens = []
    for i in range(2000):
        live.add(f"i{i}")
        tokens.append(ids.mint_env("probe", f"i{i}")[1]["AGENT_SVID"])
    cold = []
    for token in tokens:
        start = time.perf_counter_ns()
        ids.verify(token)
        cold.append((time.perf_counter_ns() - start) / 1000)
    cached = []
    for _ in range(50):
        for token in tokens[:2000]:
            start = time.perf_counter_ns()
            ids.verify(token)
            cached.append((time.perf_counter_ns() - start) / 1000)
    return {"verify_cold_us": summary(cold), "verify_cached_us": summary(cached)}


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure_verification(Path(tmp))
        figures.update(await measure_routing(Path(tmp)))
    where = "real containers" if DOCKER else "agents as host processes on loopback"
    report(f"agent-to-agent request/reply through the hub ({where}, n={N})", figures)


if __name__ == "__main__":
    asyncio.run(main())
