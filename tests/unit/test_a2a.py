"""The A2A door against a real hub on a real port, with the official a2a-sdk client.

Real policies, real SQLite, the example agents served in-process (only Docker is replaced;
``tests/integration/test_a2a_docker.py`` runs the echo call in a real container). Each agent
gets the environment its container would (``GATEWAY_URL``, its SVID), so ``ctx.progress``
really posts to the hub.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import InvalidParamsError, TaskNotCancelableError, TaskNotFoundError
from a2a.utils.signing import InvalidSignaturesError, create_signature_verifier
from aiohttp import web
from google.protobuf.json_format import MessageToDict, ParseDict
from jwt.api_jwk import PyJWK

from gateway.containers.backend import ContainerHandle, ContainerSpec
from gateway.http.app import HUB, create_app
from tests.conftest import FakeBackend, auth, load_example, make_settings


class EnvBackend(FakeBackend):
    """The fake backend, but each agent sees its container's environment (hub URL, SVID)."""

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        self.started.append(spec)
        agent = load_example(spec.labels["io.agent-gateway.agent"])
        agent.env = dict(spec.env)
        server = agent.serve_in_thread()
        cid = f"fake{next(self._ids)}"
        self.servers[cid] = server
        self.labels[cid] = dict(spec.labels)
        self.ports[cid] = server.server_port
        return ContainerHandle(id=cid, name=spec.name, address="127.0.0.1", port=server.server_port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(settings: Any) -> AsyncIterator[tuple[str, web.Application]]:
    app = create_app(settings, backend=EnvBackend())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        yield f"http://127.0.0.1:{settings.port}", app
    finally:
        await runner.cleanup()


@pytest.fixture
async def hub(tmp_path: Path, keys: dict[str, str]) -> AsyncIterator[tuple[str, web.Application]]:
    """A hub on a real port (agents call it back on 127.0.0.1)."""
    settings = make_settings(tmp_path, port=_free_port())
    async for served in _serve(settings):
        yield served


def _client(key: str | None, card: AgentCard, *, streaming: bool = True) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx.AsyncClient(headers=headers, timeout=30)
    return ClientFactory(ClientConfig(httpx_client=http, streaming=streaming)).create(card)


async def _card(base: str, agent: str) -> AgentCard:
    async with httpx.AsyncClient() as http:
        jwks = (await http.get(f"{base}/.well-known/jwks.json")).json()
        keys = {k["kid"]: PyJWK(k) for k in jwks["keys"]}
        verify = create_signature_verifier(lambda kid, jku: keys[kid], ["ES256"])
        return await A2ACardResolver(http, f"{base}/a2a/{agent}").get_agent_card(
            signature_verifier=verify
        )


def _message(data: Any = None, text: str | None = None, **metadata: Any) -> SendMessageRequest:
    part = Part(text=text) if text is not None else Part()
    if data is not None:
        ParseDict(data, part.data)
    msg = Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[part])
    if metadata:
        msg.metadata.update(metadata)
    return SendMessageRequest(message=msg)


async def _send(client: Any, request: SendMessageRequest) -> list[Any]:
    return [event async for event in client.send_message(request)]


# --- cards ------------------------------------------------------------------------------


async def test_card_is_signed_by_the_hub_and_describes_the_agent(hub: Any) -> None:
    base, _ = hub
    card = await _card(base, "wordstats")
    assert card.name == "wordstats"
    assert [(i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces] == [
        (f"{base}/a2a/wordstats", "JSONRPC", "1.0"),
        (f"{base}/a2a/wordstats", "JSONRPC", "0.3"),
    ]
    assert card.capabilities.streaming and card.capabilities.push_notifications
    assert [s.id for s in card.skills] == ["text.stats", "text.summarize"]
    ext = MessageToDict(card.capabilities.extensions[0].params)
    assert ext["skills"]["text.stats"]["input_schema"]["type"] == "object"
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "bearer"
    # A card changed on the way fails the check.
    card.description = "something else"
    async with httpx.AsyncClient() as http:
        jwks = (await http.get(f"{base}/.well-known/jwks.json")).json()
    key = PyJWK(jwks["keys"][0])
    with pytest.raises(InvalidSignaturesError):
        create_signature_verifier(lambda kid, jku: key, ["ES256"])(card)


async def test_hub_card_lists_the_agents_and_unknown_agents_are_404(hub: Any) -> None:
    base, _ = hub
    async with httpx.AsyncClient() as http:
        doc = (await http.get(f"{base}/.well-known/agent-card.json")).json()
        assert {s["id"] for s in doc["skills"]} >= {"echo", "wordstats", "calc"}
        assert doc["signatures"]
        missing = await http.get(f"{base}/a2a/ghost/.well-known/agent-card.json")
        assert missing.status_code == 404


# --- sending ----------------------------------------------------------------------------


async def test_send_message_to_echo_completes_with_its_artifact(
    hub: Any, keys: dict[str, str]
) -> None:
    base, app = hub
    client = _client(keys["user"], await _card(base, "echo"), streaming=False)
    [event] = await _send(client, _message({"hello": "world"}))
    task = event.task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    [artifact] = task.artifacts
    assert MessageToDict(artifact.parts[0].data) == {"echo": {"hello": "world"}, "agent": "echo"}
    got = await client.get_task(GetTaskRequest(id=task.id))
    assert got.status.state == TaskState.TASK_STATE_COMPLETED
    # The same governed path as POST /v1/tasks: a dispatch decision with the protocol in it.
    stored = await app[HUB].router.get(task.id)
    decision = await app[HUB].decisions.get(stored.decision_id)
    assert decision["input"]["request"]["protocol"] == "a2a"
    assert decision["input"]["request"]["rpc_method"] == "SendMessage"
    assert decision["input"]["request"]["traceparent"].startswith("00-")
    await client.close()


async def test_a_text_part_is_json_or_text(hub: Any, keys: dict[str, str]) -> None:
    base, _ = hub
    client = _client(keys["user"], await _card(base, "echo"), streaming=False)
    [event] = await _send(client, _message(text='{"a": 1}'))
    assert MessageToDict(event.task.artifacts[0].parts[0].data)["echo"] == {"a": 1}
    [event] = await _send(client, _message(text="plain words"))
    assert MessageToDict(event.task.artifacts[0].parts[0].data)["echo"] == {"text": "plain words"}
    await client.close()


async def test_a_denial_is_a_rejected_task_with_decision_and_reasons(
    hub: Any, keys: dict[str, str]
) -> None:
    base, app = hub
    client = _client(keys["user"], await _card(base, "calc"), streaming=False)
    [event] = await _send(client, _message({"expression": "1+1"}))
    task = event.task
    assert task.status.state == TaskState.TASK_STATE_REJECTED
    data = MessageToDict(task.status.message.parts[1].data)
    assert data["code"] == "policy_denied" and data["reasons"]
    logged = await app[HUB].decisions.get(data["decision_id"])
    assert logged["kind"] == "dispatch" and logged["result"]["allow"] is False
    await client.close()


async def test_a_schema_violation_is_invalid_params_with_pointers(
    hub: Any, keys: dict[str, str]
) -> None:
    base, _ = hub
    client = _client(keys["user"], await _card(base, "calc"), streaming=False)
    with pytest.raises(InvalidParamsError) as info:
        await _send(client, _message({"expression": 42}))
    text = json.dumps(info.value.data)
    assert "/params/message/parts/0/data/expression" in text, text
    await client.close()


async def test_list_shows_own_tasks_and_foreign_ids_are_not_found(
    hub: Any, keys: dict[str, str]
) -> None:
    base, _ = hub
    card = await _card(base, "echo")
    mine, theirs = (
        _client(keys["user"], card, streaming=False),
        _client(keys["developer"], card, streaming=False),
    )
    [a] = await _send(mine, _message({"n": 1}))
    [b] = await _send(theirs, _message({"n": 2}))
    listed = await mine.list_tasks(ListTasksRequest())
    assert [t.id for t in listed.tasks] == [a.task.id]
    with pytest.raises(TaskNotFoundError):
        await mine.get_task(GetTaskRequest(id=b.task.id))
    with pytest.raises(TaskNotFoundError):
        await mine.get_task(GetTaskRequest(id=str(uuid.uuid4())))
    # An echo task is not a task of wordstats.
    other = _client(keys["user"], await _card(base, "wordstats"), streaming=False)
    with pytest.raises(TaskNotFoundError):
        await other.get_task(GetTaskRequest(id=a.task.id))
    for c in (mine, theirs, other):
        await c.close()


async def test_cancel_a_running_task_then_it_is_not_cancelable(
    hub: Any, keys: dict[str, str]
) -> None:
    base, _ = hub
    client = _client(keys["developer"], await _card(base, "calc"), streaming=False)
    request = _message({"expression": "1", "spin_s": 20})
    request.configuration.return_immediately = True
    [event] = await _send(client, request)
    assert event.task.status.state == TaskState.TASK_STATE_SUBMITTED
    cancelled = await client.cancel_task(CancelTaskRequest(id=event.task.id))
    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
    with pytest.raises(TaskNotCancelableError):
        await client.cancel_task(CancelTaskRequest(id=event.task.id))
    await client.close()


# --- streaming --------------------------------------------------------------------------


async def test_stream_reports_progress_and_ends_completed(hub: Any, keys: dict[str, str]) -> None:
    base, _ = hub
    client = _client(keys["user"], await _card(base, "echo"))
    events = await _send(client, _message({"progress_steps": 3, "progress_delay_s": 0.05}))
    progress = [
        e.status_update.status.message.parts[0].text
        for e in events
        if e.HasField("status_update") and e.status_update.status.message.parts
    ]
    assert progress[:3] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"], events
    artifacts = [e for e in events if e.HasField("artifact_update")]
    assert len(artifacts) == 1
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    await client.close()


async def test_resubscribe_after_dropping_the_stream(hub: Any, keys: dict[str, str]) -> None:
    base, _ = hub
    client = _client(keys["user"], await _card(base, "echo"))
    stream = client.send_message(_message({"progress_steps": 6, "progress_delay_s": 0.1}))
    first = await anext(stream)
    task_id = first.task.id
    await stream.aclose()  # the client goes away mid-task; the task goes on
    events = [e async for e in client.subscribe(SubscribeToTaskRequest(id=task_id))]
    assert events[0].task.id == task_id
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    await client.close()


async def test_native_event_stream_resumes_with_last_event_id(
    hub: Any, keys: dict[str, str]
) -> None:
    base, _ = hub
    async with aiohttp.ClientSession(headers=auth(keys["user"])) as http:
        resp = await http.post(
            f"{base}/v1/tasks",
            json={"agent": "echo", "input": {"progress_steps": 3, "progress_delay_s": 0.2}},
        )
        task_id = (await resp.json())["task_id"]
        seen: list[tuple[int, str, dict[str, Any]]] = []
        async with http.get(f"{base}/v1/tasks/{task_id}/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            seen = await _read_sse(stream, until_final=True)
        assert seen[-1][2]["final"] is True and seen[-1][2]["state"] == "succeeded"
        assert seen[-1][2]["result"]["agent"] == "echo"
        assert [d["message"] for _, k, d in seen if k == "progress"] == [
            f"step {i} of 3" for i in (1, 2, 3)
        ]
        # Resumed after the second event: exactly what came after it.
        second = seen[1][0]
        async with http.get(
            f"{base}/v1/tasks/{task_id}/events", headers={"Last-Event-ID": str(second)}
        ) as again:
            rest = await _read_sse(again, until_final=True)
        assert [i for i, _, _ in rest] == [i for i, _, _ in seen if i > second]
        other = await aiohttp.ClientSession(headers=auth(keys["developer"])).__aenter__()
        try:
            denied = await other.get(f"{base}/v1/tasks/{task_id}/events")
            assert denied.status == 404
        finally:
            await other.close()


async def _read_sse(resp: Any, *, until_final: bool) -> list[tuple[int, str, dict[str, Any]]]:
    out: list[tuple[int, str, dict[str, Any]]] = []
    event_id, kind = 0, "message"
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            out.append((event_id, kind, data))
            if until_final and data.get("final"):
                break
    return out


# --- push notifications -----------------------------------------------------------------


async def test_push_to_loopback_is_refused_by_default(hub: Any, keys: dict[str, str]) -> None:
    base, app = hub
    client = _client(keys["user"], await _card(base, "echo"), streaming=False)
    [event] = await _send(client, _message({"x": 1}))
    from a2a.client.errors import A2AClientError

    with pytest.raises((A2AClientError, httpx.HTTPStatusError)):
        await client.create_task_push_notification_config(
            TaskPushNotificationConfig(task_id=event.task.id, url="http://127.0.0.1:9/hook")
        )
    denials, _ = await app[HUB].decisions.list(kind="api", allow=False, limit=10)
    assert any("not a public address" in " ".join(d["result"]["reasons"]) for d in denials)
    await client.close()


async def test_push_notification_reaches_an_allowed_webhook(
    tmp_path: Path, keys: dict[str, str], config_copy: Any
) -> None:
    root = config_copy()
    data = json.loads((root / "policies" / "data.json").read_text())
    data["config"]["a2a"] = {"push_allowed_hosts": ["127.0.0.1"]}
    (root / "policies" / "data.json").write_text(json.dumps(data))
    received: list[tuple[dict[str, Any], str | None]] = []

    completed = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        received.append((body, request.headers.get("X-A2A-Notification-Token")))
        if body["task"]["status"]["state"] == "TASK_STATE_COMPLETED":
            completed.set()
        return web.json_response({})

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    hook_port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    settings = make_settings(
        tmp_path,
        port=_free_port(),
        agents_file=root / "agents.yaml",
        schemas_dir=root / "schemas",
        policies_dir=root / "policies",
    )
    try:
        async for base, _ in _serve(settings):
            client = _client(keys["user"], await _card(base, "echo"), streaming=False)
            request = _message({"pushed": True})
            request.configuration.task_push_notification_config.CopyFrom(
                TaskPushNotificationConfig(url=f"http://127.0.0.1:{hook_port}/hook", token="tok-1")
            )
            [event] = await _send(client, request)
            assert event.task.status.state == TaskState.TASK_STATE_COMPLETED
            await asyncio.wait_for(completed.wait(), 10)
            await client.close()
    finally:
        await runner.cleanup()
    finals = [(b, t) for b, t in received if b["task"]["status"]["state"] == "TASK_STATE_COMPLETED"]
    assert finals, received
    assert finals[0][1] == "tok-1"
    assert finals[0][0]["task"]["id"] == event.task.id


# --- A2A 0.3 ----------------------------------------------------------------------------


async def test_an_a2a_0_3_client_is_served(hub: Any, keys: dict[str, str]) -> None:
    base, _ = hub
    card = await _card(base, "echo")
    del card.supported_interfaces[0]  # only the 0.3 interface left: the SDK speaks 0.3
    client = _client(keys["user"], card, streaming=False)
    [event] = await _send(client, _message({"old": "client"}))
    assert event.task.status.state == TaskState.TASK_STATE_COMPLETED
    assert MessageToDict(event.task.artifacts[0].parts[0].data)["echo"] == {"old": "client"}
    got = await client.get_task(GetTaskRequest(id=event.task.id))
    assert got.id == event.task.id
    await client.close()


# --- bad input --------------------------------------------------------------------------

V1 = {"A2A-Version": "1.0"}
SEND = {
    "message": {
        "messageId": "m1",
        "role": "ROLE_USER",
        "parts": [{"data": {"a": 1}}],
    }
}


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (b'{"jsonrpc": "2.0", ', V1, -32700),
        (b"[]", V1, -32600),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "GetTask"}]', V1, -32600),
        (b'{"id": 1, "method": "GetTask"}', V1, -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "NoSuchMethod"}', V1, -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": 5}}', V1, -32602),
        (
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {}}).encode(),
            V1,
            -32602,
        ),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "nope"}}', V1, -32001),
        (
            json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": SEND}
            ).encode(),
            {"A2A-Version": "2.0"},
            -32009,
        ),
        (
            json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": SEND}
            ).encode(),
            {},
            -32009,
        ),
        (
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "message/send",
                    "params": {"message": {"kind": "nope"}},
                }
            ).encode(),
            {},
            -32602,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "'
            + b"x" * 1_100_000
            + b'"}}',
            V1,
            -32600,
        ),
    ],
    ids=[
        "malformed json",
        "empty batch",
        "batch",
        "not json-rpc",
        "unknown method",
        "params of the wrong type",
        "a message missing",
        "unknown task",
        "unsupported version",
        "1.0 method without a version header",
        "0.3 params invalid",
        "oversized",
    ],
)
async def test_bad_input_gets_its_json_rpc_error(
    hub: Any, keys: dict[str, str], body: bytes, headers: dict[str, str], code: int
) -> None:
    base, app = hub
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{base}/a2a/echo",
            data=body,
            headers={**auth(keys["user"]), "Content-Type": "application/json", **headers},
        )
        doc = await resp.json()
    assert resp.status == 200, doc
    assert doc["jsonrpc"] == "2.0"
    assert doc["error"]["code"] == code, doc
    tasks, _ = await app[HUB].router.list(limit=10)
    assert tasks == []  # nothing half-done


async def test_no_key_is_401_and_a_missing_role_403_with_the_decision(
    hub: Any, keys: dict[str, str]
) -> None:
    base, app = hub
    body = {"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": SEND}
    async with aiohttp.ClientSession() as http:
        anon = await http.post(f"{base}/a2a/echo", json=body, headers=V1)
        assert anon.status == 401
        assert anon.headers["WWW-Authenticate"].startswith("Bearer")
        denied = await http.post(
            f"{base}/a2a/echo", json=body, headers={**V1, **auth(keys["auditor"])}
        )
        doc = await denied.json()
    assert denied.status == 403
    assert doc["id"] == 7 and doc["error"]["code"] == -32600
    info = doc["error"]["data"][0]["metadata"]
    logged = await app[HUB].decisions.get(info["decision_id"])
    assert logged["input"]["request"]["protocol"] == "a2a"
    assert logged["input"]["request"]["params"]["method"] == "SendMessage"
