"""The lean HTTP/1.1 client the hub hands tasks and messages to agents with, and probes them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.agents import Accepted, AgentReplyError
from gateway.agents import wire as wire_module
from gateway.agents.wire import AgentWire
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentTimeout, AgentUnavailable, AgentUnreachable
from tests.conftest import load_example


@pytest.fixture
async def wire() -> AsyncIterator[AgentWire]:
    w = AgentWire()
    yield w
    await w.close()


@pytest.fixture
async def serve(
    aiohttp_server: Any,
) -> Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[Any]]:
    async def make(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        app = web.Application()
        app.router.add_post("/message", handler)
        server = await aiohttp_server(app)
        return ContainerHandle(id="x", name="fake", address="127.0.0.1", port=server.port)

    return make


async def requests_on(reader: asyncio.StreamReader) -> AsyncIterator[None]:
    """One item per request head read on a kept-alive connection, until the client closes it."""
    while True:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        yield None


async def answer_ok(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()


async def test_posts_to_an_sdk_agent_over_one_kept_alive_connection(wire: AgentWire) -> None:
    server = load_example("echo").serve_in_thread()
    handle = ContainerHandle(id="x", name="echo", address="127.0.0.1", port=server.server_port)
    try:
        message = {"type": "request", "kind": "ping", "payload": {"n": 1}, "from": {"agent": "a"}}
        first = await wire.post(handle, "/message", message, 5)
        conn = wire._idle[("127.0.0.1", server.server_port)][0]
        second = await wire.post(handle, "/message", {**message, "payload": {"n": 2}}, 5)
        assert first["reply"]["echo"] == {"n": 1}
        assert second["reply"]["echo"] == {"n": 2}
        assert wire._idle[("127.0.0.1", server.server_port)] == [conn]  # reused, not reopened
        wire.forget(handle)
        assert ("127.0.0.1", server.server_port) not in wire._idle
    finally:
        server.shutdown()
        server.server_close()


async def test_chunked_reply(wire: AgentWire, serve: Any) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        resp.content_type = "application/json"
        await resp.prepare(request)
        await resp.write(b'{"reply": ')
        await resp.write(json.dumps(await request.json()).encode() + b"}")
        await resp.write_eof()
        return resp

    handle = await serve(chunked)
    assert await wire.post(handle, "/message", {"a": [1, 2]}, 5) == {"reply": {"a": [1, 2]}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (202, {"accepted": True}, Accepted({"accepted": True})),
        (422, {"error": {"code": "bad_kind", "message": "no"}}, "bad_kind"),
        (500, "not json", "non-JSON"),
    ],
    ids=["202 accepted", "agent error", "non-json"],
)
async def test_statuses(wire: AgentWire, serve: Any, status: int, body: Any, expected: Any) -> None:
    async def answer(request: web.Request) -> web.Response:
        if isinstance(body, str):
            return web.Response(text=body, status=status)
        return web.json_response(body, status=status)

    handle = await serve(answer)
    if isinstance(expected, Accepted):
        assert await wire.post(handle, "/message", {}, 5) == expected
        return
    with pytest.raises(AgentReplyError) as info:
        await wire.post(handle, "/message", {}, 5)
    assert expected in info.value.message or expected == info.value.details["agent_error"]["code"]


async def test_timeout_and_unreachable(wire: AgentWire, serve: Any) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    handle = await serve(slow)
    with pytest.raises(AgentTimeout):
        await wire.post(handle, "/message", {}, 0.2)
    assert not wire._idle.get(("127.0.0.1", handle.port))  # a timed-out connection is dropped
    gone = ContainerHandle(id="x", name="gone", address="127.0.0.1", port=1)
    with pytest.raises(AgentUnreachable, match="unreachable"):  # nothing was sent
        await wire.post(gone, "/message", {}, 2)


async def test_connection_closed_by_the_agent_is_not_reused(wire: AgentWire) -> None:
    """Each answer closes its connection (Connection: close, then EOF); every post works."""
    seen = 0

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"reply": 1}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    handle = ContainerHandle(id="x", name="closer", address="127.0.0.1", port=port)
    try:
        for _ in range(3):
            assert await wire.post(handle, "/message", {}, 5) == {"reply": 1}
        assert seen == 3
        assert not wire._idle.get(("127.0.0.1", port))
    finally:
        server.close()
        await server.wait_closed()


async def test_stale_kept_alive_connection_is_retried_once(wire: AgentWire) -> None:
    """The agent answers with keep-alive, then drops the idle connection: the next post
    notices (EOF or reset on the reused connection) and sends again on a new one."""
    connections: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        async for _ in requests_on(reader):
            await answer_ok(writer, b'{"reply": %d}' % len(connections))

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    handle = ContainerHandle(id="x", name="dropper", address="127.0.0.1", port=port)
    try:
        assert await wire.post(handle, "/message", {}, 5) == {"reply": 1}
        connections[0].close()  # the agent drops the idle connection
        assert await wire.post(handle, "/message", {}, 5) == {"reply": 2}
        assert len(connections) == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_a_request_that_reached_the_agent_is_never_called_unreachable(
    wire: AgentWire,
) -> None:
    """Unreachable promises that nothing was sent. A kept-alive connection that takes the
    request and closes without an answer, with the agent gone before the retry connects,
    may have run it: that is AgentUnavailable, not AgentUnreachable."""
    requests = 0
    server: asyncio.Server | None = None

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        async for _ in requests_on(reader):
            requests += 1
            if requests == 2:  # took it, then the agent went away
                assert server is not None
                server.close()
                writer.close()
                return
            await answer_ok(writer, b'{"reply": 1}')

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    handle = ContainerHandle(id="x", name="taker", address="127.0.0.1", port=port)
    try:
        assert await wire.post(handle, "/message", {}, 5) == {"reply": 1}
        with pytest.raises(AgentUnavailable) as caught:
            await wire.post(handle, "/message", {}, 5)
        assert not isinstance(caught.value, AgentUnreachable)
        assert requests == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_get_answers_the_status_over_the_kept_connection(wire: AgentWire) -> None:
    agent = load_example("echo")
    server = agent.serve_in_thread()
    handle = ContainerHandle(id="x", name="echo", address="127.0.0.1", port=server.server_port)
    try:
        assert await wire.get(handle, "/health", 5) == 200
        assert await wire.get(handle, "/nope", 5) == 404
        assert len(wire._idle[("127.0.0.1", handle.port)]) == 1  # one connection, kept
        # The probe's connection carries the hand-off that follows it.
        reply = await wire.post(handle, "/task", {"task_id": "t", "input": {"n": 1}}, 5)
        assert reply["output"]["echo"] == {"n": 1}
        assert len(wire._idle[("127.0.0.1", handle.port)]) == 1
    finally:
        server.shutdown()
        server.server_close()


async def test_connections_their_agents_closed_are_swept(
    wire: AgentWire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed container's kept connection is closed by its end; the next sweep drops
    it, so addresses of containers long gone do not pile up."""
    drop = asyncio.Event()

    async def answer_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await answer_ok(writer, b"{}")
        await drop.wait()  # kept alive until the container "goes"
        writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _ in requests_on(reader):
            await answer_ok(writer, b"{}")

    servers = [
        await asyncio.start_server(answer_then_drop, "127.0.0.1", 0),
        await asyncio.start_server(answer, "127.0.0.1", 0),
    ]
    gone, live = (
        ContainerHandle(
            id=str(i), name="a", address="127.0.0.1", port=s.sockets[0].getsockname()[1]
        )
        for i, s in enumerate(servers)
    )
    try:
        assert await wire.get(gone, "/health", 5) == 200
        assert await wire.get(live, "/health", 5) == 200
        gone_key = ("127.0.0.1", gone.port)
        drop.set()
        for _ in range(200):
            if all(r.at_eof() for r, _ in wire._idle[gone_key]):
                break
            await asyncio.sleep(0.01)
        assert await wire.get(live, "/health", 5) == 200
        assert gone_key in wire._idle  # not swept yet: SWEEP_S has not passed
        monkeypatch.setattr(wire_module, "SWEEP_S", 0.0)
        assert await wire.get(live, "/health", 5) == 200  # this release sweeps
        assert gone_key not in wire._idle
        assert len(wire._idle[("127.0.0.1", live.port)]) == 1
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
