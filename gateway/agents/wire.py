"""A lean keep-alive HTTP/1.1 client for handing messages to agents (``POST /message``).

Every routed message costs one request to an agent. aiohttp's client spent about 270 µs of
the hub's CPU on each (bench/bench_messages.py); this one, on asyncio streams with a small
pool of idle connections per agent, about 120 µs. It speaks only what a hand-off needs: a
JSON POST, and a reply with ``Content-Length`` or ``Transfer-Encoding: chunked``. Errors
leave as the gateway's own (AgentTimeout, AgentUnavailable, AgentReplyError), exactly as
``AgentClient.post`` raises them, so callers can use either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from gateway.agents.base import (
    MAX_REPLY_BYTES,
    MISDIRECTED,
    Accepted,
    AgentReplyError,
    container_headers,
)
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentTimeout, AgentUnavailable

MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
CONNECT_TIMEOUT_S = 2.0
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Stale(Exception):
    """A reused connection was closed by the agent before it answered: send again."""


class AgentWire:
    """Idle keep-alive connections per agent address; at most ``max_idle`` kept per agent."""

    def __init__(self, *, max_idle: int = 32) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[Conn]] = {}

    async def post(
        self, handle: ContainerHandle, path: str, body: dict[str, Any], timeout_s: float
    ) -> Any:
        """POST JSON; return the decoded body of a 200, or Accepted for a 202."""
        data = json.dumps(body, separators=(",", ":")).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in container_headers(handle).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {handle.address}:{handle.port}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        key = (handle.address, handle.port)
        try:
            async with asyncio.timeout(timeout_s):
                for attempt in (1, 2):
                    conn, reused = await self._acquire(key)
                    try:
                        status, raw, keep = await _exchange(conn, head + data, reused)
                    except _Stale:
                        _close(conn)
                        if attempt == 2:
                            raise AgentUnavailable(
                                f"agent {handle.name} closed the connection"
                            ) from None
                        continue
                    except BaseException:
                        _close(conn)
                        raise
                    if keep:
                        self._release(key, conn)
                    else:
                        _close(conn)
                    break
        except TimeoutError as e:
            raise AgentTimeout(
                f"agent {handle.name} did not answer within {timeout_s:.1f} s"
            ) from e
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise AgentUnavailable(f"agent {handle.name} unreachable: {e}") from e
        if status == MISDIRECTED:
            raise AgentUnavailable(
                f"agent {handle.name} is gone: another container has its address"
            )
        return _decode(status, raw)

    async def _acquire(self, key: tuple[str, int]) -> tuple[Conn, bool]:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return (reader, writer), True
            _close((reader, writer))
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await asyncio.open_connection(*key), False

    def _release(self, key: tuple[str, int], conn: Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            _close(conn)

    def forget(self, handle: ContainerHandle) -> None:
        """Close the idle connections to a container that is going away."""
        for conn in self._idle.pop((handle.address, handle.port), []):
            _close(conn)

    async def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for conn in conns:
                _close(conn)
        self._idle.clear()


async def _exchange(conn: Conn, request: bytes, reused: bool) -> tuple[int, bytes, bool]:
    """Send one request and read its response: (status, body, connection reusable)."""
    reader, writer = conn
    try:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
    except (ConnectionResetError, BrokenPipeError):
        if reused:
            raise _Stale from None
        raise
    if not status_line:
        if reused:
            raise _Stale
        raise ValueError("the agent closed the connection without answering")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x response")
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await reader.readline()
        if len(line) > MAX_HEADER_LINE:
            raise ValueError("response header line too long")
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ValueError("too many response headers")
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = await _read_chunked(reader)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if length > MAX_REPLY_BYTES:
            raise AgentReplyError(f"agent reply is over {MAX_REPLY_BYTES} bytes", status=status)
        body = await reader.readexactly(length)
    else:
        # No length: the body ends with the connection.
        body = await reader.read(MAX_REPLY_BYTES + 1)
        return status, body, False
    keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
    return status, body, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        total += size
        if total > MAX_REPLY_BYTES:
            raise AgentReplyError(f"agent reply is over {MAX_REPLY_BYTES} bytes", status=200)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)  # CRLF after each chunk


def _decode(status: int, raw: bytes) -> Any:
    try:
        payload = json.loads(raw)
    except ValueError:
        raise AgentReplyError(
            f"agent replied with non-JSON (HTTP {status})", status=status
        ) from None
    if status == 202:
        return Accepted(payload)
    if status != 200:
        err = payload.get("error") if isinstance(payload, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        raise AgentReplyError(
            f"agent answered HTTP {status}: {message or 'error'}", status=status, agent_error=err
        )
    return payload


def _close(conn: Conn) -> None:
    with contextlib.suppress(Exception):
        conn[1].close()
