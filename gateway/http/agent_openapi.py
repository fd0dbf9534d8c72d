"""The OpenAPI description of the agent-facing routes (merged by ``gateway.http.openapi``).

Every route the agent listener serves is described here except those it shares with the
main one and that are described there: ``GET /v1/tasks/{task_id}``, ``GET /healthz`` and the
A2A door. ``/mcp`` is listed here with the MCP door's own operations (the same objects), so
the merge gives one description of it whichever part comes first.
"""

from __future__ import annotations

from typing import Any

from gateway.http.mcp.openapi import mcp_operations
from gateway.http.openapi_parts import (
    BODY_SCHEMAS,
    SVID,
    json_body,
    json_response,
    operation,
    param,
    ref,
)

SECURITY_SCHEME = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT-SVID"}


def _schemas() -> dict[str, Any]:
    child = ref("schemas", "ChildTask")
    return {
        "Replied": {
            "type": "object",
            "required": ["reply", "from", "message_id", "decision_id"],
            "properties": {
                "reply": {"description": "the target agent's reply"},
                "from": {
                    "type": "object",
                    "required": ["agent", "spiffe_id"],
                    "properties": {
                        "agent": {"type": "string"},
                        "spiffe_id": {"type": "string", "pattern": "^spiffe://"},
                    },
                },
                "message_id": {"type": "string"},
                "decision_id": {"type": "string"},
                "correlation_id": {"type": "string"},
            },
        },
        "Delivered": {
            "type": "object",
            "required": ["delivered", "recipients"],
            "properties": {
                "delivered": {"type": "integer", "minimum": 0},
                "recipients": {"type": "array", "items": {"type": "string"}},
                "decision_id": {"type": "string"},
                "refused": {"type": "array"},
                "decision_ids": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Delegated": {
            "allOf": [
                child,
                {
                    "type": "object",
                    "required": ["message_decision_id"],
                    "properties": {"message_decision_id": {"type": "string"}},
                },
            ]
        },
        "ResultAccepted": {
            "type": "object",
            "required": ["task_id", "state"],
            "properties": {"task_id": {"type": "string"}, "state": {"type": "string"}},
        },
        "Renewed": {
            "type": "object",
            "required": ["token", "spiffe_id", "expires_at"],
            "properties": {
                "token": {"type": "string"},
                "spiffe_id": {"type": "string", "pattern": "^spiffe://"},
                "expires_at": {"type": "integer"},
            },
        },
        "Bundle": {
            "type": "object",
            "required": ["keys"],
            "properties": {
                "keys": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["kty", "kid", "use"],
                        "properties": {"use": {"const": "jwt-svid"}},
                    },
                },
                "spiffe_refresh_hint": {"type": "integer"},
            },
        },
    }


AGENT_SCHEMAS = _schemas()


def agent_paths(max_wait_s: float) -> dict[str, Any]:
    """Paths for messages, reported results, identity and agents' MCP tool calls."""
    mcp = mcp_operations()
    return {
        # Agents' MCP tool calls (gateway.http.mcp): the messages policy decides them.
        "/mcp": {"post": mcp["post"], "delete": mcp["delete"]},
        "/v1/messages": {
            "post": operation(
                "Send a message to other agents through the hub (agent SVID)",
                {
                    "200": json_response(
                        "the reply (request) or the finished child task (delegate)",
                        {"anyOf": [ref("schemas", "Replied"), ref("schemas", "Delegated")]},
                        headers=["Location"],
                    ),
                    "202": json_response(
                        "delivered (event, broadcast) or child task accepted (delegate)",
                        {"anyOf": [ref("schemas", "Delivered"), ref("schemas", "Delegated")]},
                        headers=["Location"],
                    ),
                },
                description=(
                    "request: 200 with the target's reply; event and broadcast: 202 with the "
                    "number of deliveries; delegate: 202 with the child task (Location), or "
                    "200 with the finished child when it ends within ?wait"
                ),
                security=SVID,
                body=json_body(
                    ref("schemas", BODY_SCHEMAS["messages/envelope.schema.json"]),
                    {
                        "type": "request",
                        "to": "wordstats",
                        "kind": "text.stats",
                        "payload": {"text": "one two two"},
                    },
                ),
                parameters=[
                    param(
                        "wait",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": max_wait_s},
                        f"delegate: seconds to wait for the child task (at most {max_wait_s:g})",
                    ),
                    param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "minLength": 1, "maxLength": 255},
                        "delegate: the same key and body from the same task give the same child",
                    ),
                ],
                errors=[404, 409, 502, 504],
                agent_route=True,
            )
        },
        "/v1/tasks/{task_id}/result": {
            "post": operation(
                "Report the result of a task the agent answered 202 to (its SVID)",
                {"200": json_response("the task's state", ref("schemas", "ResultAccepted"))},
                security=SVID,
                body=json_body(ref("schemas", BODY_SCHEMAS["task.result.schema.json"])),
                parameters=[
                    param("task_id", "path", {"type": "string", "minLength": 1}, "task id")
                ],
                errors=[404, 409],
                agent_route=True,
            )
        },
        "/v1/tasks/{task_id}/progress": {
            "post": operation(
                "Report progress of the task this instance runs (its task event streams)",
                {"202": json_response("the event id", {"type": "object"})},
                security=SVID,
                body=json_body(
                    {
                        "type": "object",
                        "required": ["message"],
                        "properties": {
                            "message": {"type": "string", "maxLength": 2000},
                            "fraction": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                            "sent_at": {"type": "number"},
                        },
                    }
                ),
                parameters=[
                    param("task_id", "path", {"type": "string", "minLength": 1}, "task id")
                ],
                errors=[404],
                agent_route=True,
            )
        },
        "/v1/identity/renew": {
            "post": operation(
                "Exchange a valid JWT-SVID for a fresh one (same agent and container)",
                {"200": json_response("token, spiffe_id, expires_at", ref("schemas", "Renewed"))},
                security=SVID,
                agent_route=True,
            )
        },
        "/v1/identity/bundle": {
            "get": operation(
                "The hub's JWT bundle (SPIFFE JWKS, use: jwt-svid)",
                {
                    "200": json_response(
                        "JWKS",
                        ref("schemas", "Bundle"),
                        headers=["Cache-Control"],
                        required_headers=["Cache-Control"],
                    )
                },
                agent_route=True,
            )
        },
    }
