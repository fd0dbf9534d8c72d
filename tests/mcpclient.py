"""The official MCP SDK client, pointed at a hub's /mcp with an API key, at one revision."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import mcp.client.session as sdk_session
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

# What the pinned client speaks: the two handshake revisions it can offer, and the
# stateless one it reaches through server/discover ("auto").
REVISIONS = ("2025-06-18", "2025-11-25", "2026-07-28")


@contextlib.asynccontextmanager
async def mcp_client(
    url: str, key: str | None, revision: str, monkeypatch: Any
) -> AsyncIterator[Client]:
    """An entered SDK ``Client`` that negotiated ``revision`` with the server at ``url``."""
    if revision in ("2025-06-18", "2025-11-25"):
        # The client offers its newest handshake revision; an older one is offered by
        # changing that constant, exactly what an older client release would send.
        monkeypatch.setattr(sdk_session, "LATEST_HANDSHAKE_VERSION", revision)
        mode = "legacy"
    else:
        mode = "auto"  # probes server/discover, adopts 2026-07-28
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode) as client:
            assert client.protocol_version == revision
            yield client
