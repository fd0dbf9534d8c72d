"""The MCP door: the hub as an MCP server (Streamable HTTP at ``/mcp``).

- ``transport``: the aiohttp handlers, Origin and key checks, sessions per revision
- ``sessions``: the handshake-era sessions (2025-06-18, 2025-11-25)
- ``tools``: every agent capability as a tool, filtered by the dispatch policy

Agents reach ``/mcp`` with their JWT-SVID on either listener (``setup_agent_mcp_routes``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import NotFound
from gateway.http.agent_routes import presents_svid
from gateway.http.mcp.transport import (
    MCP_DOOR,
    METADATA_PATH,
    McpDoor,
    delete_mcp,
    get_mcp,
    post_mcp,
    protected_resource,
)
from gateway.hub import Hub


def setup_mcp_routes(app: web.Application, hub: Hub) -> McpDoor:
    """Add ``/mcp`` and its protected-resource metadata to ``app``."""
    door = McpDoor(hub)
    app[MCP_DOOR] = door
    app.router.add_post("/mcp", post_mcp)
    app.router.add_get("/mcp", get_mcp, allow_head=False)
    app.router.add_delete("/mcp", delete_mcp)
    app.router.add_get(METADATA_PATH, protected_resource, allow_head=False)
    app.router.add_get(METADATA_PATH + "/mcp", protected_resource, allow_head=False)
    return door


async def _agent_side(request: web.Request, handler: Any) -> web.StreamResponse:
    # The agent listener serves agents' tokens only: anything else is not served there.
    if not presents_svid(request):
        raise NotFound("no such endpoint on the agent listener")
    return await handler(request)  # type: ignore[no-any-return]


async def agent_post_mcp(request: web.Request) -> web.StreamResponse:
    return await _agent_side(request, post_mcp)


async def agent_delete_mcp(request: web.Request) -> web.StreamResponse:
    return await _agent_side(request, delete_mcp)


def setup_agent_mcp_routes(app: web.Application, hub: Hub) -> McpDoor:
    """``POST /mcp`` and ``DELETE /mcp`` on the agent listener, for agents' JWT-SVIDs only."""
    door = McpDoor(hub, svid_only=True)
    app[MCP_DOOR] = door
    app.router.add_post("/mcp", agent_post_mcp)
    app.router.add_delete("/mcp", agent_delete_mcp)
    return door


__all__ = ["MCP_DOOR", "McpDoor", "setup_agent_mcp_routes", "setup_mcp_routes"]
