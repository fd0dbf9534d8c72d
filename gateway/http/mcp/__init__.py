"""The MCP door: the hub as an MCP server (Streamable HTTP at ``/mcp``).

- ``transport``: the aiohttp handlers, Origin and key checks, sessions per revision
- ``sessions``: the handshake-era sessions (2025-06-18, 2025-11-25)
- ``tools``: every agent capability as a tool, filtered by the dispatch policy
"""

from __future__ import annotations

from aiohttp import web

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


__all__ = ["MCP_DOOR", "McpDoor", "setup_mcp_routes"]
