"""The lean HTTP/1.1 client the message router hands messages to agents with."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.agents import Accepted, AgentReplyError
from gateway.agents.wire import AgentWire
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentTimeout, AgentUnavailable
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
    with pytest.raises(AgentUnavailable):
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
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            body = b'{"reply": %d}' % len(connections)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

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
