"""MCP servers behind the hub, on the real engine: the SDK's client calls the example
``files`` server (stdio, in a hardened container) and the example ``counter`` server
(Streamable HTTP: progress while a call runs, and a cancel that reaches it) through ``/mcp``.

The registry is the shipped one plus test entries of the same image: ``files-debug``
(debug tools that crash, hang or write garbage), ``files-strict`` (the debug image with an
allow-list that omits them: refused), ``files-badschema`` (a tool with an invalid schema:
refused) and ``files-once`` (``isolation: per_call``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gateway.containers.backend import LABEL_AGENT, LABEL_HUB
from gateway.http.app import HUB
from tests.conftest import auth, make_settings
from tests.integration.conftest import RUN_ID, cleanup_hub, registry_file
from tests.mcpclient import mcp_client

EXTRA = """
  - name: files-debug
    protocol: mcp
    transport: stdio
    image: {image}
    tools: [read, list, add, crash, hang, garbage, wrong_output]
    timeout_s: 4
    env: {{FILES_MCP_DEBUG: "1"}}
    resources: {{memory: 128m, cpus: 0.5, pids: 64}}

  - name: files-strict
    protocol: mcp
    transport: stdio
    image: {image}
    tools: [read, list, add]
    env: {{FILES_MCP_DEBUG: "1"}}

  - name: files-badschema
    protocol: mcp
    transport: stdio
    image: {image}
    tools: [read, list, add, broken]
    env: {{FILES_MCP_BAD_SCHEMA: "1"}}

  - name: files-once
    protocol: mcp
    transport: stdio
    image: {image}
    tools: [read, list, add]
    isolation: per_call
"""
REVISION = "2025-11-25"


@pytest.fixture
async def mcp_hub(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    aiohttp_client: Any,
) -> AsyncIterator[Any]:
    """A hub on the real engine with the test MCP entries; asserts that stopping it left
    no container (the pool stops its servers), and removes anything left regardless."""
    from gateway.http.app import create_app

    path = registry_file(tmp_path, agent_images)
    path.write_text(path.read_text() + EXTRA.format(image=agent_images["files"]))
    networks = [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]
    settings = make_settings(
        tmp_path,
        agents_file=path,
        network=networks[0],
        egress_network=networks[1],
        hub_id=f"test-{RUN_ID}-{secrets.token_hex(3)}",
    )
    app = create_app(settings)
    left: list[str] = []
    try:
        client = await aiohttp_client(app)
        yield client
        await client.close()
        left = [
            c["Names"][0]
            for c in docker_api.containers(
                all=True, filters={"label": [f"{LABEL_HUB}={settings.hub_id}"]}
            )
        ]
    finally:
        cleanup_hub(docker_api, settings.hub_id, networks)
    assert not left, f"the hub left containers behind: {left}"


def _url(client: Any) -> str:
    return f"http://127.0.0.1:{client.server.port}/mcp"


def _containers(api: docker.APIClient, client: Any, agent: str) -> list[str]:
    hub_id = client.app[HUB].settings.hub_id
    found = api.containers(filters={"label": [f"{LABEL_HUB}={hub_id}", f"{LABEL_AGENT}={agent}"]})
    return sorted(c["Id"] for c in found)


async def test_list_call_deny_and_schema_violation(
    mcp_hub: Any, keys: dict[str, str], docker_api: Any, monkeypatch: Any
) -> None:
    hub = mcp_hub.app[HUB]
    async with mcp_client(_url(mcp_hub), keys["user"], REVISION, monkeypatch) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        # Allow-listed tools of the servers that passed the checks; refused servers absent.
        assert {n for n in listed if n.startswith("files.")} == {
            "files.read",
            "files.list",
            "files.add",
        }
        assert not [n for n in listed if n.startswith(("files-strict.", "files-badschema."))]
        assert listed["files.read"].input_schema["required"] == ["path"]
        assert listed["files.read"].output_schema is not None
        assert "echo.debug.echo" in listed  # agent tools are still there

        added = await client.call_tool("files.add", {"a": 2, "b": 3.5})
        assert not added.is_error, added
        assert added.structured_content == {"sum": 5.5}
        decision_id = added.meta["io.agent-gateway/decision_id"]  # type: ignore[index]
        record = await hub.decisions.get(decision_id)
        assert record["kind"] == "tool"
        assert record["input"]["tool"] == {
            "name": "files.add",
            "server_tool": "add",
            "arguments": {"a": 2, "b": 3.5},
        }
        assert record["result"]["sandbox"]["read_only_root"] is True

        public = await client.call_tool("files.read", {"path": "public/readme.txt"})
        assert not public.is_error, public
        assert public.structured_content["content"].startswith("Hello")  # type: ignore[index]

        # The argument-level rule: a user may read only under public/.
        denied = await client.call_tool("files.read", {"path": "private/secret.txt"})
        assert denied.is_error
        error = denied.structured_content["error"]  # type: ignore[index]
        assert error["code"] == "policy_denied"
        assert any("must start with one of" in r for r in error["details"]["reasons"])
        denied_record = await hub.decisions.get(error["decision_id"])
        assert denied_record["allow"] is False
        assert denied_record["input"]["tool"]["arguments"] == {"path": "private/secret.txt"}

        bad = await client.call_tool("files.add", {"a": "two", "b": 1, "c": 0})
        assert bad.is_error
        error = bad.structured_content["error"]  # type: ignore[index]
        assert error["code"] == "schema_violation"
        assert {d["pointer"] for d in error["details"]} == {"/a", "/c"}

    # A developer may read anything, in a server process of its own.
    async with mcp_client(_url(mcp_hub), keys["developer"], REVISION, monkeypatch) as client:
        secret = await client.call_tool("files.read", {"path": "private/secret.txt"})
        assert not secret.is_error, secret
    assert len(_containers(docker_api, mcp_hub, "files")) == 2  # per_owner: one per caller

    # The native API does not run an MCP server as a task.
    resp = await mcp_hub.post(
        "/v1/tasks", json={"agent": "files", "input": {}}, headers=auth(keys["user"])
    )
    assert resp.status == 400
    assert "call its tools at /mcp" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        ("crash", "the server exited"),
        ("garbage", "not JSON-RPC"),
        ("hang", "did not answer tools/call within 4 s"),
        ("wrong_output", "does not match its outputSchema"),
    ],
)
async def test_a_failing_server_fails_the_call_and_is_replaced(
    mcp_hub: Any,
    keys: dict[str, str],
    docker_api: Any,
    monkeypatch: Any,
    tool: str,
    expected: str,
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    async with mcp_client(_url(mcp_hub), keys["developer"], REVISION, monkeypatch) as client:
        first = await client.call_tool("files-debug.add", {"a": 1, "b": 1})
        assert first.structured_content == {"sum": 2}
        before = _containers(docker_api, mcp_hub, "files-debug")
        assert len(before) == 1
        failed = await client.call_tool(f"files-debug.{tool}", {})
        assert failed.is_error
        message = failed.structured_content["error"]["message"]  # type: ignore[index]
        assert expected in message
        # The next call gets a working server.
        again = await client.call_tool("files-debug.add", {"a": 2, "b": 2})
        assert not again.is_error, again
        assert again.structured_content == {"sum": 4}
        after = _containers(docker_api, mcp_hub, "files-debug")
    assert len(after) == 1
    if tool != "wrong_output":  # a server that answered (wrongly) stays
        assert after != before
    if tool == "crash":
        # The server's stderr reached the hub's log, tagged with its agent.
        assert any(
            getattr(r, "agent", None) == "files-debug"
            and "crashing on request" in getattr(r, "stderr", "")
            for r in caplog.records
        )


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        ("files-strict", "lists tools outside its allow-list"),
        ("files-badschema", "tool 'broken' has an invalid inputSchema"),
    ],
)
async def test_a_server_outside_its_entry_is_refused(
    mcp_hub: Any, keys: dict[str, str], docker_api: Any, monkeypatch: Any, agent: str, expected: str
) -> None:
    async with mcp_client(_url(mcp_hub), keys["developer"], REVISION, monkeypatch) as client:
        result = await client.call_tool(f"{agent}.add", {"a": 1, "b": 1})
    assert result.is_error
    assert expected in result.structured_content["error"]["message"]  # type: ignore[index]
    assert _containers(docker_api, mcp_hub, agent) == []


async def test_per_call_isolation_and_idle_stop(
    mcp_hub: Any, keys: dict[str, str], docker_api: Any, monkeypatch: Any
) -> None:
    hub = mcp_hub.app[HUB]
    async with mcp_client(_url(mcp_hub), keys["user"], REVISION, monkeypatch) as client:
        once = await client.call_tool("files-once.add", {"a": 1, "b": 2})
        assert once.structured_content == {"sum": 3}
        assert _containers(docker_api, mcp_hub, "files-once") == []
        await client.call_tool("files.add", {"a": 1, "b": 2})
    assert len(_containers(docker_api, mcp_hub, "files")) == 1
    for server in list(hub.tools.pool._servers.values()):
        server.idle_s = 0.01
    await asyncio.sleep(0.05)
    assert await hub.tools.pool.reap() >= 1
    assert _containers(docker_api, mcp_hub, "files") == []


def _logs(api: docker.APIClient, container_id: str) -> str:
    return api.logs(container_id, stdout=True, stderr=True).decode(errors="replace")


@pytest.mark.parametrize("revision", ["2025-11-25", "2026-07-28"])
async def test_an_http_server_reports_progress_and_is_cancelled(
    mcp_hub: Any, keys: dict[str, str], docker_api: Any, monkeypatch: Any, revision: str
) -> None:
    # The example counter (Streamable HTTP, transport: http) in its container on the
    # internal network; the hub reaches it by address, the SDK's client reaches the hub.
    hub = mcp_hub.app[HUB]
    steps: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        steps.append((value, total, message))

    async with mcp_client(_url(mcp_hub), keys["user"], revision, monkeypatch) as client:
        listed = {t.name for t in (await client.list_tools()).tools}
        assert {"counter.count", "counter.upper"} <= listed
        upper = await client.call_tool("counter.upper", {"text": "over http"})
        assert not upper.is_error, upper
        assert upper.structured_content == {"text": "OVER HTTP"}
        record = await hub.decisions.get(upper.meta["io.agent-gateway/decision_id"])  # type: ignore[index]
        assert record["kind"] == "tool" and record["input"]["tool"]["server_tool"] == "upper"
        (server,) = _containers(docker_api, mcp_hub, "counter")

        counted = await client.call_tool(
            "counter.count", {"to": 3, "delay_ms": 50}, progress_callback=progress
        )
        assert counted.structured_content == {"counted": 3}, counted
        assert steps == [(float(n), 3.0, f"counted {n} of 3") for n in (1, 2, 3)]

        steps.clear()
        call = asyncio.ensure_future(
            client.call_tool(
                "counter.count", {"to": 1000, "delay_ms": 20}, progress_callback=progress
            )
        )
        for _ in range(500):
            if len(steps) >= 2:
                break
            await asyncio.sleep(0.02)
        assert len(steps) >= 2, "no progress from the running call"
        call.cancel()  # 2025-11-25: notifications/cancelled; 2026-07-28: the POST is aborted
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(250):  # the server hears of it from the hub (its log says where)
            if "count cancelled at" in _logs(docker_api, server):
                break
            await asyncio.sleep(0.02)
        assert "count cancelled at" in _logs(docker_api, server)

        # The same container serves the next call.
        again = await client.call_tool("counter.upper", {"text": "again"})
        assert again.structured_content == {"text": "AGAIN"}, again
        assert _containers(docker_api, mcp_hub, "counter") == [server]
