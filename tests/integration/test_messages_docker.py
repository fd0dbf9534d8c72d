"""Agent-to-agent messages between real containers, through a hub agents can reach.

The hub listens on 127.0.0.1 (for the test, every route) and on the internal network's
gateway address (for the containers, the agent routes only) on one free port, as
``agent-gateway serve`` does, so ``GATEWAY_URL`` in each container is real. Agents here are
the example ``probe`` (runs a script of SDK calls from inside its container and reports each
outcome), ``echo``, ``wordstats`` and ``coordinator``.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from gateway.agents.instances import Instance
from gateway.http.agent_app import start_listeners
from gateway.http.app import HUB, create_app
from gateway.hub import Hub
from tests.conftest import auth, make_settings
from tests.integration.conftest import RUN_ID, cleanup_hub, registry_file
from tests.messaging import svid_auth, until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]
NOTICE = {"text": "hello from a container"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    """A hub on the real engine, reachable by the test and by its containers."""

    session: aiohttp.ClientSession
    hub: Hub
    keys: dict[str, str]

    async def submit(self, agent: str, input: Any, key: str = "developer") -> str:
        async with self.session.post(
            "/v1/tasks", json={"agent": agent, "input": input}, headers=auth(self.keys[key])
        ) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            return str(body["task_id"])

    async def result(self, task_id: str, wait: float = 60) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            async with self.session.get(
                f"/v1/tasks/{task_id}?wait=20", headers=auth(self.keys["operator"])
            ) as resp:
                task = await resp.json()
            if task["state"] in ("succeeded", "failed", "timed_out", "cancelled"):
                return task  # type: ignore[no-any-return]
            assert loop.time() < deadline, task

    async def running(self, task_id: str) -> Instance:
        return await until(  # type: ignore[no-any-return]
            lambda: (i := self.hub.instances.for_task(task_id)) and i.handle and i,
            within_s=30,
            what=f"container of {task_id}",
        )

    async def probe(self, **input: Any) -> tuple[str, Instance]:
        task_id = await self.submit("probe", {"hold_s": 60, **input})
        return task_id, await self.running(task_id)


@pytest.fixture
async def live(
    tmp_path: Path,
    keys: dict[str, str],
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
) -> AsyncIterator[Live]:
    networks = [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]
    port = free_port()
    settings = make_settings(
        tmp_path,
        agents_file=registry_file(tmp_path, agent_images),
        network=networks[0],
        egress_network=networks[1],
        hub_id=f"test-{RUN_ID}-{secrets.token_hex(3)}",
        port=port,
    )
    app = create_app(settings)
    listeners = None
    try:
        # As serve does: everything on 127.0.0.1, the agent routes on the gateway address.
        listeners = await start_listeners(app, host="127.0.0.1", port=port)
        hub = app[HUB]
        gateway_ip = hub.facts["internal_gateway"]
        assert hub.router.options.gateway_url == f"http://{gateway_ip}:{port}"
        assert listeners.urls == [f"http://127.0.0.1:{port}", f"http://{gateway_ip}:{port}"]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield Live(session, hub, keys)
    finally:
        if listeners is not None:
            await listeners.close()
        cleanup_hub(docker_api, settings.hub_id, networks)


async def test_request_through_the_hub_works_where_a_direct_connection_fails(
    live: Live,
) -> None:
    target_task, target = await live.probe(expect_messages=1)
    assert target.handle is not None
    address, port = target.handle.address, target.handle.port
    # The host reaches the target directly, so a failure from inside is the network's doing.
    async with (
        aiohttp.ClientSession() as direct,
        direct.get(f"http://{address}:{port}/health") as resp,
    ):
        assert resp.status == 200

    sender_task = await live.submit(
        "probe",
        {
            "script": [
                {"op": "connect", "host": address, "port": port, "timeout_s": 2},
                {"op": "request", "to": "probe", "kind": "ping", "payload": {"n": 1}},
                {"op": "request", "to": "calc", "kind": "ping", "payload": {}},
            ]
        },
    )
    sender = await live.result(sender_task)
    target_out = await live.result(target_task)

    assert sender["state"] == "succeeded", sender
    direct_step, routed, refused = sender["result"]["results"]
    # icc off: the SYN is dropped, so the attempt times out (a refusal or any other error
    # would mean something else answered, or failed, on the way).
    assert direct_step["ok"] is False, direct_step
    assert direct_step["code"] == "TimeoutError", direct_step
    assert direct_step["after_s"] >= 1.9, direct_step
    assert routed["ok"] is True, routed
    assert routed["reply"] == {"echo": {"n": 1}, "agent": "probe", "task_id": target_task}
    assert refused["ok"] is False and refused["status"] == 403
    assert refused["code"] == "policy_denied"
    (got,) = target_out["result"]["received"]
    assert got["from_task"] == sender_task and got["type"] == "request"


async def test_event_and_broadcast_reach_running_containers(live: Live) -> None:
    listeners = [await live.probe(expect_messages=2) for _ in range(2)]
    sender_task = await live.submit(
        "probe",
        {
            "script": [
                {"op": "publish", "topic": "notices", "kind": "notice", "payload": NOTICE},
                {"op": "broadcast", "kind": "notice", "payload": NOTICE},
                {"op": "publish", "topic": "nobody", "kind": "notice", "payload": NOTICE},
            ]
        },
    )
    sender = await live.result(sender_task)

    published, broadcast, unknown = sender["result"]["results"]
    assert published == {"op": "publish", "ok": True, "delivered": 2}
    assert broadcast == {"op": "broadcast", "ok": True, "delivered": 2}
    assert unknown["code"] == "unknown_topic" and unknown["status"] == 404
    for task_id, _ in listeners:
        got = (await live.result(task_id))["result"]["received"]
        assert [(m["type"], m["topic"], m["from_task"]) for m in got] == [
            ("event", "notices", sender_task),
            ("broadcast", None, sender_task),
        ]


async def test_delegation_renewal_and_result_ownership_from_a_container(live: Live) -> None:
    other_task, _ = await live.probe(expect_messages=1)
    sender_task = await live.submit(
        "probe",
        {
            "script": [
                {"op": "renew"},
                {"op": "delegate", "to": "echo", "input": {"part": 1}, "wait_s": 60},
                {"op": "result_for", "task_id": other_task, "output": {}},
                {"op": "request", "to": "probe", "kind": "ping", "payload": {"done": True}},
            ]
        },
    )
    sender = await live.result(sender_task, wait=90)

    renew, delegated, foreign_result, _ = sender["result"]["results"]
    assert renew["ok"] is True and renew["expires_at"] > 0
    assert delegated == {
        "op": "delegate",
        "ok": True,
        "output": {"echo": {"part": 1}, "agent": "echo"},
    }
    assert foreign_result["status"] == 403 and foreign_result["code"] == "not_task_owner"
    children = [
        t for t in (await live.hub.store.list_tasks(agent="echo"))[0] if t.parent_id == sender_task
    ]
    assert len(children) == 1 and children[0].state == "succeeded"
    assert (await live.result(other_task))["state"] == "succeeded"  # not the intruder's output


async def test_coordinator_delegates_to_wordstats_and_reports_later(live: Live) -> None:
    text = (
        "Policy decides everything. The hub asks policy before it starts a container. "
        "Containers are cheap. Policy is code in git."
    )
    task_id = await live.submit("coordinator", {"text": text, "parts": 2, "top": 2}, key="user")
    task = await live.result(task_id, wait=120)
    whole = await live.result(await live.submit("wordstats", {"text": text, "top": 2}, "user"))

    assert task["state"] == "succeeded", task
    result = task["result"]
    assert result["parts"] == 2 and len(result["children"]) == 2
    assert (result["words"], result["sentences"]) == (20, 4)
    assert result["top_words"] == whole["result"]["top_words"]
    for child_id in result["children"]:
        child = await live.hub.store.get_task(child_id)
        assert child.agent == "wordstats" and child.parent_id == task_id
        assert child.state == "succeeded" and child.subject == "user"


async def test_token_of_a_removed_container_is_refused(live: Live) -> None:
    task_id = await live.submit("echo", {"x": 1}, key="user")
    inst = await until(lambda: live.hub.instances.for_task(task_id), within_s=30)
    token = inst.env["AGENT_SVID"]
    assert (await live.result(task_id))["state"] == "succeeded"
    await until(lambda: live.hub.instances.for_task(task_id) is None)
    async with live.session.post(
        "/v1/messages",
        json={"type": "broadcast", "kind": "notice", "payload": NOTICE},
        headers=svid_auth(token),
    ) as resp:
        body = await resp.json()
    assert resp.status == 401 and body["error"]["code"] == "token_revoked"
