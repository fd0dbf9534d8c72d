"""Cold dispatch: submit-to-result for ``echo`` through the hub vs a plain ``docker run``.

Both sides start a fresh container from the same image and do the same work (echo one JSON
input). The hub side is ``POST /v1/tasks?wait=`` against a real hub on loopback (schema,
policy, decision log, hardened container, readiness probe, HTTP hand-off, result stored);
the baseline is ``docker run --rm -i <image> python3 /app/agent.py --once`` with the input on
stdin. Runs alternate so drift on the machine hits both equally. Target: ratio <= 1.2.

Usage: python bench/bench_dispatch.py [runs]   (needs Docker and the example images)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench._stats import report, summary
from bench.bench_pool import hub_on_loopback
from gateway.settings import REPO_ROOT

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
IMAGE = "agent-gateway/echo:dev"
INPUT = {"msg": "hello", "n": [1, 2, 3]}


async def docker_run_once(remove: bool = True) -> float:
    """One ``docker run`` of the agent's --once mode; without ``remove`` the container's
    removal happens after the clock stops, as it does for the hub."""
    name = "bench-run-" + secrets.token_hex(4)
    flags = ["--rm"] if remove else ["--name", name]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", *flags, "-i", IMAGE, "python3", "/app/agent.py", "--once",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate(json.dumps(INPUT).encode())
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or json.loads(out)["echo"] != INPUT:
        raise SystemExit(f"docker run failed: {err.decode()}")
    if not remove:
        rm = await asyncio.create_subprocess_exec(
            "docker", "rm", "-f", name, stdout=asyncio.subprocess.DEVNULL
        )
        await rm.wait()
    return elapsed


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with hub_on_loopback(Path(tmp), REPO_ROOT / "agents.yaml") as (_, settings, key):
            url = f"http://127.0.0.1:{settings.port}/v1/tasks?wait=60"
            hub_s: list[float] = []
            run_s: list[float] = []
            keep_s: list[float] = []
            phases: dict[str, list[float]] = {"to_dispatched": [], "to_running": [], "to_done": []}
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:

                async def hub_once() -> float:
                    start = time.perf_counter()
                    async with http.post(url, json={"agent": "echo", "input": INPUT}) as resp:
                        body = await resp.json()
                    elapsed = time.perf_counter() - start
                    if body.get("state") != "succeeded":
                        raise SystemExit(f"hub task failed: {body}")
                    stamps = {h["state"]: h["at"] for h in body["history"]}
                    t0 = _ts(stamps["pending"])
                    phases["to_dispatched"].append(_ts(stamps["dispatched"]) - t0)
                    phases["to_running"].append(_ts(stamps["running"]) - t0)
                    phases["to_done"].append(_ts(stamps["succeeded"]) - t0)
                    return elapsed

                await hub_once()  # warm up: image cache, connection pool
                await docker_run_once()
                for _ in range(RUNS):
                    hub_s.append(await hub_once())
                    run_s.append(await docker_run_once())
                    keep_s.append(await docker_run_once(remove=False))
                    await asyncio.sleep(0.3)  # let the hub's container removal finish
    hub = summary([s * 1000 for s in hub_s])
    base = summary([s * 1000 for s in run_s])
    keep = summary([s * 1000 for s in keep_s])
    report(
        "cold dispatch, echo (ms)",
        {
            "hub_submit_to_result_ms": hub,
            "docker_run_rm_ms": base,
            "docker_run_no_rm_ms": keep,
            "ratio_vs_run_rm": hub["median"] / base["median"],
            "ratio_vs_run_no_rm": hub["median"] / keep["median"],
            "hub_phases_median_ms": {
                k: sorted(v)[len(v) // 2] * 1000 for k, v in phases.items() if v
            },
        },
    )


def _ts(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    asyncio.run(main())
