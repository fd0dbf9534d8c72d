"""The hub as an MCP client of one MCP server in a container (``protocol: mcp``).

Two connections, one contract (``McpConnection.request``):

- ``StdioConnection``: the container's stdin and stdout through a Docker attach socket,
  newline-delimited JSON-RPC as the stdio transport defines it. The SDK's stdio client only
  spawns local subprocesses (``anyio.open_process``), so the framing here is our own: the
  attach stream is Docker's multiplexed format (8-byte frame headers, stdout and stderr
  apart), read on the event loop; stderr lines go to the hub's log tagged with the agent.
- ``HttpConnection``: Streamable HTTP (``transport: http``): one POST per message, answered
  with JSON or an event stream.

``McpClient`` speaks the protocol over either: ``initialize`` (revision 2025-11-25), the
paginated ``tools/list`` and ``tools/call``, the results parsed with the SDK's types
(``mcp_types``). A server that exits, does not answer in time or writes a line that is not
JSON-RPC breaks its connection: every call in flight fails with ``McpServerError`` (or
``AgentTimeout``) saying which, and the pool replaces it on the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import mcp_types as types
from pydantic import ValidationError

from gateway import __version__
from gateway.errors import AgentError, AgentTimeout
from gateway.logs import get_logger

log = get_logger(__name__)
PROTOCOL_VERSION = "2025-11-25"
# A stdout line longer than this is garbage, not a message (and would exhaust memory).
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_STDERR_LINE = 2000
MAX_TOOL_PAGES = 50


class McpServerError(AgentError):
    """The MCP server broke the protocol, exited, or refused us (502 ``agent_error``)."""


class McpConnection(Protocol):
    """One live connection to an MCP server."""

    async def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send a JSON-RPC request; its response message (result or error)."""
        ...

    async def notify(self, message: dict[str, Any]) -> None:
        """Send a JSON-RPC notification."""
        ...

    @property
    def broken(self) -> str | None:
        """Why the connection cannot be used any more, or None."""
        ...

    async def close(self) -> None:
        """Release the connection (the container is the pool's)."""
        ...


class StdioConnection:
    """JSON-RPC lines over a Docker attach socket (stdin in, multiplexed stdout/stderr out)."""

    def __init__(self, sock: socket.socket, *, agent: str, keep: Any = None) -> None:
        self.agent = agent
        self._sock = sock
        self._keep = keep  # the engine client's response objects, closed with us
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int | str, asyncio.Future[dict[str, Any]]] = {}
        self._pump: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._write_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Start reading the attach stream."""
        self._reader, self._writer = await asyncio.open_connection(
            sock=self._sock, limit=MAX_LINE_BYTES
        )
        self._pump = asyncio.create_task(self._read_loop(), name=f"mcp-stdio-{self.agent}")

    @property
    def broken(self) -> str | None:
        return self._broken

    def _break(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
            log.warning("MCP server connection broken", extra={"agent": self.agent, "why": why})
        for future in self._pending.values():
            if not future.done():
                future.set_exception(McpServerError(f"MCP server {self.agent}: {why}"))
        self._pending.clear()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        out = bytearray()
        err = bytearray()
        try:
            while True:
                header = await self._reader.readexactly(8)
                kind, size = header[0], struct.unpack(">I", header[4:])[0]
                payload = await self._reader.readexactly(size)
                if kind == 2:
                    err += payload
                    *lines, rest = err.split(b"\n")
                    err[:] = rest
                    for line in lines:
                        self._stderr(line)
                    continue
                if kind != 1:
                    continue
                out += payload
                if len(out) > MAX_LINE_BYTES:
                    self._break(f"wrote a stdout line over {MAX_LINE_BYTES} bytes")
                    return
                *lines, rest = out.split(b"\n")
                out[:] = rest
                for line in lines:
                    if line.strip() and not self._dispatch(line):
                        return
        except asyncio.IncompleteReadError:
            if err:
                self._stderr(bytes(err))
            self._break("the server exited (its stdout closed)")
        except (OSError, ConnectionError) as e:
            self._break(f"the connection to the server failed: {e}")
        except asyncio.CancelledError:
            self._break("the connection was closed")
            raise

    def _stderr(self, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace").rstrip()[:MAX_STDERR_LINE]
        if text:
            log.info("mcp server stderr", extra={"agent": self.agent, "stderr": text})

    def _dispatch(self, line: bytes) -> bool:
        try:
            message = json.loads(line)
        except ValueError:
            shown = line[:120].decode("utf-8", errors="replace")
            self._break(f"wrote a line to stdout that is not JSON-RPC: {shown!r}")
            return False
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            self._break("wrote a message to stdout that is not JSON-RPC 2.0")
            return False
        if "method" in message:
            # Server requests (sampling, roots, elicitation) and notifications: none is
            # offered in our capabilities, so requests are refused and the rest dropped.
            if "id" in message:
                reply = {
                    "jsonrpc": "2.0",
                    "id": message["id"],
                    "error": {"code": -32601, "message": "the gateway offers no client features"},
                }
                refusal = asyncio.create_task(self._send(reply))
                self._background.add(refusal)
                refusal.add_done_callback(self._background.discard)
            return True
        future = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(message)
        return True

    async def _send(self, message: dict[str, Any]) -> None:
        if self._broken is not None:
            raise McpServerError(f"MCP server {self.agent}: {self._broken}")
        assert self._writer is not None
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        try:
            async with self._write_lock:
                self._writer.write(data)
                await self._writer.drain()
        except (OSError, ConnectionError) as e:
            self._break(f"writing to its stdin failed: {e}")
            raise McpServerError(f"MCP server {self.agent}: {self._broken}") from e

    async def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        try:
            await self._send(message)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            # A server that does not answer may hold state we cannot trust: replace it.
            self._break(f"no answer to {message.get('method')} within {timeout_s:g} s")
            raise AgentTimeout(
                f"MCP server {self.agent} did not answer {message.get('method')} within "
                f"{timeout_s:g} s; it is restarted on the next call"
            ) from None
        finally:
            self._pending.pop(message["id"], None)

    async def notify(self, message: dict[str, Any]) -> None:
        await self._send(message)

    async def close(self) -> None:
        if self._broken is None:
            self._broken = "the connection was closed"
        self._break(self._broken)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
        if self._writer is not None:
            self._writer.close()
        with contextlib.suppress(Exception):
            self._sock.close()
        with contextlib.suppress(Exception):
            if self._keep is not None:
                self._keep.close()


class HttpConnection:
    """Streamable HTTP: one POST per message; a JSON or event-stream answer."""

    def __init__(self, url: str, *, agent: str) -> None:
        self.url = url
        self.agent = agent
        self._http = aiohttp.ClientSession()
        self._session_id: str | None = None
        self._version: str | None = None
        self._broken: str | None = None

    @property
    def broken(self) -> str | None:
        return self._broken

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream"}
        if self._session_id:
            headers["Mcp-Session-Id"] = self._session_id
        if self._version:
            headers["MCP-Protocol-Version"] = self._version
        return headers

    async def _post(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        try:
            async with self._http.post(
                self.url,
                json=message,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if "Mcp-Session-Id" in response.headers:
                    self._session_id = response.headers["Mcp-Session-Id"]
                if response.status == 202:
                    return None
                ctype = response.content_type
                if ctype == "text/event-stream":
                    return await self._from_events(response, message.get("id"))
                if ctype != "application/json":
                    raise McpServerError(
                        f"MCP server {self.agent} answered HTTP {response.status} {ctype}"
                    )
                body = await response.json()
        except TimeoutError:
            self._broken = f"no answer within {timeout_s:g} s"
            raise AgentTimeout(
                f"MCP server {self.agent} did not answer {message.get('method')} within "
                f"{timeout_s:g} s; it is restarted on the next call"
            ) from None
        except (aiohttp.ClientError, ValueError) as e:
            self._broken = f"HTTP request failed: {e}"
            raise McpServerError(f"MCP server {self.agent}: {self._broken}") from e
        if not isinstance(body, dict):
            raise McpServerError(f"MCP server {self.agent} answered with a non-object")
        return body

    async def _from_events(
        self, response: aiohttp.ClientResponse, request_id: Any
    ) -> dict[str, Any]:
        async for raw in response.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            try:
                message = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
        raise McpServerError(f"MCP server {self.agent} closed its event stream without a reply")

    async def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        body = await self._post(message, timeout_s)
        if body is None:
            raise McpServerError(f"MCP server {self.agent} answered a request with 202")
        if message.get("method") == "initialize":
            version = (body.get("result") or {}).get("protocolVersion")
            self._version = version if isinstance(version, str) else None
        return body

    async def notify(self, message: dict[str, Any]) -> None:
        await self._post(message, 10.0)

    async def close(self) -> None:
        self._broken = self._broken or "closed"
        await self._http.close()


class McpClient:
    """The protocol over one connection: handshake, tool list, tool calls."""

    def __init__(self, connection: McpConnection, *, agent: str) -> None:
        self.connection = connection
        self.agent = agent
        self._next_id = 0
        self.server_info: dict[str, Any] = {}

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _call(self, method: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        message = {"jsonrpc": "2.0", "id": self._id(), "method": method, "params": params}
        reply = await self.connection.request(message, timeout_s)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise McpServerError(
                f"MCP server {self.agent} answered {method} with error "
                f"{error.get('code')}: {str(error.get('message'))[:300]}",
                details={"rpc_error": error},
            )
        result = reply.get("result")
        if not isinstance(result, dict):
            raise McpServerError(f"MCP server {self.agent} answered {method} without a result")
        return result

    async def initialize(self, timeout_s: float) -> None:
        """The handshake: ``initialize``, then ``notifications/initialized``."""
        params = types.InitializeRequestParams(
            protocol_version=PROTOCOL_VERSION,
            capabilities=types.ClientCapabilities(),
            client_info=types.Implementation(name="agent-gateway", version=__version__),
        ).model_dump(by_alias=True, mode="json", exclude_none=True)
        raw = await self._call("initialize", params, timeout_s)
        result = _parse(types.InitializeResult, raw, self.agent, "initialize")
        if result.capabilities.tools is None:
            raise McpServerError(f"MCP server {self.agent} offers no tools capability")
        self.server_info = result.server_info.model_dump(mode="json", exclude_none=True)
        await self.connection.notify({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def list_tools(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every tool the server lists, as JSON (all pages)."""
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_TOOL_PAGES):
            params = {"cursor": cursor} if cursor else {}
            raw = await self._call("tools/list", params, timeout_s)
            page = _parse(types.ListToolsResult, raw, self.agent, "tools/list")
            tools += [
                t.model_dump(by_alias=True, mode="json", exclude_none=True) for t in page.tools
            ]
            cursor = page.next_cursor
            if not cursor:
                return tools
        raise McpServerError(f"MCP server {self.agent} lists more than {MAX_TOOL_PAGES} pages")

    async def call_tool(
        self, name: str, arguments: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """``tools/call``; the ``CallToolResult`` as JSON."""
        raw = await self._call("tools/call", {"name": name, "arguments": arguments}, timeout_s)
        result = _parse(types.CallToolResult, raw, self.agent, "tools/call")
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)

    async def close(self) -> None:
        await self.connection.close()


def _parse(model: Callable[..., Any], raw: dict[str, Any], agent: str, method: str) -> Any:
    try:
        return model.model_validate(raw)  # type: ignore[attr-defined]
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = "/".join(str(p) for p in first.get("loc", ()))
        raise McpServerError(
            f"MCP server {agent} answered {method} with an invalid result "
            f"(at /{where}: {first.get('msg', 'invalid')})"
        ) from None
