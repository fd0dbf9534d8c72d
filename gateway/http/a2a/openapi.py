"""OpenAPI path items of the A2A door and the task events (merged by ``gateway.http.openapi``).

The body of ``POST /a2a/{agent}`` is A2A's JSON-RPC (1.0 or 0.3), described by the A2A
specification, not here: its errors are JSON-RPC errors (as ``/mcp``'s). Cards are A2A Agent
Cards. Agents' progress reports are agent routes (``gateway.http.agent_openapi``).
"""

from __future__ import annotations

from typing import Any

from gateway.http.openapi_parts import (
    API_KEY,
    header_refs,
    json_response,
    operation,
    param,
    text_response,
)

_RPC = {"type": "object", "description": "a JSON-RPC 2.0 message of A2A 1.0 or 0.3"}
_OBJECT = {"type": "object"}


def _rpc_error(description: str, *headers: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": header_refs(*headers),
        "content": {"application/json": {"schema": _RPC}},
    }


def a2a_paths() -> dict[str, Any]:
    """Cards, their key, the JSON-RPC endpoint and the task event stream."""
    agent = param("agent", "path", {"type": "string", "minLength": 1}, "agent name")
    card = json_response("a signed A2A Agent Card", _OBJECT, headers=["Cache-Control"])
    return {
        "/a2a/{agent}/.well-known/agent-card.json": {
            "get": operation(
                "The agent's A2A Agent Card, signed by the hub",
                {"200": card},
                parameters=[agent],
                errors=[503],
            )
        },
        "/.well-known/agent-card.json": {
            "get": operation(
                "The hub's A2A card: the agents the caller may use",
                {"200": json_response("a signed A2A Agent Card", _OBJECT)},
                errors=[401, 503],
            )
        },
        "/.well-known/jwks.json": {
            "get": operation(
                "The public key the Agent Cards are signed with (JWKS)",
                {"200": json_response("JWKS", _OBJECT, headers=["Cache-Control"])},
            )
        },
        "/a2a/{agent}": {
            "post": {
                "summary": "A2A JSON-RPC (1.0 with A2A-Version: 1.0; 0.3 method names)",
                "security": API_KEY,
                "parameters": [agent],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _RPC}},
                },
                "responses": {
                    "200": {
                        "description": "the JSON-RPC answer or error (an event stream for streams)",
                        "headers": header_refs(),
                        "content": {
                            "application/json": {"schema": _RPC},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "400": _rpc_error("not served as JSON-RPC (never: errors are 200)"),
                    "401": _rpc_error("no or a bad API key", "WWW-Authenticate"),
                    "403": _rpc_error("the API policy refused the method"),
                    "404": _rpc_error("no such agent"),
                    "405": _rpc_error("use POST", "Allow"),
                    "413": _rpc_error("body too large (answered as -32600 with 200)"),
                    "415": _rpc_error("never: the body is read as JSON whatever its type"),
                    "429": _rpc_error("over a rate limit", "Retry-After"),
                    "500": _rpc_error("internal error"),
                    "503": _rpc_error("degraded", "Retry-After"),
                },
            }
        },
        "/v1/tasks/{task_id}/events": {
            "get": operation(
                "The task's state and progress events (resumable with Last-Event-ID)",
                {"200": text_response("the final state is the last event", "text/event-stream")},
                security=API_KEY,
                parameters=[
                    param("task_id", "path", {"type": "string", "minLength": 1}, "task id"),
                    param("after", "query", {"type": "string", "maxLength": 12}, "event id"),
                    param(
                        "Last-Event-ID", "header", {"type": "string", "maxLength": 12}, "event id"
                    ),
                ],
                errors=[400],
            )
        },
    }
