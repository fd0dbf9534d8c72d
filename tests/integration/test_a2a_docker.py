"""A2A end to end on the real engine: the SDK's client, the hub, the echo agent in a container."""

from __future__ import annotations

from typing import Any

import httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.types import GetTaskRequest, TaskState
from google.protobuf.json_format import MessageToDict

from gateway.http.app import HUB
from tests.unit.test_a2a import _message


async def test_echo_through_a2a_in_a_container(docker_hub: Any, keys: dict[str, str]) -> None:
    base = str(docker_hub.make_url("")).rstrip("/")
    headers = {"Authorization": f"Bearer {keys['user']}"}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        card = await A2ACardResolver(http, f"{base}/a2a/echo").get_agent_card()
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
        [event] = [e async for e in client.send_message(_message({"hello": "docker"}))]
        task = event.task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
        out = MessageToDict(task.artifacts[0].parts[0].data)
        assert out == {"echo": {"hello": "docker"}, "agent": "echo"}
        got = await client.get_task(GetTaskRequest(id=task.id))
        assert got.status.state == TaskState.TASK_STATE_COMPLETED
        # Streamed: the same governed path, the states as they happen.
        streaming = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
        events = [e async for e in streaming.send_message(_message({"stream": True}))]
        assert events[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
        assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    stored = await docker_hub.app[HUB].router.get(task.id)
    assert stored.container_id  # it ran in a container
    decision = await docker_hub.app[HUB].decisions.get(stored.decision_id)
    assert decision["input"]["request"]["protocol"] == "a2a"
