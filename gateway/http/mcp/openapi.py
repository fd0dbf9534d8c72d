"""OpenAPI path items of the MCP door (merged by ``gateway.http.openapi``).

The body of ``/mcp`` is MCP's JSON-RPC, described by the MCP specification, not here: the
operations name their statuses and say that every error body is a JSON-RPC error.
``POST`` and ``DELETE`` are agent routes too (``mcp_operations``, listed by
``gateway.http.agent_openapi``): on the agent listener they take agents' JWT-SVIDs only.
"""

from __future__ import annotations

from typing import Any

from gateway.http.openapi_parts import API_KEY, SVID, header_refs, json_response, operation

_RPC = {"type": "object", "description": "a JSON-RPC 2.0 message of the MCP revision in use"}


_EMPTY = {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}


def _json(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "headers": header_refs(),
        "content": content or {"application/json": {"schema": _RPC}},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json("a JSON-RPC error") for s in statuses}


_BOTH_LISTENERS = (
    "An API key or an agent's JWT-SVID on the main listener; on the agent listener (the "
    "address in GATEWAY_URL) agents' JWT-SVIDs only, anything else is a 404 there."
)


def mcp_operations() -> dict[str, Any]:
    """The operations of ``/mcp``: ``post``, ``get``, ``delete``."""
    return {
        "post": {
            "summary": "MCP over Streamable HTTP (2025-06-18, 2025-11-25, 2026-07-28)",
            "description": _BOTH_LISTENERS
            + " A tools/call with a progress token is answered as an event stream: the "
            "notifications/progress of its task, or of the MCP server behind the hub, then "
            "the result. notifications/cancelled cancels the task or the server's call.",
            "security": [*API_KEY, *SVID],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _RPC}},
            },
            "responses": {
                "200": _json(
                    "the JSON-RPC answer (a stream for a call with progress)",
                    {
                        "application/json": {"schema": _RPC},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                ),
                "202": _json("a notification, accepted", _EMPTY),
                **_errors(400, 401, 403, 404, 405, 406, 413, 415, 421, 429, 500, 503),
            },
        },
        "get": {
            "summary": "no server-initiated stream is offered",
            "responses": {"405": _json("use POST", _EMPTY), **_errors(500)},
        },
        "delete": {
            "summary": "end an MCP session (handshake revisions)",
            "description": _BOTH_LISTENERS,
            "security": [*API_KEY, *SVID],
            "responses": {
                "204": _json("the session ended", _EMPTY),
                **_errors(400, 401, 403, 404, 405, 421, 429, 500, 503),
            },
        },
    }


def mcp_paths() -> dict[str, Any]:
    """``/mcp`` and its protected-resource metadata."""
    metadata = {
        "get": operation(
            "RFC 9728 protected-resource metadata of /mcp",
            {"200": json_response("the metadata", {"type": "object"})},
        )
    }
    return {
        "/mcp": mcp_operations(),
        "/.well-known/oauth-protected-resource": metadata,
        "/.well-known/oauth-protected-resource/mcp": metadata,
    }
