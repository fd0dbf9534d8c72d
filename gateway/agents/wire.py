"""A lean keep-alive HTTP/1.1 client for the hub's requests to agents: task hand-offs
(``POST /task``), routed messages (``POST /message``) and readiness probes (``GET /health``).

Every routed message and every task costs at least one request to an agent. aiohttp's
client spent about 270 µs of the hub's CPU on each (bench/bench_messages.py); this one, on
asyncio streams with a small pool of idle connections per agent, about 120 µs. It speaks
only what a hand-off needs: a JSON POST or a bare GET, and a reply with ``Content-Length``
or ``Transfer-Encoding: chunked``. Errors leave as the gateway's own: AgentTimeout,
AgentReplyError, AgentUnavailable, and its subclass AgentUnreachable when nothing was sent
(no connection could be made, or another container answers at the address), so a task may
be placed elsewhere without running twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from gateway.agents.base import (
    MAX_REPLY_BYTES,
    MISDIRECTED,
    Accepted,
    AgentReplyError,
    container_headers,
)
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentTimeout, AgentUnavailable, AgentUnreachable

MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
CONNECT_TIMEOUT_S = 2.0
# How often idle connections are looked over for ones their agent closed (a removed
# container's): without it the entries of containers that are gone would pile up.
SWEEP_S = 10.0
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Stale(Exception):
    """A reused connection was closed by the agent before it answered: send again."""


class AgentWire:
    """Idle keep-alive connections per agent address; at most ``max_idle`` kept per agent."""

    def __init__(self, *, max_idle: int = 32, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.max_idle = max_idle
        # A live agent on the local network connects in well under a millisecond; a
        # container that is gone does not refuse, its address just stops answering.
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[tuple[str, int], list[Conn]] = {}
        self._swept = time.monotonic()

    async def post(
        self, handle: ContainerHandle, path: str, body: dict[str, Any], timeout_s: float
    ) -> Any:
        """POST JSON; return the decoded body of a 200, or Accepted for a 202."""
        data = json.dumps(body, separators=(",", ":")).encode()
        status, raw = await self._request(handle, "POST", path, data, timeout_s)
        return _decode(status, raw)

    async def get(self, handle: ContainerHandle, path: str, timeout_s: float) -> int:
        """GET ``path``; the answer's status (its body is read and dropped)."""
        status, _ = await self._request(handle, "GET", path, None, timeout_s)
        return status

    async def _request(
        self,
        handle: ContainerHandle,
        method: str,
        path: str,
        data: bytes | None,
        timeout_s: float,
    ) -> tuple[int, bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in container_headers(handle).items())
        if data is not None:
            extra += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {handle.address}:{handle.port}\r\n{extra}\r\n"
        ).encode()
        request = head + data if data is not None else head
        key = (handle.address, handle.port)
        sent = False
        try:
            async with asyncio.timeout(timeout_s):
                for attempt in (1, 2):
                    conn, reused = await self._acquire(handle, key, sent=sent)
                    sent = True
                    try:
                        status, raw, keep = await _exchange(conn, request, reused)
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
            # The SDK ran nothing: the container meant is gone, another has its address.
            raise AgentUnreachable(
                f"agent {handle.name} is gone: another container answers at its address"
            )
        return status, raw

    async def _acquire(
        self, handle: ContainerHandle, key: tuple[str, int], *, sent: bool
    ) -> tuple[Conn, bool]:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return (reader, writer), True
            _close((reader, writer))
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                return await asyncio.open_connection(*key), False
        except (OSError, TimeoutError) as e:
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if sent:  # a kept-alive connection took the request before it broke
                raise AgentUnavailable(f"agent {handle.name} unreachable: {why}") from e
            raise AgentUnreachable(f"agent {handle.name} unreachable: {why}") from e

    def _release(self, key: tuple[str, int], conn: Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            _close(conn)
        now = time.monotonic()
        if now - self._swept >= SWEEP_S:
            self._swept = now
            self._sweep()

    def _sweep(self) -> None:
        """Close and forget the idle connections their agents closed."""
        for key, conns in list(self._idle.items()):
            alive = [c for c in conns if not c[1].is_closing() and not c[0].at_eof()]
            for c in conns:
                if c not in alive:
                    _close(c)
            if alive:
                self._idle[key] = alive
            else:
                del self._idle[key]

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
