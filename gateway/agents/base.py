"""What every client that talks to agent containers shares: the reply types and the contract.

Two implementations sit beside this module: ``http`` (aiohttp: readiness probes and task
hand-offs) and ``wire`` (a lean keep-alive HTTP/1.1 client for routed messages). Both raise
only the gateway's own errors (AgentTimeout, AgentUnavailable, AgentReplyError), so a caller
can use either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.containers.backend import CONTAINER_HEADER, ContainerHandle
from gateway.errors import AgentError

MAX_REPLY_BYTES = 8 * 1024 * 1024
# What an agent answers when the hub's CONTAINER_HEADER names another container: the address
# now belongs to a container that is not the one meant (nothing was run).
MISDIRECTED = 421
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def container_headers(handle: ContainerHandle) -> dict[str, str]:
    """The header naming the container the hub means (none when its hostname is unknown)."""
    host = handle.hostname
    return {CONTAINER_HEADER: host} if host and _HOSTNAME.fullmatch(host) else {}


class AgentReplyError(AgentError):
    """The agent answered with an error (its code and message are kept)."""

    def __init__(self, message: str, *, status: int, agent_error: Any = None) -> None:
        super().__init__(message, details={"agent_status": status, "agent_error": agent_error})


@dataclass(frozen=True)
class Accepted:
    """The agent answered 202: it will report the result later (``POST /v1/tasks/{id}/result``)."""

    body: Any


class AgentTransport(Protocol):
    """POST a JSON body to an agent container and decode its reply."""

    async def post(
        self, handle: ContainerHandle, path: str, body: dict[str, Any], timeout_s: float
    ) -> Any:
        """The decoded body of a 200, ``Accepted`` for a 202; AgentReplyError otherwise."""
        ...

    async def close(self) -> None:
        """Close idle connections."""
        ...
