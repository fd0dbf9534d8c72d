"""A request meant for one container that reaches another (its address was given to a new
container after the first died) is refused by the SDK with 421 and runs nothing; both hub
clients then treat the agent as gone, so the task is placed again instead of run there."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.agents.base import container_headers
from gateway.agents.http import AgentClient
from gateway.agents.wire import AgentWire
from gateway.containers.backend import CONTAINER_HEADER, ContainerHandle
from gateway.errors import AgentUnavailable, AgentUnreachable
from gateway.sdk import agent as sdk_agent
from tests.conftest import load_example

TASK = {"task_id": "t1", "input": {"n": 1}}
MESSAGE = {"type": "request", "kind": "ping", "payload": {"n": 1}, "from": {"agent": "a"}}


@pytest.fixture
def echo() -> Iterator[tuple[Any, int, list[Any]]]:
    agent = load_example("echo")
    ran: list[Any] = []
    original = agent.handle_task

    def counting(body: dict[str, Any]) -> Any:
        ran.append(body["task_id"])
        return original(body)

    agent.handle_task = counting
    server = agent.serve_in_thread()
    try:
        yield agent, server.server_port, ran
    finally:
        server.shutdown()
        server.server_close()


def handle(port: int, hostname: str | None) -> ContainerHandle:
    return ContainerHandle(id="c", name="echo", address="127.0.0.1", port=port, hostname=hostname)


def test_the_sdk_and_the_hub_name_the_same_header() -> None:
    assert sdk_agent.CONTAINER_HEADER == CONTAINER_HEADER
    assert container_headers(handle(1, "a96543d1733d")) == {CONTAINER_HEADER: "a96543d1733d"}
    assert container_headers(handle(1, None)) == {}
    assert container_headers(handle(1, "bad\r\nX-Evil: 1")) == {}  # never a header injection


async def test_the_hand_off_to_another_container_runs_nothing(
    echo: tuple[Any, int, list[Any]],
) -> None:
    _, port, ran = echo
    client = AgentClient()
    try:
        with pytest.raises(AgentUnreachable, match="another container"):
            await client.post(handle(port, "not-this-one"), "/task", TASK, 5)
        assert ran == []
        with pytest.raises(AgentUnavailable):  # the probe never calls it ready
            await client.wait_ready(handle(port, "not-this-one"), 0.3)
        # Its own hostname, or none (a backend that cannot know it): served as before.
        own = await client.post(handle(port, socket.gethostname()), "/task", TASK, 5)
        assert own["output"]["echo"] == {"n": 1}
        await client.wait_ready(handle(port, None), 2)
        assert ran == ["t1"]
    finally:
        await client.close()


async def test_a_message_to_another_container_is_not_delivered(
    echo: tuple[Any, int, list[Any]],
) -> None:
    _, port, _ = echo
    wire = AgentWire()
    try:
        with pytest.raises(AgentUnavailable, match="another container"):
            await wire.post(handle(port, "not-this-one"), "/message", MESSAGE, 5)
        assert ("127.0.0.1", port) not in wire._idle or wire._idle[("127.0.0.1", port)] == []
        reply = await wire.post(handle(port, socket.gethostname()), "/message", MESSAGE, 5)
        assert reply["reply"]["echo"] == {"n": 1}
    finally:
        await wire.close()
