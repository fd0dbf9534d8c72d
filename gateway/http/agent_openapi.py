"""The OpenAPI description of the agent-facing routes (merged by ``gateway.http.openapi``)."""

from __future__ import annotations

from typing import Any

SCHEMAS = "https://agent-gateway.local/schemas/"
_ERROR = {"$ref": "#/components/schemas/Error"}
_SVID = [{"svid": []}]


def _resp(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": f"error ({s})", "content": {"application/json": {"schema": _ERROR}}}
        for s in statuses
    }


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": SCHEMAS + ref}}}}


def agent_paths() -> dict[str, Any]:
    """Paths for messages, reported results and identity."""
    return {
        "/v1/messages": {
            "post": {
                "summary": "Send a message to other agents through the hub (agent SVID)",
                "description": (
                    "request: 200 with the target's reply; event and broadcast: 202 with the "
                    "number of deliveries; delegate: 202 with the child task, or 200 with the "
                    "finished child when it ends within ?wait"
                ),
                "security": _SVID,
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0},
                        "description": "delegate: seconds to wait for the child task",
                    }
                ],
                "requestBody": _body("messages/envelope.schema.json"),
                "responses": {
                    "200": _resp("the reply (request) or the finished child task (delegate)"),
                    "202": _resp("delivered (event, broadcast) or child task accepted"),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 502, 503, 504),
                },
            }
        },
        "/v1/tasks/{task_id}/result": {
            "post": {
                "summary": "Report the result of a task the agent answered 202 to (its SVID)",
                "security": _SVID,
                "parameters": [
                    {
                        "name": "task_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "task id",
                    }
                ],
                "requestBody": _body("task.result.schema.json"),
                "responses": {"200": _resp("the task's state"), **_errors(400, 401, 403, 409)},
            }
        },
        "/v1/identity/renew": {
            "post": {
                "summary": "Exchange a valid JWT-SVID for a fresh one (same agent and container)",
                "security": _SVID,
                "responses": {"200": _resp("token, spiffe_id, expires_at"), **_errors(401)},
            }
        },
        "/v1/identity/bundle": {
            "get": {
                "summary": "The hub's JWT bundle (SPIFFE JWKS, use: jwt-svid)",
                "responses": {"200": _resp("JWKS")},
            }
        },
    }


SECURITY_SCHEME = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT-SVID"}
