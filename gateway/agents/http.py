"""The hub's client for task containers: readiness probe and task hand-off.

Both go through one ``AgentWire`` (the lean keep-alive client the message router uses too),
so a container's probe and its hand-off share a connection. Every transport failure leaves
as AgentUnavailable (AgentUnreachable when nothing reached the agent) and every timeout as
AgentTimeout, so the task router only deals with the gateway's own errors.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.agents.wire import AgentWire
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentTimeout, AgentUnavailable

# How long connecting to an agent may take (a live one on the local network: well under 1 ms).
CONNECT_TIMEOUT_S = 1.0
# How long one probe may take before the next is tried.
PROBE_TIMEOUT_S = 1.0


class AgentClient:
    """Probes and hand-offs to agent containers over kept-alive connections."""

    def __init__(self, *, probe_interval_s: float = 0.01) -> None:
        self.wire = AgentWire(connect_timeout_s=CONNECT_TIMEOUT_S)
        self.probe_interval_s = probe_interval_s

    async def close(self) -> None:
        await self.wire.close()

    async def wait_ready(self, handle: ContainerHandle, timeout_s: float) -> None:
        """Poll ``GET /health`` until it answers 200 or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        last: str = "no answer"
        while (left := deadline - time.monotonic()) > 0:
            try:
                status = await self.wire.get(handle, "/health", min(PROBE_TIMEOUT_S, left))
            except (AgentUnavailable, AgentTimeout) as e:
                last = e.message
            else:
                if status == 200:
                    return
                last = f"HTTP {status}"
            await asyncio.sleep(self.probe_interval_s)
        raise AgentUnavailable(f"agent {handle.name} not ready after {timeout_s:.1f} s ({last})")

    async def post(
        self, handle: ContainerHandle, path: str, body: dict[str, Any], timeout_s: float
    ) -> Any:
        """POST JSON to the agent; return the decoded body of a 200, or Accepted for a 202.

        AgentUnreachable: nothing reached the agent (no connection, or another container
        answers at its address), so the task may be placed again without running twice.
        """
        return await self.wire.post(handle, path, body, timeout_s)

    def forget(self, handle: ContainerHandle) -> None:
        """Close the kept connections to a container that is being removed."""
        self.wire.forget(handle)
