"""The OpenAPI 3.1 description of the HTTP API: every route, status, bound and header.

The document is self-contained: the request bodies' JSON Schemas are inlined from
``schemas/`` under ``components/schemas`` with their ``$ref`` rewritten to point inside it,
so any OpenAPI tool can resolve every reference without fetching anything. It is built from
the hub's settings and the schemas in force, so ``wait``'s maximum and the body schemas are
the ones the handlers enforce. ``tests/unit/test_openapi.py`` resolves every ``$ref`` and
``tests/integration/test_openapi_property.py`` checks a real hub against the document.

The building blocks (``operation``, ``json_body``, the inliner...) are in
``gateway.http.openapi_parts``, shared with ``agent_openapi`` and ``audit``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import ERROR_CODES
from gateway.http.a2a.openapi import a2a_paths
from gateway.http.agent_openapi import AGENT_SCHEMAS, SECURITY_SCHEME, agent_paths
from gateway.http.audit import audit_paths
from gateway.http.mcp.openapi import mcp_paths
from gateway.http.openapi_parts import (
    API_KEY,
    BODY_SCHEMAS,
    HEADERS,
    MAX_CURSOR_DIGITS,
    MAX_IDEMPOTENCY_KEY,
    MAX_LIMIT,
    NULLABLE_STRING,
    STATUS_TEXT,
    SVID,
    TASK_STATES,
    error_response,
    inline_schemas,
    json_body,
    json_response,
    operation,
    param,
    read_schemas,
    ref,
    text_response,
)
from gateway.settings import Settings

# --- response bodies --------------------------------------------------------------------


def _object(required: Iterable[str], properties: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": dict(properties)}


def _response_schemas() -> dict[str, Any]:
    task_props = {
        "task_id": {"type": "string"},
        "state": {"enum": list(TASK_STATES)},
        "agent": {"type": "string"},
        "capability": NULLABLE_STRING,
        "subject": NULLABLE_STRING,
        "decision_id": NULLABLE_STRING,
        "timeout_s": {"type": ["number", "null"]},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
        "container": {
            "oneOf": [
                {"type": "null"},
                _object(["id", "name"], {"id": {"type": "string"}, "name": NULLABLE_STRING}),
            ]
        },
        "labels": {"type": ["object", "null"]},
        "sandbox": {"type": "object"},
        "dispatch": {
            "enum": ["warm", "cold"],
            "description": "whether the task ran in a pooled (warm) container or a new one",
        },
        "result": {"description": "the agent's output (succeeded)"},
        "error": ref("schemas", "TaskError"),
        "history": {
            "type": "array",
            "items": _object(
                ["state", "at"],
                {
                    "state": {"enum": list(TASK_STATES)},
                    "at": {"type": "string"},
                    "detail": {"type": "string"},
                },
            ),
        },
    }
    child_props = {
        "task_id": {"type": "string"},
        "state": {"enum": list(TASK_STATES)},
        "agent": {"type": "string"},
        "parent_id": NULLABLE_STRING,
        "decision_id": NULLABLE_STRING,
        "result": {},
        "error": ref("schemas", "TaskError"),
    }
    decision_props = {
        "seq": {"type": "integer", "minimum": 1},
        "decision_id": {"type": "string"},
        "timestamp": {"type": "string"},
        "path": {"type": "string"},
        "input": {"type": "object"},
        "result": {"type": "object"},
        "revision": {"type": "string"},
        "labels": {"type": "object"},
        "metrics": {"type": "object"},
        "erased": {"type": "array", "items": {"type": "string"}},
        "masked": {"type": "array", "items": {"type": "string"}},
        "kind": {"type": "string"},
        "allow": {"type": "boolean"},
        "subject": NULLABLE_STRING,
        "agent": NULLABLE_STRING,
        "task_id": NULLABLE_STRING,
        "prev_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "hash": {"type": "string"},
    }
    agent_props = {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "image": {"type": "string"},
        "capabilities": {"type": "array", "items": {"type": "string"}},
        "input_schema": {"type": "string"},
        "output_schema": {"type": "string"},
        "port": {"type": "integer"},
        "endpoint": {"type": "string"},
        "timeout_s": {"type": "number"},
        "resources": _object(
            ["memory", "memory_bytes", "cpus", "pids"],
            {
                "memory": {"type": "string"},
                "memory_bytes": {"type": "integer"},
                "cpus": {"type": "number"},
                "pids": {"type": "integer"},
            },
        ),
        "network": {"type": "string"},
        "subscriptions": {"type": "array", "items": {"type": "string"}},
        "reuse": {},
        "pool": {"type": "object"},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }
    revisions = {"type": ["object", "null"], "additionalProperties": {"type": "string"}}
    return {
        "Error": _object(
            ["error"],
            {
                "error": {
                    "type": "object",
                    "additionalProperties": False,
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
        ),
        "TaskError": _object(
            ["code", "message"],
            {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        ),
        "Task": _object(
            [
                "task_id",
                "state",
                "agent",
                "capability",
                "subject",
                "decision_id",
                "timeout_s",
                "created_at",
                "updated_at",
                "container",
                "labels",
            ],
            task_props,
        ),
        "ChildTask": _object(
            ["task_id", "state", "agent", "parent_id", "decision_id"], child_props
        ),
        "TaskPage": _object(
            ["tasks", "next_cursor"],
            {
                "tasks": {"type": "array", "items": ref("schemas", "Task")},
                "next_cursor": {"type": ["string", "null"], "pattern": "^[0-9]+$"},
            },
        ),
        "Agent": _object(["name", "image", "capabilities", "resources"], agent_props),
        "AgentDetail": {
            "allOf": [
                ref("schemas", "Agent"),
                _object(["revision"], {"revision": {"type": "string"}}),
            ]
        },
        "AgentList": _object(
            ["revision", "agents"],
            {
                "revision": {"type": "string"},
                "agents": {"type": "array", "items": ref("schemas", "Agent")},
            },
        ),
        "Decision": {
            "anyOf": [
                _object(list(decision_props), decision_props),
                _object(
                    ["malformed"],
                    {
                        "malformed": {
                            "type": "string",
                            "description": "a stored row that is not a valid record (why)",
                        }
                    },
                ),
            ]
        },
        "DecisionPage": _object(
            ["decisions", "next_cursor"],
            {
                "decisions": {"type": "array", "items": ref("schemas", "Decision")},
                "next_cursor": {"type": ["string", "null"], "pattern": "^[0-9]+$"},
            },
        ),
        "Revisions": revisions,
        "Status": _object(
            ["hub_id", "version", "mode", "forced_mode", "degraded_reasons", "revisions"],
            {
                "hub_id": {"type": "string"},
                "version": {"type": "string"},
                "mode": {"enum": ["normal", "degraded"]},
                "forced_mode": {"enum": ["normal", "degraded", None]},
                "degraded_reasons": {"type": "object", "additionalProperties": {"type": "string"}},
                "revisions": ref("schemas", "Revisions"),
                # null while the store cannot be read (the cause is in degraded_reasons)
                "tasks": {"type": ["object", "null"], "additionalProperties": {"type": "integer"}},
                "running_tasks": {"type": "integer", "minimum": 0},
                "agents": {"type": "array", "items": {"type": "string"}},
                "last_recovery": {"type": ["object", "null"]},
                "last_reload_error": {"type": ["object", "null"]},
                "reload": {"type": ["object", "null"]},
                "alerts": {},
            },
        ),
        "Mode": _object(
            ["mode", "forced_mode"],
            {
                "mode": {"enum": ["normal", "degraded"]},
                "forced_mode": {"enum": ["normal", "degraded", None]},
            },
        ),
        "ModeRequest": {
            "type": "object",
            "required": ["mode"],
            "properties": {"mode": {"enum": ["normal", "degraded", "auto"]}},
        },
        "Reloaded": _object(
            ["reloaded", "revisions"],
            {
                "reloaded": {"const": True},
                "revisions": ref("schemas", "Revisions"),
                "reload": {"type": ["object", "null"]},
            },
        ),
        "Rotated": _object(
            ["kid", "previous_kid", "published"],
            {
                "kid": {"type": "string"},
                "previous_kid": NULLABLE_STRING,
                "published": {"type": "array", "items": {"type": "string"}},
            },
        ),
        "Health": _object(["status"], {"status": {"const": "ok"}}),
        "Ready": _object(["status"], {"status": {"const": "ready"}}),
        "NotReady": _object(
            ["status", "reason"],
            {"status": {"const": "degraded"}, "reason": {"type": "string"}},
        ),
        "OpenAPI": _object(["openapi", "info", "paths"], {"openapi": {"const": "3.1.0"}}),
    }


# --- the document -----------------------------------------------------------------------


def _core_paths(max_wait_s: float) -> dict[str, Any]:
    wait = param(
        "wait",
        "query",
        {"type": "number", "minimum": 0, "maximum": max_wait_s},
        f"seconds to wait for the task to end (at most {max_wait_s:g})",
    )
    task_id = param("task_id", "path", {"type": "string", "minLength": 1}, "task id")
    limit = param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
        f"page size (1 to {MAX_LIMIT})",
    )
    cursor = param(
        "cursor",
        "query",
        {"type": "string", "pattern": f"^[0-9]{{1,{MAX_CURSOR_DIGITS}}}$"},
        "next_cursor of the previous page",
    )
    task = ref("schemas", "Task")
    both = [
        "Location",
        "Idempotent-Replayed",
    ]
    choice = {"enum": ["allow", "deny", "true", "false"]}
    return {
        "/v1/tasks": {
            "post": operation(
                "Submit a task (by capability or agent)",
                {
                    "200": json_response(
                        "finished within ?wait, or an idempotent replay of a finished task",
                        task,
                        headers=both,
                        required_headers=["Location"],
                    ),
                    "202": json_response(
                        "accepted; poll Location",
                        task,
                        headers=both,
                        required_headers=["Location"],
                    ),
                },
                security=API_KEY,
                body=json_body(
                    ref("schemas", BODY_SCHEMAS["task.schema.json"]),
                    {"capability": "debug.echo", "input": {"hello": "world"}},
                ),
                parameters=[
                    wait,
                    param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
                        "replay protection: the same key and body give the same task",
                    ),
                ],
                errors=[409],
            ),
            "get": operation(
                "List tasks, newest first (the caller's own, or all for operators and auditors)",
                {"200": json_response("a page of tasks", ref("schemas", "TaskPage"))},
                security=API_KEY,
                parameters=[
                    param("state", "query", {"enum": list(TASK_STATES)}, "only this state"),
                    param("agent", "query", {"type": "string"}, "only this agent's tasks"),
                    limit,
                    cursor,
                ],
                errors=[400],
            ),
        },
        "/v1/tasks/{task_id}": {
            "get": operation(
                "One task, with its history (an agent's token: its own or delegated task)",
                {
                    "200": json_response(
                        "the task (as a child task for an agent's token)",
                        {"anyOf": [task, ref("schemas", "ChildTask")]},
                    )
                },
                security=[*API_KEY, *SVID],
                parameters=[task_id, wait],
                errors=[400],
            ),
            "delete": operation(
                "Cancel a task and stop its container",
                {"200": json_response("cancelled", task)},
                security=API_KEY,
                parameters=[task_id],
                errors=[409],
            ),
        },
        "/v1/agents": {
            "get": operation(
                "The registry",
                {"200": json_response("agents", ref("schemas", "AgentList"))},
                security=API_KEY,
            )
        },
        "/v1/agents/{name}": {
            "get": operation(
                "One agent",
                {"200": json_response("the agent", ref("schemas", "AgentDetail"))},
                security=API_KEY,
                parameters=[param("name", "path", {"type": "string", "minLength": 1}, "name")],
            )
        },
        "/v1/decisions": {
            "get": operation(
                "The decision log, newest first (auditor)",
                {"200": json_response("a page of decisions", ref("schemas", "DecisionPage"))},
                security=API_KEY,
                parameters=[
                    param("decision", "query", choice, "only allowed or only denied"),
                    param("allow", "query", choice, "the same as decision"),
                    param("agent", "query", {"type": "string"}, "agent name"),
                    param("subject", "query", {"type": "string"}, "caller id"),
                    param("kind", "query", {"type": "string"}, "dispatch, message or api"),
                    param("since", "query", {"type": "string"}, "RFC 3339 time, inclusive"),
                    param("until", "query", {"type": "string"}, "RFC 3339 time, exclusive"),
                    limit,
                    cursor,
                ],
                errors=[400],
            )
        },
        "/v1/decisions/{decision_id}": {
            "get": operation(
                "One decision with its (masked) input and result (auditor)",
                {"200": json_response("the decision", ref("schemas", "Decision"))},
                security=API_KEY,
                parameters=[param("decision_id", "path", {"type": "string", "minLength": 1}, "id")],
            )
        },
        "/v1/status": {
            "get": operation(
                "Mode, revisions, counts (operator)",
                {"200": json_response("status", ref("schemas", "Status"))},
                security=API_KEY,
            )
        },
        "/v1/admin/reload": {
            "post": operation(
                "Reload agents.yaml, schemas and policies (operator)",
                {"200": json_response("reloaded", ref("schemas", "Reloaded"))},
                security=API_KEY,
                errors=[422],
            )
        },
        "/v1/admin/identity/rotate": {
            "post": operation(
                "Sign new JWT-SVIDs with a new key; the old one stays in the bundle (operator)",
                {
                    "200": json_response(
                        "new kid, previous kid, published kids", ref("schemas", "Rotated")
                    )
                },
                security=API_KEY,
            )
        },
        "/v1/admin/mode": {
            "post": operation(
                "Force normal or degraded mode, or 'auto' (operator)",
                {"200": json_response("the mode now", ref("schemas", "Mode"))},
                security=API_KEY,
                body=json_body(ref("schemas", "ModeRequest"), {"mode": "auto"}),
            )
        },
        "/healthz": {
            "get": operation(
                "Liveness",
                {"200": json_response("alive", ref("schemas", "Health"))},
                agent_route=True,
            )
        },
        "/readyz": {
            "get": operation(
                "Readiness (normal mode)",
                {
                    "200": json_response("ready", ref("schemas", "Ready")),
                    "503": json_response(
                        "degraded; reason says why",
                        ref("schemas", "NotReady"),
                        headers=["Retry-After"],
                        required_headers=["Retry-After"],
                    ),
                },
            )
        },
        "/metrics": {
            "get": operation(
                "Prometheus metrics",
                {"200": text_response("text exposition format", "text/plain")},
                errors=[503],
            )
        },
        "/openapi.json": {
            "get": operation(
                "This document", {"200": json_response("OpenAPI 3.1", ref("schemas", "OpenAPI"))}
            )
        },
    }


def openapi_document(
    *, settings: Settings | None = None, schemas: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The whole document for a hub with ``settings`` and the JSON Schemas in force.

    ``schemas`` maps a path under ``schemas/`` to its document (``SchemaSet.documents``);
    without it the files under ``settings.schemas_dir`` are read.
    """
    settings = settings or Settings()
    documents = schemas if schemas is not None else read_schemas(Path(settings.schemas_dir))
    components = {**_response_schemas(), **AGENT_SCHEMAS}
    inlined = inline_schemas(documents, BODY_SCHEMAS)
    for rel, name in BODY_SCHEMAS.items():
        # A body schema missing from the configuration: any object is then refused with 400.
        inlined.setdefault(name, {"type": "object", "description": f"schemas/{rel}"})
    components.update(inlined)
    paths = _core_paths(settings.max_wait_s)
    for path, ops in [
        *agent_paths(settings.max_wait_s).items(),
        *audit_paths().items(),
        *mcp_paths().items(),
        *a2a_paths().items(),
    ]:
        paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "agent-gateway",
            "version": __version__,
            "description": (
                "Every response carries X-Request-Id (the caller's, or a new one). Errors are "
                '{"error": {"code", "message", "details"?, "decision_id"?, "request_id"}}. '
                "Every GET route also answers HEAD."
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "svid": SECURITY_SCHEME,
            },
            "headers": {name: dict(h) for name, h in HEADERS.items()},
            "responses": {STATUS_TEXT[s]: error_response(s) for s in sorted(STATUS_TEXT)},
            "schemas": components,
        },
    }
