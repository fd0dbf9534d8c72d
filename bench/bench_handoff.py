"""The hand-off client: ``AgentWire.post`` against aiohttp's ``ClientSession``, asyncio and uvloop.

Every message the hub routes ends in one ``POST /message`` to an agent (issue 15). The hub
uses a hand-written keep-alive client, ``gateway.agents.wire.AgentWire``; this bench asks
whether it still earns its keep against aiohttp's client, on both event loops. Clients:

- ``wire``: ``AgentWire.post(handle, "/message", body, timeout_s)``, as the message router
  calls it (JSON-encoded, the reply decoded);
- ``aiohttp``: one shared ``ClientSession`` (``TCPConnector(limit=256)``, as the hub's own),
  ``session.post(url, json=body)``, ``await resp.read()``, ``json.loads``: the least a caller
  of aiohttp does;
- ``agentclient``: ``gateway.agents.http.AgentClient.post``, what the hub hands tasks over
  and probes containers with: aiohttp's client until issue 13 moved it onto AgentWire too
  (messages had moved first), so it should now cost what ``wire`` costs.

The same body (what the hub delivers for a ``ping``) to the same target: a tiny aiohttp
server in a subprocess of its own (on uvloop when installed, so the target is not what
limits the clients) answering ``POST /message`` with a small JSON reply. Each (client, loop)
pair runs in a fresh subprocess, so loops and connection pools never mix; every round starts
each pair once, the order rotated round by round; ``ROUNDS`` rounds (>= 3), medians over
rounds. In every subprocess: a warm-up, then ``N // 4`` requests one at a time and ``N`` with
16 in flight, connections opened before the clock starts.

Client CPU per request is ``time.process_time()`` of the client's process over the measured
requests divided by their number: nothing else runs in that process. On a busy 2-core
machine the CPU figures are the trustworthy ones; requests/s and latency move with
whatever else runs (the target shares the cores).

Usage: python bench/bench_handoff.py [n] [--rounds R]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from bench._stats import percentile, report
from gateway.agents.http import AgentClient
from gateway.agents.wire import AgentWire
from gateway.containers.backend import ContainerHandle

args = [a for a in sys.argv[1:] if a.isdigit()]
N = int(args[0]) if args else 8000
ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
CLIENTS = ("wire", "aiohttp", "agentclient")
LOOPS = ("asyncio", "uvloop")
CONCURRENCY = (1, 16)
TIMEOUT_S = 30.0
WARMUP = 300
# What the hub hands an agent for a ping (gateway.routers.messages._delivery).
BODY: dict[str, Any] = {
    "message_id": "6f1d2c0e9b8a4d7f8e2a1b3c4d5e6f70",
    "type": "request",
    "kind": "ping",
    "payload": {"quiet": True},
    "from": {
        "spiffe_id": "spiffe://agent-gateway.local/agent/probe/instance/1f2e3d4c",
        "agent": "probe",
        "task_id": "0c9b8a7f-6e5d-4c3b-2a19-08f7e6d5c4b3",
    },
}
REPLY = {"reply": {"echo": {"quiet": True}, "agent": "probe", "task_id": None}}


def loop_factory(name: str) -> Any:
    """The event loop factory for ``name`` (None: asyncio's default loop)."""
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the target: a subprocess answering POST /message


async def serve_target() -> None:
    """Child: answer ``POST /message`` with ``REPLY``; print the port; stop when stdin closes."""
    reply = json.dumps(REPLY).encode()

    async def message(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/json")

    app = web.Application()
    app.router.add_post("/message", message)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    await runner.cleanup()


# -- a client variant: one subprocess per (client, loop) and round


def make_post(client: str, handle: ContainerHandle) -> tuple[Any, Any]:
    """``post()`` for ``client`` and the coroutine function that closes it."""
    if client == "wire":
        wire = AgentWire()

        async def post_wire() -> Any:
            return await wire.post(handle, "/message", BODY, TIMEOUT_S)

        return post_wire, wire.close
    if client == "agentclient":
        agents = AgentClient()

        async def post_agentclient() -> Any:
            return await agents.post(handle, "/message", BODY, TIMEOUT_S)

        return post_agentclient, agents.close
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=2),
    )
    url = handle.base_url + "/message"

    async def post_aiohttp() -> Any:
        async with session.post(url, json=BODY) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return json.loads(raw)

    return post_aiohttp, session.close


async def measure(post: Any, n: int, c: int) -> dict[str, float]:
    """``n`` calls of ``post()`` from ``c`` workers: client CPU per call, calls/s, latency."""
    latencies: list[float] = []
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            start = time.perf_counter()
            reply = await post()
            latencies.append(time.perf_counter() - start)
            if not isinstance(reply, dict) or "reply" not in reply:
                raise RuntimeError(f"unexpected reply {reply!r}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "n": len(latencies),
        "cpu_us": cpu / len(latencies) * 1e6,
        "per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


async def run_client(conf: dict[str, Any]) -> dict[str, Any]:
    """Child: warm up, then the measured requests at each concurrency; figures as JSON."""
    handle = ContainerHandle(id="target", name="target", address="127.0.0.1", port=conf["port"])
    post, close = make_post(conf["client"], handle)
    out: dict[str, Any] = {}
    try:
        for c in CONCURRENCY:
            # Opens the c connections (and warms the code) before the clock starts.
            for _ in range(WARMUP // c + 1):
                await asyncio.gather(*(post() for _ in range(c)))
            out[f"c{c}"] = await measure(post, conf["n"] if c > 1 else conf["n"] // 4, c)
    finally:
        await close()
    return out


def client_child(conf: dict[str, Any]) -> None:
    """Entry point of ``--client CONF``: print the figures as one JSON line."""
    with asyncio.Runner(loop_factory=loop_factory(conf["loop"])) as runner:
        figures = runner.run(run_client(conf))
    print(json.dumps(figures), flush=True)


# -- the parent


def start_target() -> tuple[subprocess.Popen[bytes], int]:
    """The target server subprocess and its port."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--target"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("the target did not start")
    return proc, int(json.loads(line)["port"])


def run_variant(client: str, loop: str, port: int) -> dict[str, Any]:
    """One (client, loop) in a fresh subprocess: its figures."""
    conf = {"client": client, "loop": loop, "port": port, "n": N}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(conf)],
        capture_output=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"{client}/{loop} failed: {done.stderr.decode()[-2000:]}")
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds per variant and concurrency, then the wire/aiohttp ratios."""
    figures: dict[str, Any] = {}
    med: dict[tuple[str, str, int], dict[str, float]] = {}
    for (client, loop), rounds in runs.items():
        for c in CONCURRENCY:
            got = [r[f"c{c}"] for r in rounds]
            m = {
                k: round(statistics.median(g[k] for g in got), 3)
                for k in ("cpu_us", "per_s", "p50_ms", "p99_ms")
            }
            med[client, loop, c] = m
            figures[f"{client}_{loop}_c{c}"] = {
                **m,
                "cpu_us_rounds": [round(g["cpu_us"], 1) for g in got],
            }
    for loop in LOOPS:
        for c in CONCURRENCY:
            w = med["wire", loop, c]
            for other in ("aiohttp", "agentclient"):
                o = med[other, loop, c]
                figures[f"wire_over_{other}_{loop}_c{c}"] = {
                    "cpu": round(w["cpu_us"] / o["cpu_us"], 3),
                    "per_s": round(w["per_s"] / o["per_s"], 3),
                    "p50": round(w["p50_ms"] / o["p50_ms"], 3),
                }
    for client in CLIENTS:
        for c in CONCURRENCY:
            figures[f"uvloop_over_asyncio_{client}_c{c}_cpu"] = round(
                med[client, "uvloop", c]["cpu_us"] / med[client, "asyncio", c]["cpu_us"], 3
            )
    return figures


def main() -> None:
    try:
        import uvloop
    except ImportError:
        raise SystemExit("uvloop missing: .venv/bin/pip install 'uvloop==0.23.0'") from None
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    target, port = start_target()
    variants = [(c, loop) for loop in LOOPS for c in CLIENTS]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {v: [] for v in variants}
    target_cpu = cpu_seconds(target.pid)
    try:
        for r in range(ROUNDS):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for client, loop in order:
                runs[client, loop].append(run_variant(client, loop, port))
                print(f"  round {r + 1}: {client}/{loop} done", flush=True)
        target_cpu = cpu_seconds(target.pid) - target_cpu
    finally:
        assert target.stdin is not None
        target.stdin.close()
        target.wait(timeout=30)
    figures = summarize(runs)
    sent = sum(
        r[f"c{c}"]["n"] + WARMUP // c * c + c
        for rs in runs.values()
        for r in rs
        for c in CONCURRENCY
    )
    figures["target_cpu_us_per_request"] = round(target_cpu / sent * 1e6, 1)
    figures["versions"] = {
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "rounds": ROUNDS,
    }
    figures["load_before_after"] = (
        f"{load_before} / {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    report(f"hand-off client: AgentWire vs aiohttp ClientSession (n={N}, c=1 at n/4)", figures)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--target"]:
        factory = None
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_target())
    elif sys.argv[1:2] == ["--client"]:
        client_child(json.loads(sys.argv[2]))
    else:
        main()
