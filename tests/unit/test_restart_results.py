"""Identities and reported results across a hub restart (issue 10, item 6), fake backend.

A "restart" here stops the hub with its containers left running, as a killed hub leaves
them, and starts a new one on the same state directory: recovery re-attaches them. The
agents are the example agents in-process with the real SDK; tests/integration/
test_crash_docker.py does the same with SIGKILL and real containers.
"""

from __future__ import annotations

import asyncio
import gc
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.containers.backend import (
    LABEL_AGENT,
    LABEL_INSTANCE,
    LABEL_TASK,
    ContainerHandle,
    ContainerSpec,
)
from gateway.errors import Degraded, RevokedToken
from gateway.http.app import HUB, create_app
from gateway.hub import Hub
from gateway.sdk.client import GatewayClient, HubError
from gateway.settings import Settings
from tests.conftest import FakeBackend, auth, make_settings
from tests.messaging import svid_auth
from tests.unit.test_messages import AgentEnvBackend
from tests.unit.test_recovery import seed, start_container, wait_terminal

pytestmark = pytest.mark.timeout(60)


@dataclass
class CrashingBackend(AgentEnvBackend):
    """Agents see their container's environment; a start can stall once the container runs
    (the hub "dies" there), and background agents can be held before they compute."""

    stall_after_start: bool = False
    hold: threading.Event | None = None

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        handle = await super().start(spec)
        agent = self.agents[spec.labels[LABEL_TASK]]
        if self.hold is not None and spec.labels[LABEL_AGENT] == "echo":
            run, hold = agent._task, self.hold

            def held(input: Any, ctx: Any) -> Any:
                hold.wait(30)
                return run(input, ctx)

            agent._task = held
        if self.stall_after_start:
            # The container runs; the hub never gets to record what start() returned.
            await asyncio.Event().wait()
        return handle


class Hubs:
    """Start, "kill" (stop, containers left running) and start again one hub."""

    def __init__(self, settings: Settings, backend: CrashingBackend, aiohttp_client: Any):
        self.settings = settings
        self.backend = backend
        self._client_factory = aiohttp_client
        self.client: Any = None

    @property
    def hub(self) -> Hub:
        return self.client.app[HUB]

    async def start(self) -> Any:
        self.client = await self._client_factory(create_app(self.settings, backend=self.backend))
        url = str(self.client.make_url("")).rstrip("/")
        self.backend.gateway_url = url
        # The test server gets a new port each start; a real hub comes back at its address.
        for agent in self.backend.agents.values():
            agent.env = {**agent.env, "GATEWAY_URL": url}
            agent.client.url = url
        return self.client

    async def kill(self) -> None:
        async def keep_containers() -> None:
            """The engine's containers outlive the hub."""

        self.backend.close = keep_containers  # type: ignore[method-assign]
        await self.client.close()
        del self.backend.close

    async def submit(self, agent: str, input: Any, key: str, **extra: Any) -> str:
        resp = await self.client.post(
            "/v1/tasks", json={"agent": agent, "input": input, **extra}, headers=auth(key)
        )
        body = await resp.json()
        assert resp.status == 202, body
        return str(body["task_id"])


@pytest.fixture
async def hubs(
    tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Hubs]]]:
    # echo as a background agent (202, then the result through the hub).
    monkeypatch.setenv("ECHO_REPLY", "later")
    made: list[Hubs] = []

    async def make(**backend_options: Any) -> Hubs:
        settings = make_settings(tmp_path, probe_interval_s=0)
        h = Hubs(settings, CrashingBackend(**backend_options), aiohttp_client)
        await h.start()
        made.append(h)
        return h

    yield make
    for h in made:
        if h.backend.hold is not None:
            h.backend.hold.set()
        await h.client.close()
        await FakeBackend.close(h.backend)
    gc.collect()


async def terminal_events(hub: Hub, task_id: str) -> list[str]:
    task = await hub.store.get_task(task_id)
    assert task.history is not None
    return [h.state for h in task.history if h.state in ("succeeded", "failed", "timed_out")]


async def test_a_container_started_just_before_the_hub_died_keeps_a_valid_identity(
    hubs: Callable[..., Awaitable[Hubs]], keys: dict[str, str]
) -> None:
    """Killed between "container started" and "container recorded": the instance id was
    stored before the start, so the restarted hub re-attaches the container under the id
    its token names, the token verifies, and its reported result is taken."""
    h = await hubs(stall_after_start=True)
    task_id = await h.submit("echo", {"n": 7}, keys["user"], timeout_s=15)
    spec = await _until(lambda: h.backend.started and h.backend.started[-1])
    token = spec.env["AGENT_SVID"]
    stored = await _until(lambda: h.hub.store.get_task(task_id), ready=lambda t: t.instance_id)
    assert stored.container_id is None  # the crash window: the container is not recorded
    await h.kill()

    h.backend.stall_after_start = False
    await h.start()
    assert h.hub.last_recovery is not None
    assert h.hub.last_recovery.reattached == [task_id]
    ident = h.hub.identities.verify(token)
    assert ident.instance_id == stored.instance_id
    task = await wait_terminal(h.hub.store, task_id)
    assert task.state == "succeeded", task.error
    assert task.result == {"echo": {"n": 7}, "agent": "echo"}
    assert await terminal_events(h.hub, task_id) == ["succeeded"]
    assert len(h.backend.started) == 1  # re-attached, not started again


async def test_a_result_computed_while_the_hub_is_down_is_reported_to_the_next_one(
    hubs: Callable[..., Awaitable[Hubs]], keys: dict[str, str]
) -> None:
    """The background agent finishes while no hub listens; the restarted hub re-attaches
    it and gets the result (in the answer to the repeated hand-over, or the report the
    agent keeps offering, whichever comes first): one terminal state."""
    h = await hubs(hold=threading.Event())
    task_id = await h.submit("echo", {"n": 3}, keys["user"], timeout_s=20)
    await _until(lambda: (i := h.hub.instances.for_task(task_id)) and i.handle)
    await _until(lambda: h.hub.store.get_task(task_id), ready=lambda t: t.state == "running")
    await h.kill()
    assert h.backend.hold is not None
    h.backend.hold.set()  # the result is computed now, with the hub down
    await asyncio.sleep(1.0)  # a few refused attempts

    await h.start()
    task = await wait_terminal(h.hub.store, task_id, within_s=20)
    assert task.state == "succeeded", task.error
    assert task.result == {"echo": {"n": 3}, "agent": "echo"}
    assert await terminal_events(h.hub, task_id) == ["succeeded"]
    # A repeat after the end is refused for good (the instance is closed), not recorded.
    agent = h.backend.agents[task_id]
    started = time.monotonic()
    with pytest.raises(HubError) as refused:
        # In a thread: the call blocks, and the hub answering it runs on this loop.
        await asyncio.to_thread(
            agent.client.report_result, task_id, {"n": 4}, deadline=time.time() + 10
        )
    # 401 once its instance is closed (409 in the moment before): either is final.
    assert refused.value.status in (401, 409)
    assert time.monotonic() - started < 5
    assert (await h.hub.store.get_task(task_id)).result == task.result


async def test_tokens_of_unknown_instances_are_a_retry_until_recovery_ran(
    hubs: Callable[..., Awaitable[Hubs]], keys: dict[str, str]
) -> None:
    h = await hubs()
    task_id = await h.submit("probe", {"hold_s": 0.2, "expect_messages": 0}, keys["developer"])
    inst = await _until(lambda: (i := h.hub.instances.for_task(task_id)) and i.handle and i)
    token = inst.env["AGENT_SVID"]
    await wait_terminal(h.hub.store, task_id)
    with pytest.raises(RevokedToken):
        h.hub.identities.verify(token)
    h.hub.recovered = False  # as before a deferred recovery has run
    with pytest.raises(Degraded) as retry:
        h.hub.identities.verify(token)
    assert retry.value.status == 503 and retry.value.headers["Retry-After"]
    h.hub.recovered = True


async def test_a_repeated_delegation_with_its_key_makes_one_child(
    hubs: Callable[..., Awaitable[Hubs]], keys: dict[str, str]
) -> None:
    h = await hubs()
    task_id = await h.submit("probe", {"hold_s": 10, "expect_messages": 0}, keys["developer"])
    inst = await _until(lambda: (i := h.hub.instances.for_task(task_id)) and i.handle and i)
    envelope = {
        "type": "delegate",
        "to": "calc",
        "kind": "task.delegate",
        "payload": {"input": {"expression": "6*7"}},
    }

    async def delegate(key: str | None) -> str:
        headers = svid_auth(inst.env["AGENT_SVID"])
        if key:
            headers["Idempotency-Key"] = key
        resp = await h.client.post("/v1/messages", json=envelope, headers=headers)
        body = await resp.json()
        assert resp.status == 202, body
        return str(body["task_id"])

    first, again = await delegate("part-1"), await delegate("part-1")
    other = await delegate(None)
    assert first == again and other != first
    children = [t for t in (await h.hub.store.list_tasks())[0] if t.parent_id == task_id]
    assert sorted(c.id for c in children) == sorted({first, other})


async def test_recovery_keeps_the_running_container_of_a_task_with_two(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """A hub killed mid-create can leave a second container for a task it re-dispatched:
    recovery re-attaches the running one and removes the other as an orphan."""
    settings = make_settings(tmp_path, probe_interval_s=0)
    backend = FakeBackend()
    from gateway.store import Store

    store = Store(settings.db_path)
    task_id = await seed(store, "running", input={"k": 9})
    await store.close()
    stray = await start_container(backend, task_id, "echo", settings.hub_id)
    backend.exited.add(stray)
    live = await start_container(backend, task_id, "echo", settings.hub_id)
    hub = Hub(settings, backend=backend)
    await hub.start()
    try:
        assert hub.last_recovery is not None
        assert hub.last_recovery.reattached == [task_id]
        assert len(hub.last_recovery.orphans) == 1 and stray not in backend.servers
        task = await wait_terminal(hub.store, task_id)
        assert task.state == "succeeded" and task.container_id == live
    finally:
        await hub.stop()
        await backend.close()
        gc.collect()


async def test_recovery_re_attaches_only_the_container_of_the_current_instance(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """Two running containers for one task: the newer one is an earlier attempt's (its token
    names another instance, so nothing it reports would verify); the current one is kept."""
    settings = make_settings(tmp_path, probe_interval_s=0)
    backend = FakeBackend()
    from gateway.store import Store

    store = Store(settings.db_path)
    task_id = await seed(store, "running", input={"k": 5}, instance_id="i-now")
    await store.close()
    live = await start_container(backend, task_id, "echo", settings.hub_id)
    stale = await start_container(backend, task_id, "echo", settings.hub_id)
    backend.labels[live][LABEL_INSTANCE] = "i-now"
    backend.labels[stale][LABEL_INSTANCE] = "i-before"
    hub = Hub(settings, backend=backend)
    await hub.start()
    try:
        assert hub.last_recovery is not None
        assert hub.last_recovery.reattached == [task_id]
        assert stale not in backend.servers
        task = await wait_terminal(hub.store, task_id)
        assert task.state == "succeeded" and task.container_id == live
    finally:
        await hub.stop()
        await backend.close()
        gc.collect()


async def test_a_dispatched_container_carries_its_instance_label(
    hubs: Callable[..., Awaitable[Hubs]], keys: dict[str, str]
) -> None:
    h = await hubs()
    task_id = await h.submit("echo", {"n": 1}, keys["user"])
    task = await wait_terminal(h.hub.store, task_id)
    (spec,) = h.backend.started
    claims = jwt.decode(spec.env["AGENT_SVID"], options={"verify_signature": False})
    assert task.instance_id and claims["gw_instance"] == task.instance_id
    assert spec.labels[LABEL_INSTANCE] == task.instance_id


# --- the SDK's retries of a reported result --------------------------------------------------


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body) of the server's script."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server: Any = self.server
        server.calls += 1
        status, body = server.script.pop(0) if server.script else server.last
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "0.05")
        self.end_headers()
        self.wfile.write(data)


def _scripted(script: list[tuple[int, str]], last: tuple[int, str]) -> Any:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.last, server.calls = list(script), last, 0
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    return server


def _err(code: str) -> str:
    return json.dumps({"error": {"code": code, "message": "m"}})


@pytest.mark.parametrize(
    ("script", "last", "outcome", "calls"),
    [
        # Retried through a restart until a terminal state is acknowledged.
        ([(503, _err("degraded")), (502, _err("x"))], (200, '{"state": "succeeded"}'), 200, 3),
        # Taken but not yet recorded, then refused by the hub that has it: done.
        ([(200, '{"state": "running"}')], (409, _err("invalid_state")), 200, 2),
        # Never to be accepted: no second attempt.
        ([], (401, _err("token_revoked")), 401, 1),
        ([], (403, _err("not_task_owner")), 403, 1),
        ([], (409, _err("invalid_state")), 409, 1),
        ([], (400, _err("schema_violation")), 400, 1),
        # Still "not now" at the deadline: the last error.
        ([], (503, _err("degraded")), 503, None),
    ],
)
def test_sdk_repeats_a_report_until_acknowledged(
    script: list[tuple[int, str]], last: tuple[int, str], outcome: int, calls: int | None
) -> None:
    server = _scripted(script, last)
    client = GatewayClient(f"http://127.0.0.1:{server.server_port}", "t.e.k", renew_before_s=0)
    started = time.monotonic()
    try:
        try:
            got = client.report_result("t1", {"n": 1}, deadline=time.time() + 1.5)
            status = 200
            assert got["state"] in ("succeeded", "running")
        except HubError as e:
            status = e.status
    finally:
        server.shutdown()
        server.server_close()
    assert status == outcome
    if calls is not None:
        assert server.calls == calls
    else:
        assert server.calls > 3 and 1.3 < time.monotonic() - started < 4


def test_a_background_task_handed_over_again_gets_its_result_directly() -> None:
    """What a restarted hub sees when it re-attaches a background agent that has finished:
    the result in the answer, whatever became of the report (here: no hub to take it)."""
    from gateway.sdk import Agent

    agent = Agent("later", env={})
    agent.background_task(lambda input, ctx: {"twice": input["n"] * 2})
    body = {"task_id": "t-1", "input": {"n": 21}, "deadline": time.time() + 1}
    assert agent.handle_task(body)[0] == 202
    deadline = time.monotonic() + 5
    while (answer := agent.handle_task(body))[0] == 202:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert answer == (200, {"output": {"twice": 42}})


def test_sdk_report_without_a_deadline_is_one_attempt() -> None:
    server = _scripted([], (503, _err("degraded")))
    client = GatewayClient(f"http://127.0.0.1:{server.server_port}", "t.e.k", renew_before_s=0)
    try:
        with pytest.raises(HubError):
            client.report_result("t1", {"n": 1})
    finally:
        server.shutdown()
        server.server_close()
    assert server.calls == 1


async def _until(
    probe: Callable[[], Any], *, ready: Callable[[Any], Any] = bool, within_s: float = 10
) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if ready(value):
            return value
        assert time.monotonic() < deadline, f"not ready: {value!r}"
        await asyncio.sleep(0.02)
