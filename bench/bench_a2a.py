"""What the A2A door costs, measured in one run against one hub (fake containers).

1. ``SendMessage`` (blocking) to echo through ``POST /a2a/echo`` against ``POST /v1/tasks?wait``
   for the same agent, one request at a time, the same aiohttp session, interleaved; ms per
   call, median and p99, and the ratio. Both run the whole governed path (API policy, schemas,
   dispatch policy, decision records, a "container": the echo agent served in-process on
   loopback, as tests/conftest.py's fake backend does), so the difference is the protocol layer.
2. Progress latency: from the agent's ``ctx.progress`` call (its ``sent_at``) to the client's
   read of the event, on ``GET /v1/tasks/{id}/events`` and on an A2A ``SendStreamingMessage``.
3. Streams held open at once on one running task (``GET /v1/tasks/{id}/events``), with the
   Python memory (tracemalloc) and RSS growth per stream; client and hub share the process,
   so both ends are counted (an upper bound for the hub).

    .venv/bin/python bench/bench_a2a.py [N]
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import socket
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import ClientSession, ClientTimeout, web

from bench._stats import report, summary
from gateway.http.app import create_app
from gateway.identity.apikeys import KeyStore
from gateway.settings import REPO_ROOT, Settings
from tests.unit.test_a2a import EnvBackend

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
STREAMS = 200


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rpc(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def _send(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "message": {
            "messageId": str(uuid.uuid4()),
            "role": "ROLE_USER",
            "parts": [{"data": data}],
        }
    }


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        key = KeyStore.load(state / "keys.json").create("bench", ["user"])
        port = _port()
        # No rate limits: the bench measures the path, not limits.yaml's refusals.
        limits = state / "limits.yaml"
        limits.write_text(
            "version: 1\nsubjects:\n  default: {requests: null, submit: null, pending: null,"
            " running: 64}\n"
        )
        settings = Settings(
            state_dir=state / "state",
            keys_file=state / "keys.json",
            agents_file=REPO_ROOT / "agents.yaml",
            schemas_dir=REPO_ROOT / "schemas",
            policies_dir=REPO_ROOT / "policies",
            limits_file=limits,
            port=port,
            log_api_reads=False,
        )
        app = create_app(settings, backend=EnvBackend())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}", "A2A-Version": "1.0"}
        try:
            async with ClientSession(headers=headers, timeout=ClientTimeout(total=60)) as http:
                figures = await _compare(http, base)
                figures.update(await _progress(http, base))
                figures.update(await _streams(http, base))
        finally:
            await runner.cleanup()
    report("a2a", figures)


async def _compare(http: ClientSession, base: str) -> dict[str, Any]:
    async def a2a(i: int) -> None:
        async with http.post(f"{base}/a2a/echo", json=_rpc("SendMessage", _send({"i": i}))) as r:
            doc = await r.json()
            assert doc["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED", doc

    async def native(i: int) -> None:
        body = {"agent": "echo", "input": {"i": i}}
        async with http.post(f"{base}/v1/tasks?wait=30", json=body) as r:
            doc = await r.json()
            assert doc.get("state") == "succeeded", doc

    for i in range(20):  # warm-up
        await a2a(i)
        await native(i)
    times: dict[str, list[float]] = {"a2a": [], "v1": []}
    for i in range(N):
        for name, call in (("a2a", a2a), ("v1", native)):
            start = time.perf_counter()
            await call(i)
            times[name].append((time.perf_counter() - start) * 1000)
    a, v = summary(times["a2a"]), summary(times["v1"])
    return {
        "send_message_ms": a,
        "v1_tasks_wait_ms": v,
        "ratio_median": a["median"] / v["median"],
        "ratio_p99": a["p99"] / v["p99"],
    }


async def _progress(http: ClientSession, base: str) -> dict[str, Any]:
    native: list[float] = []
    for _ in range(10):
        body = {"agent": "echo", "input": {"progress_steps": 10, "progress_delay_s": 0.02}}
        async with http.post(f"{base}/v1/tasks", json=body) as r:
            task_id = (await r.json())["task_id"]
        async with http.get(f"{base}/v1/tasks/{task_id}/events") as stream:
            async for raw in stream.content:
                line = raw.decode()
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    if "sent_at" in data:
                        native.append((time.time() - data["sent_at"]) * 1000)
                    if data.get("final"):
                        break
    a2a: list[float] = []
    for _ in range(10):
        params = _send({"progress_steps": 10, "progress_delay_s": 0.02})
        async with http.post(f"{base}/a2a/echo", json=_rpc("SendStreamingMessage", params)) as s:
            async for raw in s.content:
                line = raw.decode()
                if not line.startswith("data: "):
                    continue
                result = json.loads(line[6:])["result"]
                meta = result.get("statusUpdate", {}).get("metadata", {}).get("progress", {})
                if "sent_at" in meta:
                    a2a.append((time.time() - meta["sent_at"]) * 1000)
    return {"progress_native_ms": summary(native), "progress_a2a_ms": summary(a2a)}


async def _streams(http: ClientSession, base: str) -> dict[str, Any]:
    body = {"agent": "echo", "input": {"progress_steps": 20, "progress_delay_s": 1.0}}
    async with http.post(f"{base}/v1/tasks", json=body) as r:
        task_id = (await r.json())["task_id"]
    await asyncio.sleep(0.5)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rss_before = _rss_kib()
    opened = []
    for _ in range(STREAMS):
        resp = await http.get(f"{base}/v1/tasks/{task_id}/events")
        opened.append(resp)
    await asyncio.sleep(1.5)  # every stream has had an event
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    rss_after = _rss_kib()
    tracemalloc.stop()
    for resp in opened:
        resp.close()
    return {
        "streams_open": STREAMS,
        "python_kib_per_stream": (after - before) / 1024 / STREAMS,
        "rss_kib_per_stream": (rss_after - rss_before) / STREAMS,
    }


if __name__ == "__main__":
    asyncio.run(main())
