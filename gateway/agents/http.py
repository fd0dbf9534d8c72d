"""The hub's aiohttp client for agents: readiness probe and task hand-off.

Every transport failure leaves as AgentUnavailable and every timeout as AgentTimeout, so
the task router only deals with the gateway's own errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from gateway.agents.base import (
    MAX_REPLY_BYTES,
    MISDIRECTED,
    Accepted,
    AgentReplyError,
    container_headers,
)
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentTimeout, AgentUnavailable, AgentUnreachable

# How long connecting to an agent may take (a live one on the local network: well under 1 ms).
CONNECT_TIMEOUT_S = 1.0


class AgentClient:
    """One pooled aiohttp session for every agent container."""

    def __init__(self, *, probe_interval_s: float = 0.01) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.probe_interval_s = probe_interval_s

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def wait_ready(self, handle: ContainerHandle, timeout_s: float) -> None:
        """Poll ``GET /health`` until it answers 200 or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        url = handle.base_url + "/health"
        headers = container_headers(handle)
        last: str = "no answer"
        while time.monotonic() < deadline:
            try:
                async with self.session.get(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = type(e).__name__
            await asyncio.sleep(self.probe_interval_s)
        raise AgentUnavailable(f"agent {handle.name} not ready after {timeout_s:.1f} s ({last})")

    async def post(
        self, handle: ContainerHandle, path: str, body: dict[str, Any], timeout_s: float
    ) -> Any:
        """POST JSON to the agent; return the decoded body of a 200, or Accepted for a 202."""
        try:
            async with self.session.post(
                handle.base_url + path,
                json=body,
                headers=container_headers(handle),
                # A container that is gone does not refuse: its address just stops answering.
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=CONNECT_TIMEOUT_S),
            ) as resp:
                if resp.status == MISDIRECTED:
                    # Another container has this address now: the task never reached its own.
                    raise AgentUnreachable(
                        f"agent {handle.name} is gone: another container answers at its address"
                    )
                raw = await resp.content.read(MAX_REPLY_BYTES + 1)
                if len(raw) > MAX_REPLY_BYTES:
                    raise AgentReplyError(
                        f"agent reply is over {MAX_REPLY_BYTES} bytes", status=resp.status
                    )
                try:
                    payload = json.loads(raw)
                except ValueError:
                    raise AgentReplyError(
                        f"agent replied with non-JSON (HTTP {resp.status})", status=resp.status
                    ) from None
                if resp.status == 202:
                    return Accepted(payload)
                if resp.status != 200:
                    err = payload.get("error") if isinstance(payload, dict) else None
                    message = err.get("message") if isinstance(err, dict) else None
                    raise AgentReplyError(
                        f"agent answered HTTP {resp.status}: {message or 'error'}",
                        status=resp.status,
                        agent_error=err,
                    )
                return payload
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise AgentUnreachable(f"agent {handle.name} unreachable: {e}") from e
        except TimeoutError as e:
            raise AgentTimeout(
                f"agent {handle.name} did not answer within {timeout_s:.1f} s"
            ) from e
        except aiohttp.ClientError as e:
            raise AgentUnavailable(f"agent {handle.name} unreachable: {e}") from e
