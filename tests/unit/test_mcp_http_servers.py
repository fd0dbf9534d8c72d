"""MCP servers behind the hub without an engine: Streamable HTTP, progress and cancel.

The example server ``examples/agents/counter`` (the official SDK's server under uvicorn)
runs as a local process where the engine would run its container: first under the hub's
MCP client alone (``HttpConnection``), then behind a real hub that the SDK's client calls
at ``/mcp`` in each revision it speaks. The stdio connection's progress routing and cancel
are driven over a socket pair in Docker's attach framing. The same paths on the real
engine are in tests/integration/test_mcp_servers_docker.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from gateway.agents.mcp import HttpConnection, McpClient, McpServerError, StdioConnection
from gateway.containers.backend import LABEL_AGENT, ContainerHandle, ContainerSpec
from gateway.http.app import HUB, create_app
from gateway.http.mcp import MCP_DOOR
from tests.conftest import REPO, FakeBackend, make_settings
from tests.mcpclient import REVISIONS, mcp_client

pytestmark = pytest.mark.timeout(90)
SERVER = REPO / "examples" / "agents" / "counter" / "server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CounterProcess:
    """The example server as a local process, its stderr lines kept."""

    port: int
    process: asyncio.subprocess.Process
    stderr: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, port: int | None = None) -> CounterProcess:
        port = port or free_port()
        env = {**os.environ, "AGENT_PORT": str(port), "COUNTER_MCP_HOST": "127.0.0.1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SERVER),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        server = cls(port, process)
        server._reader = asyncio.create_task(server._read())
        return server

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        await self.process.wait()
        if self._reader is not None:
            await self._reader

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


async def until(check: Any, timeout_s: float = 10.0) -> None:
    """Wait until ``check()`` holds; fail if it does not within ``timeout_s``."""
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


async def _ready(client: McpClient) -> None:
    # The process listens a moment after it starts (as a container does).
    for _ in range(300):
        try:
            await client.initialize(5)
            return
        except McpServerError:
            client.connection._broken = None  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
    raise AssertionError("the counter server never answered")


@pytest.fixture
async def counter() -> AsyncIterator[tuple[CounterProcess, McpClient]]:
    """The example server and the hub's client of it, initialized."""
    server = await CounterProcess.start()
    client = McpClient(HttpConnection(server.url, agent="counter"), agent="counter")
    try:
        await _ready(client)
        yield server, client
    finally:
        await client.close()
        await server.stop()


# --- the hub's client of a Streamable HTTP server -------------------------------------------


async def test_the_http_client_lists_and_calls_the_example(
    counter: tuple[CounterProcess, McpClient],
) -> None:
    _, client = counter
    assert client.server_info["name"] == "counter"
    tools = {t["name"]: t for t in await client.list_tools(5)}
    assert set(tools) == {"count", "upper"}
    assert tools["count"]["inputSchema"]["required"] == ["to"]
    result = await client.call_tool("upper", {"text": "abc"}, 5)
    assert result["structuredContent"] == {"text": "ABC"} and not result["isError"]
    # An event over aiohttp's line limit (512 KiB: two copies of the text) is read whole.
    big = await client.call_tool("upper", {"text": "x" * 300_000}, 10)
    assert big["structuredContent"] == {"text": "X" * 300_000}


async def test_the_servers_progress_reaches_the_callback(
    counter: tuple[CounterProcess, McpClient],
) -> None:
    _, client = counter
    notes: list[dict[str, Any]] = []
    result = await client.call_tool("count", {"to": 3, "delay_ms": 10}, 5, notes.append)
    assert result["structuredContent"] == {"counted": 3}
    assert notes == [
        {"progress": 1.0, "total": 3.0, "message": "counted 1 of 3"},
        {"progress": 2.0, "total": 3.0, "message": "counted 2 of 3"},
        {"progress": 3.0, "total": 3.0, "message": "counted 3 of 3"},
    ]
    # Without a callback no token is sent, and the server reports nothing.
    assert (await client.call_tool("count", {"to": 2}, 5))["structuredContent"] == {"counted": 2}


async def test_cancelling_a_call_cancels_it_on_the_server(
    counter: tuple[CounterProcess, McpClient], caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    server, client = counter
    notes: list[dict[str, Any]] = []
    call = asyncio.ensure_future(
        client.call_tool("count", {"to": 500, "delay_ms": 20}, 30, notes.append)
    )
    await until(lambda: len(notes) >= 2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The server was told (notifications/cancelled with our request id) and stopped counting.
    await until(lambda: any("count cancelled at" in line for line in server.stderr))
    assert any(r.getMessage() == "MCP call cancelled" for r in caplog.records)
    seen = len(notes)
    await asyncio.sleep(0.2)
    assert len(notes) == seen and seen < 500
    # The connection is as good as before.
    assert client.connection.broken is None
    result = await client.call_tool("upper", {"text": "still here"}, 5)
    assert result["structuredContent"] == {"text": "STILL HERE"}


async def test_a_server_that_lost_our_session_breaks_the_connection(
    counter: tuple[CounterProcess, McpClient],
) -> None:
    # A restarted server answers the old session id with 404 (the spec: initialize again);
    # a broken connection is what makes the pool start a fresh server for the next call.
    server, client = counter
    await server.stop()
    restarted = await CounterProcess.start(server.port)
    try:
        for _ in range(300):
            try:
                await client.call_tool("upper", {"text": "a"}, 5)
            except McpServerError as e:
                if "ended its session" in e.message:
                    break
                client.connection._broken = None  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        assert client.connection.broken == "the server ended its session (HTTP 404)"
    finally:
        await restarted.stop()


# --- the stdio connection, over a socket pair in the attach framing ---------------------------


def _frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0, 0, 0]) + struct.pack(">I", len(payload)) + payload


async def test_stdio_routes_progress_and_sends_cancel_with_our_id() -> None:
    hub_side, server_side = socket.socketpair()
    connection = StdioConnection(hub_side, agent="fake")
    await connection.open()
    client = McpClient(connection, agent="fake")
    reader, writer = await asyncio.open_connection(sock=server_side)

    async def read_message() -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(reader.readline(), 5)))

    async def send(message: dict[str, Any]) -> None:
        writer.write(_frame(1, json.dumps(message).encode() + b"\n"))
        await writer.drain()

    try:
        notes: list[dict[str, Any]] = []
        call = asyncio.ensure_future(client.call_tool("count", {"to": 9}, 10, notes.append))
        request = await read_message()
        token = request["params"]["_meta"]["progressToken"]
        progress = {"progressToken": token, "progress": 1, "total": 9, "message": "one"}
        await send({"jsonrpc": "2.0", "method": "notifications/progress", "params": progress})
        # A report for a token that is not this call's goes nowhere.
        other = {**progress, "progressToken": "someone-else", "progress": 5}
        await send({"jsonrpc": "2.0", "method": "notifications/progress", "params": other})
        await until(lambda: bool(notes))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        cancelled = await read_message()
        assert cancelled["method"] == "notifications/cancelled"
        assert cancelled["params"]["requestId"] == request["id"]
        assert notes == [{"progress": 1.0, "total": 9.0, "message": "one"}]
        # A late answer to the cancelled request is dropped; the connection still works.
        result = {"content": [], "structuredContent": {"counted": 9}}
        await send({"jsonrpc": "2.0", "id": request["id"], "result": result})
        second = asyncio.ensure_future(client.call_tool("upper", {"text": "a"}, 10))
        again = await read_message()
        assert "_meta" not in again["params"]  # no callback, no token
        answer = {"content": [{"type": "text", "text": "A"}], "structuredContent": {"text": "A"}}
        await send({"jsonrpc": "2.0", "id": again["id"], "result": answer})
        assert (await second)["structuredContent"] == {"text": "A"}
        assert connection.broken is None
    finally:
        writer.close()
        await client.close()


# --- behind a real hub: the SDK's client at /mcp ------------------------------------------------


@dataclass
class CounterBackend(FakeBackend):
    """The fake backend, with the counter image's containers as local processes.

    ``slow_start_s`` delays each start; as the engine's (a call in an executor thread), a
    start the caller stops waiting for still creates its container.
    """

    processes: dict[str, CounterProcess] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    slow_start_s: float = 0.0

    async def start(self, spec: ContainerSpec) -> ContainerHandle:
        if not spec.labels[LABEL_AGENT].startswith("counter"):
            return await super().start(spec)
        self.started.append(spec)
        return await asyncio.shield(asyncio.ensure_future(self._create(spec)))

    async def _create(self, spec: ContainerSpec) -> ContainerHandle:
        await asyncio.sleep(self.slow_start_s)
        server = await CounterProcess.start()
        cid = f"counter{len(self.created) + 1}"
        self.processes[cid] = server
        self.labels[cid] = dict(spec.labels)
        self.created[cid] = time.time()
        return ContainerHandle(id=cid, name=spec.name, address="127.0.0.1", port=server.port)

    async def is_running(self, container_id: str) -> bool:
        return container_id in self.processes or await super().is_running(container_id)

    async def remove(self, container_id: str) -> None:
        server = self.processes.pop(container_id, None)
        if server is None:
            await super().remove(container_id)
            return
        await server.stop()
        self.removed.append(container_id)

    async def list_managed(self, hub_id: str | None = None) -> list[dict[str, Any]]:
        # "created" as the engine reports it: the orphan scan spares a container that young
        # (the pool registers a server only once it has started and listed its tools).
        mine = [
            {
                "id": cid,
                "name": cid,
                "labels": self.labels[cid],
                "state": "running",
                "created": self.created[cid],
            }
            for cid in self.processes
        ]
        return [*mine, *await super().list_managed(hub_id)]

    def stderr(self) -> list[str]:
        return [line for p in self.processes.values() for line in p.stderr]


ONCE = """
  - name: counter-once
    protocol: mcp
    transport: http
    image: agent-gateway/counter:dev
    port: 8000
    tools: [count, upper]
    isolation: per_call
"""


@pytest.fixture
async def counter_hub(
    tmp_path: Any, keys: dict[str, str], aiohttp_server: Any
) -> AsyncIterator[tuple[Any, CounterBackend, str]]:
    """A hub on a real port with the counter backend: (server, backend, the /mcp URL); its
    stop must leave no server process behind."""
    backend = CounterBackend()
    # The shipped registry, plus the same server with a process per call.
    agents = tmp_path / "agents.yaml"
    agents.write_text((REPO / "agents.yaml").read_text() + ONCE)
    settings = make_settings(tmp_path, agents_file=agents)
    server = await aiohttp_server(create_app(settings, backend=backend))
    left: list[str] = []
    try:
        yield server, backend, f"http://127.0.0.1:{server.port}/mcp"
        await server.close()
        left = list(backend.processes)
    finally:
        for process in list(backend.processes.values()):
            await process.stop()
    assert not left, f"the hub left MCP server processes behind: {left}"


async def test_the_hub_lists_and_calls_an_http_server(
    counter_hub: Any, keys: dict[str, str], monkeypatch: Any
) -> None:
    server, backend, url = counter_hub
    hub = server.app[HUB]
    async with mcp_client(url, keys["user"], "2025-11-25", monkeypatch) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert {"counter.count", "counter.upper"} <= set(listed)
        assert "runs in a container" in (listed["counter.count"].description or "")
        upper = await client.call_tool("counter.upper", {"text": "through the hub"})
        assert not upper.is_error, upper
        assert upper.structured_content == {"text": "THROUGH THE HUB"}
        record = await hub.decisions.get(upper.meta["io.agent-gateway/decision_id"])  # type: ignore[index]
        assert record["kind"] == "tool"
        assert record["input"]["tool"]["arguments"] == {"text": "through the hub"}
        bad = await client.call_tool("counter.count", {"to": 0})
        assert bad.is_error
        error = bad.structured_content["error"]  # type: ignore[index]
        assert error["code"] == "schema_violation"
        assert [d["pointer"] for d in error["details"]] == ["/to"]
    # Listing started a server for the listing alone; the call one of the caller's own.
    started = [s.labels[LABEL_AGENT] for s in backend.started]
    assert started.count("counter") == 2 and len(backend.processes) == 1


@pytest.mark.parametrize("revision", REVISIONS)
async def test_the_servers_progress_reaches_the_client(
    counter_hub: Any, keys: dict[str, str], revision: str, monkeypatch: Any
) -> None:
    _, _, url = counter_hub
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total, message))

    async with mcp_client(url, keys["user"], revision, monkeypatch) as client:
        result = await client.call_tool(
            "counter.count", {"to": 4, "delay_ms": 20}, progress_callback=progress
        )
        assert result.structured_content == {"counted": 4}, result
        # The server's own reports, under the client's token: not the task-state kind.
        assert seen == [(float(n), 4.0, f"counted {n} of 4") for n in range(1, 5)]
        seen.clear()
        plain = await client.call_tool("counter.count", {"to": 2})
        assert plain.structured_content == {"counted": 2} and seen == []


@pytest.mark.parametrize("revision", REVISIONS)
async def test_cancelling_a_call_cancels_it_on_the_server_behind_the_hub(
    counter_hub: Any, keys: dict[str, str], revision: str, monkeypatch: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    server, backend, url = counter_hub
    door = server.app[MCP_DOOR]
    steps: list[float] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        steps.append(value)

    async with mcp_client(url, keys["user"], revision, monkeypatch) as client:
        warm = await client.call_tool("counter.upper", {"text": "a"})
        assert not warm.is_error, warm
        started = len(backend.started)
        with anyio.move_on_after(30) as scope:
            call = asyncio.ensure_future(
                client.call_tool(
                    "counter.count", {"to": 1000, "delay_ms": 20}, progress_callback=progress
                )
            )
            await until(lambda: len(steps) >= 2)
            # legacy: notifications/cancelled, forwarded with the server-side id;
            # 2026-07-28: the POST is aborted, which the hub sees within its poll interval.
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        assert not scope.cancelled_caught
        await until(lambda: any("count cancelled at" in line for line in backend.stderr()))
        await until(
            lambda: any(r.getMessage() == "mcp tool call cancelled" for r in caplog.records)
        )
        assert all(not s.server_calls for s in door.sessions._sessions.values())
        # The same server process serves the next call: cancelling did not break it.
        again = await client.call_tool("counter.upper", {"text": "b"})
        assert again.structured_content == {"text": "B"}
        assert len(backend.started) == started and len(backend.processes) == 1


async def test_a_call_cancelled_while_its_server_starts_leaves_no_server(
    counter_hub: Any, keys: dict[str, str], monkeypatch: Any
) -> None:
    server, backend, url = counter_hub
    pool = server.app[HUB].tools.pool
    async with mcp_client(url, keys["user"], "2025-11-25", monkeypatch) as client:
        first = await client.call_tool("counter-once.upper", {"text": "a"})
        assert first.structured_content == {"text": "A"}, first
        await until(lambda: not backend.processes)  # per_call: each server stopped after
        backend.slow_start_s = 0.5
        before = len(backend.started)
        call = asyncio.ensure_future(client.call_tool("counter-once.upper", {"text": "b"}))
        await until(lambda: len(backend.started) > before)
        call.cancel()  # while the engine is still creating its container
        with pytest.raises(asyncio.CancelledError):
            await call
        # The start ran to its end, and the server nobody waits for any more was stopped.
        await until(lambda: len(backend.created) == before + 1 and not backend.processes, 20)
        assert len(pool) == 0
        backend.slow_start_s = 0.0
        again = await client.call_tool("counter-once.upper", {"text": "c"})
        assert again.structured_content == {"text": "C"}, again
