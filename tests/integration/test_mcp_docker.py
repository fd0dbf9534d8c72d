"""The hub as an MCP server on the real engine: the SDK's client calls echo in a container."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.http.app import HUB
from tests.integration.test_dispatch_docker import until_no_containers
from tests.mcpclient import REVISIONS, mcp_client


@pytest.mark.parametrize("revision", REVISIONS)
async def test_echo_through_mcp_in_a_container(
    docker_hub: Any, keys: dict[str, str], docker_api: Any, revision: str, monkeypatch: Any
) -> None:
    url = f"http://127.0.0.1:{docker_hub.server.port}/mcp"
    hub = docker_hub.app[HUB]
    async with mcp_client(url, keys["user"], revision, monkeypatch) as client:
        result = await client.call_tool("echo.debug.echo", {"via": "mcp", "n": 3})
    assert not result.is_error, result
    assert result.structured_content == {"echo": {"via": "mcp", "n": 3}, "agent": "echo"}
    task = await hub.router.get(result.meta["io.agent-gateway/task_id"])  # type: ignore[index]
    assert task.state == "succeeded" and task.container_id
    # The same path as POST /v1/tasks: a dispatch decision, and the container goes.
    assert (await hub.decisions.get(task.decision_id))["kind"] == "dispatch"
    await until_no_containers(docker_api, docker_hub)
