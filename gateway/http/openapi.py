"""The OpenAPI 3.1 description of the HTTP API (a test checks every route is in it)."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.errors import ERROR_CODES
from gateway.http.agent_openapi import SECURITY_SCHEME, agent_paths
from gateway.http.audit import audit_paths

_ERROR = {"$ref": "#/components/schemas/Error"}
_TASK = {"$ref": "#/components/schemas/Task"}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _resp(f"error ({s})", _ERROR) for s in statuses}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


TASK_ID = _param("task_id", "path", {"type": "string"}, "task id")
WAIT = _param("wait", "query", {"type": "number", "minimum": 0}, "seconds to wait for the end")


def openapi_document() -> dict[str, Any]:
    """The whole document."""
    auth = [{"apiKey": []}]
    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": _op(
                "Submit a task (by capability or agent)",
                {
                    "200": _resp("finished within ?wait, or an idempotent replay", _TASK),
                    "202": _resp("accepted", _TASK),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 503),
                },
                security=auth,
                parameters=[
                    WAIT,
                    _param("Idempotency-Key", "header", {"type": "string"}, "replay protection"),
                ],
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "$ref": "https://agent-gateway.local/schemas/task.schema.json"
                            }
                        }
                    },
                },
            ),
            "get": _op(
                "List tasks (newest first)",
                {"200": _resp("a page of tasks"), **_errors(400, 401)},
                security=auth,
                parameters=[
                    _param("state", "query", {"type": "string"}, "filter by state"),
                    _param("agent", "query", {"type": "string"}, "filter by agent"),
                    _param("limit", "query", {"type": "integer"}, "page size (1-500)"),
                    _param("cursor", "query", {"type": "string"}, "next_cursor of the last page"),
                ],
            ),
        },
        "/v1/tasks/{task_id}": {
            "get": _op(
                "One task",
                {"200": _resp("the task", _TASK), **_errors(401, 404)},
                security=auth,
                parameters=[TASK_ID, WAIT],
            ),
            "delete": _op(
                "Cancel a task and stop its container",
                {"200": _resp("cancelled", _TASK), **_errors(401, 404, 409)},
                security=auth,
                parameters=[TASK_ID],
            ),
        },
        "/v1/agents": {"get": _op("The registry", {"200": _resp("agents")}, security=auth)},
        "/v1/agents/{name}": {
            "get": _op(
                "One agent",
                {"200": _resp("agent"), **_errors(401, 404)},
                security=auth,
                parameters=[_param("name", "path", {"type": "string"}, "agent name")],
            )
        },
        "/v1/decisions": {
            "get": _op(
                "The decision log (auditor role)",
                {"200": _resp("a page of decisions"), **_errors(400, 401, 403)},
                security=auth,
                parameters=[
                    _param(n, "query", {"type": "string"}, d)
                    for n, d in (
                        ("decision", "allow or deny"),
                        ("agent", "agent name"),
                        ("subject", "caller id"),
                        ("kind", "dispatch or message"),
                        ("since", "RFC 3339 time"),
                        ("until", "RFC 3339 time"),
                        ("limit", "page size"),
                        ("cursor", "next page"),
                    )
                ],
            )
        },
        "/v1/decisions/{decision_id}": {
            "get": _op(
                "One decision with its (masked) input and result",
                {"200": _resp("decision"), **_errors(401, 403, 404)},
                security=auth,
                parameters=[_param("decision_id", "path", {"type": "string"}, "decision id")],
            )
        },
        "/v1/status": {
            "get": _op(
                "Mode, revisions, counts (operator)", {"200": _resp("status")}, security=auth
            )
        },
        "/v1/admin/reload": {
            "post": _op(
                "Reload agents.yaml, schemas and policies (operator)",
                {"200": _resp("reloaded"), **_errors(401, 403, 422)},
                security=auth,
            )
        },
        "/v1/admin/identity/rotate": {
            "post": _op(
                "Sign new JWT-SVIDs with a new key; the old one stays in the bundle (operator)",
                {"200": _resp("new kid, previous kid, published kids"), **_errors(401, 403)},
                security=auth,
            )
        },
        "/v1/admin/mode": {
            "post": _op(
                "Force normal or degraded mode, or 'auto' (operator)",
                {"200": _resp("mode"), **_errors(400, 401, 403)},
                security=auth,
            )
        },
        "/healthz": {"get": _op("Liveness", {"200": _resp("alive")})},
        "/readyz": {
            "get": _op("Readiness (normal mode)", {"200": _resp("ready"), "503": _resp("degraded")})
        },
        "/metrics": {"get": _op("Prometheus metrics", {"200": _resp("text exposition format")})},
        "/openapi.json": {"get": _op("This document", {"200": _resp("OpenAPI 3.1")})},
    }
    for path, ops in [*agent_paths().items(), *audit_paths().items()]:
        paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent-gateway", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer"},
                "svid": SECURITY_SCHEME,
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"enum": sorted(ERROR_CODES)},
                                "message": {"type": "string"},
                                "details": {},
                                "decision_id": {"type": "string"},
                                "request_id": {"type": "string"},
                            },
                        }
                    },
                },
                "Task": {
                    "type": "object",
                    "required": ["task_id", "state", "agent"],
                    "properties": {
                        "task_id": {"type": "string"},
                        "state": {
                            "enum": [
                                "pending",
                                "dispatched",
                                "running",
                                "succeeded",
                                "failed",
                                "timed_out",
                                "cancelled",
                            ]
                        },
                        "agent": {"type": "string"},
                        "decision_id": {"type": "string"},
                        "result": {},
                        "error": {"type": "object"},
                        "history": {"type": "array"},
                    },
                },
            },
        },
    }
