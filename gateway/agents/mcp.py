"""The hub as an MCP client of one MCP server in a container (``protocol: mcp``).

Two connections, one contract (``McpConnection.request``):

- ``StdioConnection``: the container's stdin and stdout through a Docker attach socket,
  newline-delimited JSON-RPC as the stdio transport defines it. The SDK's stdio client only
  spawns local subprocesses (``anyio.open_process``), so the framing here is our own: the
  attach stream is Docker's multiplexed format (8-byte frame headers, stdout and stderr
  apart), read on the event loop; stderr lines go to the hub's log tagged with the agent.
- ``HttpConnection``: Streamable HTTP (``transport: http``): one POST per message, answered
  with JSON or an event stream (what the server sends about that request comes first on it).

``McpClient`` speaks the protocol over either: ``initialize`` (revision 2025-11-25), the
paginated ``tools/list`` and ``tools/call``, the results parsed with the SDK's types
(``mcp_types``). A server that exits, does not answer in time or writes a line that is not
JSON-RPC breaks its connection: every call in flight fails with ``McpServerError`` (or
``AgentTimeout``) saying which, and the pool replaces it on the next call.

A ``tools/call`` made with ``on_progress`` carries a progress token of ours (unique on the
connection, whoever the hub's caller is); the server's ``notifications/progress`` for it
reach the callback. A call cancelled on our side (its asyncio task) sends the server
``notifications/cancelled`` with the id we gave the request and stops waiting: the server
need not answer a cancelled request, and an answer that still comes is dropped. The
connection stays usable.
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
from gateway.errors import AgentError, AgentTimeout, GatewayError
from gateway.logs import get_logger

log = get_logger(__name__)
PROTOCOL_VERSION = "2025-11-25"
# A stdout line longer than this is garbage, not a message (and would exhaust memory).
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_STDERR_LINE = 2000
MAX_TOOL_PAGES = 50
# How long a cancelled call waits to tell the server so (it must not hold its caller up).
CANCEL_NOTIFY_S = 2.0
# A server's notifications/progress params (progress, total, message), for one request.
ProgressFn = Callable[[dict[str, Any]], None]


class McpServerError(AgentError):
    """The MCP server broke the protocol, exited, or refused us (502 ``agent_error``)."""


class McpConnection(Protocol):
    """One live connection to an MCP server."""

    async def request(
        self, message: dict[str, Any], timeout_s: float, on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        """Send a JSON-RPC request; its response message (result or error). The server's
        progress for the request's ``_meta.progressToken`` goes to ``on_progress``."""
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
        self._progress: dict[int | str, ProgressFn] = {}
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
            # Server requests (sampling, roots, elicitation): none is offered in our
            # capabilities, so they are refused. Of the notifications, progress is routed.
            if "id" in message:
                refusal = asyncio.create_task(self._send(_refusal(message["id"])))
                self._background.add(refusal)
                refusal.add_done_callback(self._background.discard)
            else:
                route_progress(message, self._progress.get, self.agent)
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

    async def request(
        self, message: dict[str, Any], timeout_s: float, on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        token = progress_token(message)
        if on_progress is not None and token is not None:
            self._progress[token] = on_progress
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
            if token is not None:
                self._progress.pop(token, None)

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
        self._background: set[asyncio.Task[Any]] = set()

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

    async def _post(
        self,
        message: dict[str, Any],
        timeout_s: float,
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any] | None:
        try:
            async with self._http.post(
                self.url,
                json=message,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if "Mcp-Session-Id" in response.headers:
                    self._session_id = response.headers["Mcp-Session-Id"]
                if response.status == 404 and self._session_id is not None:
                    # The spec's answer to a session the server no longer has: start again.
                    self._broken = "the server ended its session (HTTP 404)"
                    raise McpServerError(f"MCP server {self.agent}: {self._broken}")
                if response.status == 202:
                    return None
                ctype = response.content_type
                if ctype == "text/event-stream":
                    return await self._from_events(response, message.get("id"), on_progress)
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
        self,
        response: aiohttp.ClientResponse,
        request_id: Any,
        on_progress: ProgressFn | None,
    ) -> dict[str, Any]:
        # Server-sent events read by hand: aiohttp's line iterator refuses lines over 512 KiB,
        # and a result can be larger. An event's data lines are joined with newlines.
        buffer = bytearray()
        data: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end]).rstrip(b"\r")
                del buffer[: end + 1]
                if line:
                    field, _, value = line.partition(b":")
                    if field == b"data":
                        data.append(value.removeprefix(b" "))
                        size += len(value)
                    continue
                if data:
                    reply = self._event(b"\n".join(data), request_id, on_progress)
                    data, size = [], 0
                    if reply is not None:
                        return reply
            if len(buffer) + size > MAX_LINE_BYTES:
                raise McpServerError(
                    f"MCP server {self.agent} sent an event over {MAX_LINE_BYTES} bytes"
                )
        if data:
            reply = self._event(b"\n".join(data), request_id, on_progress)
            if reply is not None:
                return reply
        raise McpServerError(f"MCP server {self.agent} closed its event stream without a reply")

    def _event(
        self, raw: bytes, request_id: Any, on_progress: ProgressFn | None
    ) -> dict[str, Any] | None:
        """The reply to ``request_id`` if this event is it; progress and server requests
        are handled on the way."""
        try:
            message = json.loads(raw)
        except ValueError:
            return None  # an event of another kind (the spec allows any)
        if not isinstance(message, dict):
            return None
        if "method" not in message:
            return message if message.get("id") == request_id else None
        if "id" in message:
            refusal = asyncio.create_task(self._post(_refusal(message["id"]), 10.0))
            self._background.add(refusal)
            refusal.add_done_callback(_drop_result(self._background))
        elif on_progress is not None:
            route_progress(message, lambda _token: on_progress, self.agent)
        return None

    async def request(
        self, message: dict[str, Any], timeout_s: float, on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        body = await self._post(message, timeout_s, on_progress)
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
        for task in self._background:
            task.cancel()
        await self._http.close()


class McpClient:
    """The protocol over one connection: handshake, tool list, tool calls."""

    def __init__(self, connection: McpConnection, *, agent: str) -> None:
        self.connection = connection
        self.agent = agent
        self._next_id = 0
        self.server_info: dict[str, Any] = {}
        self._background: set[asyncio.Future[Any]] = set()

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _call(
        self,
        method: str,
        params: dict[str, Any],
        timeout_s: float,
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        request_id = self._id()
        if on_progress is not None:
            # Our token, not the hub caller's: callers sharing a server cannot collide.
            params = {**params, "_meta": {"progressToken": f"agw-{request_id}"}}
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        try:
            reply = await self.connection.request(message, timeout_s, on_progress)
        except asyncio.CancelledError:
            if method != "initialize":  # the spec forbids cancelling the handshake
                await self._cancelled(request_id, method)
            raise
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

    async def _cancelled(self, request_id: int, method: str) -> None:
        """Tell the server a request of ours is cancelled (best effort, bounded)."""
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": "the hub's caller cancelled the call"},
        }
        sent = asyncio.ensure_future(self.connection.notify(note))
        try:
            # Shielded: the task sending it is the one being cancelled.
            await asyncio.wait_for(asyncio.shield(sent), CANCEL_NOTIFY_S)
            log.info(
                "MCP call cancelled", extra={"agent": self.agent, "rpc": method, "id": request_id}
            )
        except (GatewayError, TimeoutError) as e:
            log.info(
                "MCP call cancelled; the server was not told",
                extra={"agent": self.agent, "id": request_id, "error": str(e)[:300]},
            )
        except asyncio.CancelledError:
            self._background.add(sent)  # cancelled again: let the notification go anyway
            sent.add_done_callback(_drop_result(self._background))
            raise

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
        self,
        name: str,
        arguments: dict[str, Any],
        timeout_s: float,
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """``tools/call``; the ``CallToolResult`` as JSON. With ``on_progress``, the server's
        progress reports for the call reach it; cancelling the caller cancels the call."""
        params = {"name": name, "arguments": arguments}
        raw = await self._call("tools/call", params, timeout_s, on_progress)
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


def _refusal(request_id: Any) -> dict[str, Any]:
    """The answer to a server's request: we offer no client features."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": -32601, "message": "the gateway offers no client features"},
    }


def progress_token(message: dict[str, Any]) -> int | str | None:
    """The ``_meta.progressToken`` of a request we send, or None."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, int | str) and not isinstance(token, bool) else None


def route_progress(
    message: dict[str, Any], handler_for: Callable[[Any], ProgressFn | None], agent: str
) -> None:
    """Hand a server's ``notifications/progress`` to the handler of its token, as
    ``{progress, total?, message?}``; anything else, or a malformed one, is dropped."""
    if message.get("method") != "notifications/progress":
        return
    try:
        params = types.ProgressNotificationParams.model_validate(message.get("params"))
    except ValidationError:
        return
    handler = handler_for(params.progress_token)
    if handler is None:
        return
    note: dict[str, Any] = {"progress": params.progress}
    if params.total is not None:
        note["total"] = params.total
    if params.message is not None:
        note["message"] = params.message
    try:
        handler(note)
    except Exception:  # a caller's callback must not break the server's connection
        log.exception("MCP progress handler failed", extra={"agent": agent})


def _drop_result(background: set[Any]) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        background.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: a failed courtesy message is not an error

    return done
