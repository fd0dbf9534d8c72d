"""A2A agents behind the hub (``protocol: a2a``) on the real engine.

The two examples built on ``a2a-sdk`` alone: ``reverser`` (deterministic, streams its
steps) and ``relay`` (delegates to reverser through the hub with its SVID). Every call goes
through the hub's A2A door with the SDK's client; the hub reads each agent's card inside
its container and checks it against ``agents.yaml``, so an entry the card does not match
(``impostor``: reverser's image under another name) fails its task and says why.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.types import TaskState
from google.protobuf.json_format import MessageToDict

from gateway.containers.backend import LABEL_HUB
from gateway.http.agent_app import start_listeners
from gateway.http.app import HUB, create_app
from tests.conftest import make_settings
from tests.integration.conftest import RUN_ID, cleanup_hub, registry_file
from tests.integration.test_messages_docker import free_port
from tests.unit.test_a2a import _message

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
IMPOSTOR = """
  - name: impostor
    description: reverser's image under a name its card does not give.
    protocol: a2a
    image: {image}
    capabilities: [text.reverse]
    input_schema: agents/reverser.input.json
    output_schema: agents/reverser.output.json
    port: 8000
    timeout_s: 30
"""


@dataclass
class LiveHub:
    """A hub serving as ``serve`` does (the agent listener on the gateway address)."""

    app: Any
    base: str
    session: aiohttp.ClientSession

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.session.get(self.base + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(self.base + path, **kwargs)


@pytest.fixture
async def a2a_hub(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
) -> AsyncIterator[LiveHub]:
    """A hub on the real engine with the example registry plus ``impostor``; cleans up."""
    path = registry_file(tmp_path, agent_images)
    path.write_text(path.read_text() + IMPOSTOR.format(image=agent_images["reverser"]))
    networks = [f"agw-{RUN_ID}-{secrets.token_hex(2)}-{n}" for n in ("int", "egr")]
    port = free_port()
    settings = make_settings(
        tmp_path,
        agents_file=path,
        network=networks[0],
        egress_network=networks[1],
        hub_id=f"test-{RUN_ID}-{secrets.token_hex(3)}",
        port=port,
    )
    app = create_app(settings)
    listeners = None
    try:
        # relay calls GATEWAY_URL/a2a/reverser: the agent listener must be up.
        listeners = await start_listeners(app, host="127.0.0.1", port=port)
        async with aiohttp.ClientSession() as session:
            yield LiveHub(app, f"http://127.0.0.1:{port}", session)
    finally:
        if listeners is not None:
            await listeners.close()
        assert cleanup_hub(docker_api, settings.hub_id, networks) == [], "containers left"


async def _no_containers(hub: Any, api: docker.APIClient) -> None:
    """Every container of the hub is removed soon after its task ended."""
    hub_id = hub.app[HUB].settings.hub_id
    for _ in range(50):
        if not api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub_id}"]}):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("a container outlived its task")


async def test_reverser_streams_through_the_hub(
    a2a_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    headers = {"Authorization": f"Bearer {keys['user']}", "traceparent": TRACEPARENT}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        card = await A2ACardResolver(http, f"{a2a_hub.base}/a2a/reverser").get_agent_card()
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
        events = [e async for e in client.send_message(_message({"text": "one two three"}))]
    task_id = events[0].task.id
    texts = [
        "".join(p.text for p in e.status_update.status.message.parts)
        for e in events
        if e.HasField("status_update")
    ]
    # The agent's own status updates, forwarded by the hub as progress.
    assert "counting 13 characters" in texts and "reversing 3 words" in texts, texts
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    [artifact] = [e.artifact_update.artifact for e in events if e.HasField("artifact_update")]
    out = MessageToDict(artifact.parts[0].data)
    assert out == {"reversed": "three two one", "words": 3, "agent": "reverser"}

    hub = a2a_hub.app[HUB]
    stored = await hub.router.get(task_id)
    assert stored.state == "succeeded" and stored.container_id  # it ran in a container
    decision = await hub.decisions.get(stored.decision_id)
    assert decision["input"]["request"]["traceparent"] == TRACEPARENT
    # The native stream replays the same progress (the events are buffered per task).
    async with a2a_hub.get(
        f"/v1/tasks/{task_id}/events", headers={"Authorization": f"Bearer {keys['user']}"}
    ) as resp:
        body = await resp.text()
    assert "event: progress" in body and "reversing 3 words" in body, body
    await _no_containers(a2a_hub, docker_api)


async def test_relay_delegates_through_the_hub(
    a2a_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    headers = {"Authorization": f"Bearer {keys['user']}", "traceparent": TRACEPARENT}
    async with httpx.AsyncClient(headers=headers, timeout=90) as http:
        card = await A2ACardResolver(http, f"{a2a_hub.base}/a2a/relay").get_agent_card()
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
        [event] = [e async for e in client.send_message(_message({"text": "a b c d"}))]
    task = event.task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
    out = MessageToDict(task.artifacts[0].parts[0].data)
    assert out["reversed"] == "d c b a" and out["words"] == 4 and out["characters"] == 7

    hub = a2a_hub.app[HUB]
    child = await hub.router.get(out["delegated_task"])
    assert child.agent == "reverser" and child.parent_id == task.id
    assert child.state == "succeeded"
    # Run for the user who started the parent: delegation adds no roles.
    assert child.subject == (await hub.router.get(task.id)).subject
    await hub.decisions.flush()
    messages, _ = await hub.decisions.list(kind="message", agent="reverser")
    [decision] = [d for d in messages if d["input"]["source"]["task_id"] == task.id]
    assert decision["allow"] is True
    source = decision["input"]["source"]
    assert source["agent"] == "relay" and source["local"] is True
    assert [e["agent"] for e in source["lineage"]] == [] and source["depth"] == 0
    assert decision["input"]["message"]["type"] == "delegate"
    request = decision["input"]["request"]
    assert request["protocol"] == "a2a"
    # One trace across both hops: the caller's trace id, carried by relay.
    assert request["traceparent"].split("-")[1] == TRACE_ID
    dispatch = await hub.decisions.get(child.decision_id)
    assert dispatch["input"]["request"]["traceparent"].split("-")[1] == TRACE_ID
    await _no_containers(a2a_hub, docker_api)


async def test_a_card_that_does_not_match_its_entry_fails_the_task(
    a2a_hub: Any, keys: dict[str, str], docker_api: docker.APIClient
) -> None:
    async with a2a_hub.post(
        "/v1/tasks?wait=30",
        json={"agent": "impostor", "input": {"text": "x"}},
        headers={"Authorization": f"Bearer {keys['user']}"},
    ) as resp:
        task = await resp.json()
    assert task["state"] == "failed", json.dumps(task)
    error = task["error"]
    assert error["code"] == "agent_error"
    assert "does not match its registry entry" in error["message"]
    assert "'reverser'" in error["message"] and "'impostor'" in error["message"]
    await _no_containers(a2a_hub, docker_api)
