"""A Swarm node drained under an agent's service, on the one-node swarm of
test_swarm_docker.py: what the backend reports, which is what the hub acts on.

Draining the node shuts the service's task down (its container stops, its address goes);
with no other node its replacement waits, ``pending``. The backend then reports the
service as not running (``is_running``, ``list_managed``'s state) and refuses to attach
to it. That is what the hub keys on (README "Agents on Docker Swarm"): a runner in the
middle of the hand-over loses its connection and the task fails with ``agent_unavailable``;
restart recovery or a takeover finds the service not running and re-dispatches the task
within the retry budget. With restart condition ``none`` (what the backend sets) no
replacement task is made, and none comes back when the node is active again: the service
stays down until the hub removes it.

The test is at the backend level, with the real recovery (``take_over``, as a restart or
a takeover runs it) deciding on what the real backend reports; the router it hands its
verdict to records the call instead of running the task again (a hub on a Swarm must run
in a container on the overlay: tests/integration/test_gateway_image_docker.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import docker
import pytest

from gateway.containers.backend import LABEL_TASK
from gateway.containers.swarm import SwarmBackend
from gateway.errors import AgentUnavailable
from gateway.routers.recovery import take_over
from gateway.settings import RecoverySettings
from gateway.store import Task
from tests.integration.test_swarm_docker import backend, echo_spec, swarm  # noqa: F401

DRAINED_WITHIN_S = 30.0


class Verdicts:
    """Stands in for the task router: records what recovery asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def reattach(self, task: Task, agent: Any, container_id: str) -> None:
        self.calls.append(("reattach", task.id, container_id))

    async def redispatch(self, task: Task, agent: Any, reason: str) -> None:
        self.calls.append(("redispatch", task.id, reason))

    async def end(self, task_id: str, state: str, error: dict[str, Any]) -> None:
        self.calls.append((state, task_id, error["code"]))


class OneTask:
    """Stands in for the store: the one running task the service was started for."""

    def __init__(self, task: Task) -> None:
        self.task = task

    async def get_task(self, task_id: str) -> Task:
        assert task_id == self.task.id
        return self.task


def availability(node: str, value: str) -> None:
    """``docker node update --availability value node``, as an operator would."""
    subprocess.run(
        ["docker", "node", "update", "--availability", value, node],
        check=True,
        capture_output=True,
        timeout=30,
    )


async def until(check: Any, within_s: float, what: str) -> float:
    """Seconds until ``check()`` held; fails after ``within_s``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within_s, f"not within {within_s:g} s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def test_a_drained_nodes_agent_is_reported_gone_and_its_task_redispatched(
    backend: tuple[SwarmBackend, str],  # noqa: F811
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
) -> None:
    b, hub_id = backend
    spec = echo_spec(agent_images, hub_id, b.internal_network)
    handle = await b.start(spec)
    assert await b.is_running(handle.id)
    node = docker_api.info()["Swarm"]["NodeID"]
    try:
        await asyncio.to_thread(availability, node, "drain")

        async def gone() -> bool:
            return not await b.is_running(handle.id)

        await until(gone, DRAINED_WITHIN_S, "the drained service's task stopped")
        listed = {s["id"]: s for s in await b.list_managed(hub_id)}
        assert listed[handle.id]["state"] == "shutdown", listed
        # What a runner re-attaching to it would get.
        with pytest.raises(AgentUnavailable):
            await b.attach(handle.id, 8000)
        tasks = docker_api.tasks(filters={"service": handle.id})
        assert [(t["Status"]["State"], t["DesiredState"]) for t in tasks] == [
            ("shutdown", "shutdown")
        ]
    finally:
        await asyncio.to_thread(availability, node, "active")
    # Back to active, the node gets no replacement: restart condition none, one replica.
    await asyncio.sleep(3)
    assert not await b.is_running(handle.id)

    # Recovery on what the backend reports: the service goes, the task starts again.
    task = _running_task(spec.labels[LABEL_TASK], handle.id, handle.name)
    verdicts = Verdicts()
    report = await take_over(
        [(task.id, hub_id)],
        router=verdicts,  # type: ignore[arg-type]
        backend=b,
        store=OneTask(task),  # type: ignore[arg-type]
        registry=_Registry(),  # type: ignore[arg-type]
        settings=RecoverySettings(max_attempts=3),
    )
    assert verdicts.calls == [
        (
            "redispatch",
            task.id,
            "re-dispatched after a hub restart: its container had exited (attempt 2)",
        )
    ]
    assert report.redispatched == [task.id]
    assert await b.list_managed(hub_id) == []


class _Registry:
    agents = {"echo": object()}


def _running_task(task_id: str, container_id: str, name: str) -> Task:
    return Task(
        id=task_id,
        state="running",
        agent="echo",
        capability=None,
        subject="alice",
        input={},
        timeout_s=60,
        deadline=time.time() + 60,
        decision_id=None,
        sandbox={},
        container_id=container_id,
        container_name=name,
        result=None,
        error=None,
        labels=None,
        attempts=0,
        parent_id=None,
        idempotency_key=None,
        created_at="",
        updated_at="",
        instance_id=None,
        key_id=None,
    )
