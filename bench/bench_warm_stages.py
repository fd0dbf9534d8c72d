"""Where a warm dispatch's time goes, stage by stage (issue 13): the clock from the client's
``POST /v1/tasks?wait=`` to each step the hub takes for it.

A real hub runs in this process (``Settings``, ``create_app``, ``web.AppRunner`` on loopback,
a SQLite file, the shipped ``policies/``, ``schemas/`` and ``agents.yaml``) with a pool on
``echo`` (min 3) and real containers on the local engine. The client is this process's
aiohttp session. The real methods are wrapped on the hub's instances (package code
untouched); each wrapper notes ``perf_counter`` on entry (``>``) and exit (``<``):

| mark | what is wrapped |
|---|---|
| submit | ``TaskRouter.submit`` (decide, place, create) |
| acquire | ``WarmPools.acquire`` (pick, tighten if needed) |
| check | ``WarmPools.check`` (the probe, unless one answered within ``fresh_s``) |
| create | ``Store.create_task`` (the durable write: task, history, both decision records) |
| place | ``TaskRouter._place`` (only when the runner places the task itself) |
| move | ``TaskRouter._move`` (a state change the runner writes) |
| handover | ``TaskRouter._hand_over`` (``POST /task`` to the container, to its answer) |
| finish | ``TaskRouter._finish`` (the durable write of the result) |

Printed: the median of each mark over the runs, in ms after the client's clock started, and
the median total (client clock start to the parsed answer); then the event loop thread's CPU
(``time.thread_time``, the client's share included) between the stage marks, and all of it
per task: the same stages take far more CPU in ``one`` than in ``reuse`` on this machine
(see the README). ``reuse`` runs the same owner's tasks back to back in a kept container;
``one`` (default isolation) waits before each task until the pool is full again and nothing
is warming or being removed.

Usage: python bench/bench_warm_stages.py [runs] [one|reuse]   (needs Docker and the images)
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.bench_pool import ECHO, INPUT, hub_on_loopback, until
from gateway.settings import REPO_ROOT

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
MODE = sys.argv[2] if len(sys.argv) > 2 else "one"
POOL_MIN = 3


def wrap(obj: Any, method: str, mark: Callable[[str], None], name: str) -> None:
    """Replace ``obj.method`` (on this instance only) by one that marks entry and exit."""
    real = getattr(obj, method)

    async def marked(*args: Any, **kw: Any) -> Any:
        mark(name + ">")
        try:
            return await real(*args, **kw)
        finally:
            mark(name + "<")

    setattr(obj, method, marked)


STAGES = ("start", "submit>", "create>", "create<", "handover>", "handover<", "finish<", "end")
Row = tuple[float, float, dict[str, float], dict[str, float]]


async def measure(hub: Any, key: str, url: str) -> list[Row]:
    """RUNS warm dispatches through ``hub``, each as (clock start, clock end, marks, the
    event loop thread's CPU clock at the marks)."""
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, time.perf_counter())  # the first of each per task
        cpu.setdefault(name, time.thread_time())

    pools, router = hub.pools, hub.router
    for obj, method, name in (
        (router, "submit", "submit"),
        (router, "_place", "place"),
        (router, "_move", "move"),
        (router, "_hand_over", "handover"),
        (router, "_finish", "finish"),
        (hub.store, "create_task", "create"),
        (pools, "acquire", "acquire"),
        (pools, "check", "check"),
    ):
        wrap(obj, method, mark, name)
    rows: list[Row] = []

    def quiet() -> bool:
        return (
            pools._sizes("echo")["idle"] >= POOL_MIN
            and not pools._sizes("echo")["warming"]
            and not pools._jobs
            and not router._removals
        )

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:

        async def one() -> None:
            marks.clear()
            cpu.clear()
            cpu["start"] = time.thread_time()
            start = time.perf_counter()
            async with http.post(url, json={"agent": "echo", "input": INPUT}) as resp:
                body = await resp.json()
            end = time.perf_counter()
            cpu["end"] = time.thread_time()
            if body.get("state") != "succeeded" or body.get("dispatch") != "warm":
                raise SystemExit(f"not a warm success: {body}")
            rows.append((start, end, dict(marks), dict(cpu)))

        await until(quiet)
        for _ in range(3):  # connections, caches; in reuse mode the kept container
            await one()
        rows.clear()
        for _ in range(RUNS):
            if MODE == "one":
                await until(quiet)
            await one()
    return rows


async def main() -> None:
    if MODE not in ("one", "reuse"):
        raise SystemExit("mode: one | reuse")
    with tempfile.TemporaryDirectory() as tmp:
        agents = Path(tmp) / "agents.yaml"
        extra = f"    pool: {{min: {POOL_MIN}, max: 6}}\n" + (
            "    reuse: true\n" if MODE == "reuse" else ""
        )
        agents.write_text((REPO_ROOT / "agents.yaml").read_text().replace(ECHO, ECHO + extra))
        async with hub_on_loopback(Path(tmp), agents) as (hub, settings, key):
            url = f"http://127.0.0.1:{settings.port}/v1/tasks?wait=60"
            rows = await measure(hub, key, url)

    names = {name for _, _, m, _ in rows for name in m}
    medians = {
        name: statistics.median([(m[name] - start) * 1000 for start, _, m, _ in rows if name in m])
        for name in names
    }
    print(f"== warm dispatch stages, echo, {MODE}, {len(rows)} tasks (ms after the POST)")
    for name, at in sorted(medians.items(), key=lambda item: item[1]):
        seen = sum(1 for _, _, m, _ in rows if name in m)
        note = f"   (in {seen} of {len(rows)})" if seen < len(rows) else ""
        print(f"  {name:10s} {at:7.3f}{note}")
    total = statistics.median([(end - start) * 1000 for start, end, _, _ in rows])
    print(f"  total      {total:7.3f}")
    print("== event loop thread CPU between marks (median ms)")
    for a, b in itertools.pairwise(STAGES):
        spans = [(c[b] - c[a]) * 1000 for _, _, _, c in rows if a in c and b in c]
        if spans:
            print(f"  {a:>10s} .. {b:10s} {statistics.median(spans):7.3f}")
    whole = statistics.median([(c["end"] - c["start"]) * 1000 for _, _, _, c in rows])
    print(f"  {'per task':24s} {whole:7.3f}")


if __name__ == "__main__":
    asyncio.run(main())
