"""What the MCP door costs, measured in one run against one hub (fake containers).

1. ``tools/call`` on echo through ``POST /mcp`` (stateless 2026-07-28 envelope, one POST per
   call) against ``POST /v1/tasks?wait`` for the same agent: the same aiohttp session, one
   call at a time, interleaved; ms per call (median, p99) and the ratio. Both run the whole
   governed path (API policy, schemas, dispatch policy, decision records, the echo agent
   served in-process on loopback as tests/conftest.py's fake backend does).
2. ``tools/list`` with 50 tools (a registry of 50 echo agents), each filtered through the
   dispatch policy, as a user and as a developer (the counts they see are printed).
3. An already running stdio MCP server (the example ``files``, ``agent-gateway/files:dev``,
   in a real container): ``files.add`` through the hub (``POST /mcp``, stateless envelope;
   input schema, tools policy, decision record, the pool's attach socket) against the same
   ``add`` made straight to the same image over stdio with the SDK's client (``docker run
   -i`` with the same guardrails, what an MCP host does without the hub); interleaved, one
   call at a time, p50, p99 and the ratio. Skipped (said so) without an engine or image.

    .venv/bin/python bench/bench_mcp.py [N]
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml
from aiohttp import ClientSession, web

from bench._stats import report, summary
from gateway.http.app import create_app
from gateway.identity.apikeys import KeyStore
from gateway.settings import REPO_ROOT, Settings
from tests.conftest import FakeBackend

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
TOOLS = 50
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _registry(root: Path) -> Path:
    """agents.yaml with the shipped agents plus echo copies, TOOLS tools in all."""
    # The agents only: the MCP servers behind the hub are section 3's (real containers).
    doc = yaml.safe_load((REPO_ROOT / "agents.yaml").read_text())
    doc["agents"] = [a for a in doc["agents"] if a.get("protocol", "gateway") != "mcp"]
    shipped = sum(len(a["capabilities"]) for a in doc["agents"])
    doc["agents"] += [
        {
            "name": f"echo{i}",
            "image": "agent-gateway/echo:dev",
            "capabilities": [f"debug.echo{i}"],
            "input_schema": "agents/echo.input.json",
            "output_schema": "agents/echo.output.json",
            "port": 8000,
        }
        for i in range(TOOLS - shipped)
    ]
    path = root / "agents.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _modern(method: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if method == "tools/call":
        headers["Mcp-Name"] = params["name"]
    return body, headers


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = KeyStore.load(root / "keys.json")
        user = keys.create("user", ["user"])
        dev = keys.create("developer", ["user", "developer"])
        port = _port()
        settings = Settings(
            state_dir=root / "state",
            keys_file=root / "keys.json",
            agents_file=_registry(root),
            schemas_dir=REPO_ROOT / "schemas",
            policies_dir=REPO_ROOT / "policies",
            port=port,
        )
        runner = web.AppRunner(create_app(settings, backend=FakeBackend()), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {user}", "Accept": "application/json, text/event-stream"}
        mcp_ms: list[float] = []
        v1_ms: list[float] = []
        try:
            async with ClientSession() as http:
                call, call_headers = _modern(
                    "tools/call", {"name": "echo.debug.echo", "arguments": {"n": 1}}
                )

                async def via_mcp() -> None:
                    async with http.post(
                        f"{base}/mcp", json=call, headers={**auth, **call_headers}
                    ) as r:
                        body = await r.json()
                        assert body["result"]["structuredContent"]["echo"] == {"n": 1}, body

                async def via_v1() -> None:
                    task = {"agent": "echo", "input": {"n": 1}}
                    async with http.post(f"{base}/v1/tasks?wait=30", json=task, headers=auth) as r:
                        body = await r.json()
                        assert body["state"] == "succeeded", body

                for _ in range(10):  # warm up both paths
                    await via_mcp()
                    await via_v1()
                for _ in range(N):
                    for fn, out in ((via_mcp, mcp_ms), (via_v1, v1_ms)):
                        start = time.perf_counter()
                        await fn()
                        out.append((time.perf_counter() - start) * 1000)

                lists: dict[str, list[float]] = {}
                counts: dict[str, int] = {}
                listing, list_headers = _modern("tools/list", {})
                for name, key in (("user", user), ("developer", dev)):
                    headers = {**auth, "Authorization": f"Bearer {key}", **list_headers}
                    samples = lists[name] = []
                    for _ in range(N):
                        start = time.perf_counter()
                        async with http.post(f"{base}/mcp", json=listing, headers=headers) as r:
                            body = await r.json()
                        samples.append((time.perf_counter() - start) * 1000)
                    counts[name] = len(body["result"]["tools"])
        finally:
            await runner.cleanup()
    mcp_s, v1_s = summary(mcp_ms), summary(v1_ms)
    report(
        "mcp",
        {
            "tools/call echo via /mcp (ms)": mcp_s,
            "POST /v1/tasks?wait echo (ms)": v1_s,
            "ratio median": round(mcp_s["median"] / v1_s["median"], 3),
            "ratio p99": round(mcp_s["p99"] / v1_s["p99"], 3),
            f"tools/list of {TOOLS}, user sees {counts['user']} (ms)": summary(lists["user"]),
            f"tools/list of {TOOLS}, developer sees {counts['developer']} (ms)": summary(
                lists["developer"]
            ),
        },
    )
    print(json.dumps({"n": N}))


FILES_IMAGE = "agent-gateway/files:dev"


async def stdio_section(n: int) -> None:
    """Section 3: a running stdio MCP server through the hub and straight over stdio."""
    import secrets

    import docker
    import mcp_types
    from mcp.client.session import ClientSession as SdkSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from tests.conftest import make_settings
    from tests.integration.conftest import cleanup_hub

    try:
        api = docker.from_env(version="auto").api
        api.inspect_image(FILES_IMAGE)
    except Exception as e:
        print(f"== mcp stdio server: skipped ({type(e).__name__}: {e})")
        return
    tag = secrets.token_hex(3)
    networks = [f"agw-bench-{tag}-int", f"agw-bench-{tag}-egr"]
    hub_id = f"bench-{tag}"
    through: list[float] = []
    straight: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        user = KeyStore.load(root / "keys.json").create("user", ["user"])
        port = _port()
        settings = make_settings(
            root, network=networks[0], egress_network=networks[1], hub_id=hub_id, port=port
        )
        runner = web.AppRunner(create_app(settings), access_log=None)
        params = StdioServerParameters(
            command="docker",
            args=[
                "run", "-i", "--rm", "--read-only", "--tmpfs", "/tmp:rw,noexec,nosuid,size=64m",
                "--user", "65534:65534", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges:true", "--network", "none",
                "--memory", "128m", "--cpus", "0.5", "--pids-limit", "64",
                "--label", f"io.agent-gateway.hub={hub_id}", FILES_IMAGE,
            ],
        )  # fmt: skip
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            base = f"http://127.0.0.1:{port}"
            headers = {
                "Authorization": f"Bearer {user}",
                "Accept": "application/json, text/event-stream",
            }
            call, call_headers = _modern(
                "tools/call", {"name": "files.add", "arguments": {"a": 1, "b": 2}}
            )
            async with (
                ClientSession() as http,
                stdio_client(params, errlog=sys.stderr) as (read, write),
                SdkSession(read, write) as direct,
            ):
                await direct.initialize()

                async def via_hub() -> None:
                    async with http.post(
                        f"{base}/mcp", json=call, headers={**headers, **call_headers}
                    ) as r:
                        body = await r.json()
                    assert body["result"]["structuredContent"] == {"sum": 3}, body

                async def via_stdio() -> None:
                    result = await direct.call_tool("add", {"a": 1, "b": 2})
                    assert isinstance(result, mcp_types.CallToolResult)
                    assert result.structured_content == {"sum": 3}, result

                for _ in range(10):  # the first call through the hub starts its server
                    await via_hub()
                    await via_stdio()
                for _ in range(n):
                    for fn, out in ((via_hub, through), (via_stdio, straight)):
                        start = time.perf_counter()
                        await fn()
                        out.append((time.perf_counter() - start) * 1000)
        finally:
            await runner.cleanup()
            cleanup_hub(api, hub_id, networks)
    hub_s, direct_s = summary(through), summary(straight)
    report(
        "mcp stdio server",
        {
            "files.add through the hub /mcp (ms)": hub_s,
            "add straight over stdio, docker run -i (ms)": direct_s,
            "ratio median": round(hub_s["median"] / direct_s["median"], 3),
            "ratio p99": round(hub_s["p99"] / direct_s["p99"], 3),
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
    asyncio.run(stdio_section(N))
