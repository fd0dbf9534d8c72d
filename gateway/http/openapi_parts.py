"""Building blocks of the OpenAPI 3.1 document: operations, parameters, responses, and the
inliner that copies the JSON Schemas of ``schemas/`` into ``components/schemas``.

Shared by ``gateway.http.openapi`` (the document), ``agent_openapi`` and ``audit``, which
describe their own routes with them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

from gateway.errors import ERROR_CODES

SCHEMAS_BASE = "https://agent-gateway.local/schemas/"
TASK_STATES = (
    "pending",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
)
# The request bodies, by file under schemas/, and their names in components/schemas.
BODY_SCHEMAS = {
    "task.schema.json": "TaskSubmission",
    "messages/envelope.schema.json": "MessageEnvelope",
    "task.result.schema.json": "TaskResultReport",
}
API_KEY = [{"apiKey": []}, {"apiKeyHeader": []}]
SVID = [{"svid": []}]
MAX_LIMIT = 500
# A cursor is a row's sequence number: at most 18 digits fit a signed 64-bit INTEGER.
MAX_CURSOR_DIGITS = 18
MAX_IDEMPOTENCY_KEY = 255

STATUS_TEXT = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "InvalidConfig",
    429: "TooManyRequests",
    500: "InternalError",
    502: "AgentUnavailable",
    503: "ServiceUnavailable",
    504: "AgentTimeout",
}
_STATUS_WHEN = {
    400: "the request breaks a documented bound or schema (details point at the field)",
    401: "no API key (or agent token), or one that is unknown, expired or revoked",
    403: "authenticated, but the API policy (policies/api.rego) or the dispatch or message "
    "policy refuses the call; details.reasons says why",
    404: "no such resource; also every route but the agent routes on a connection made to "
    "the agent address (the internal network's gateway)",
    405: "the path exists but not with this method; Allow lists the methods it has",
    409: "the resource is not in a state that allows the call",
    413: "the body is over the hub's limit (--max-body-bytes)",
    415: "the body is not application/json",
    422: "the configuration on disk is invalid; the one in force stays",
    429: "over a rate limit; retry after Retry-After seconds",
    500: "a bug; the hub's log has the request id",
    502: "the agent or the container engine could not be reached, or the agent failed",
    503: "degraded (Retry-After) or the state database cannot be written",
    504: "the agent did not answer in time",
}
HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "Location": {
        "description": "the task's URL, to poll",
        "schema": {"type": "string", "pattern": "^/v1/tasks/[^/]+$"},
    },
    "Idempotent-Replayed": {
        "description": "present when the answer is the task an earlier request created",
        "schema": {"const": "true"},
    },
    "RateLimit": {
        "description": "the limit's remaining quota and reset (IETF RateLimit header fields)",
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": "the limit's quota policy (IETF RateLimit header fields)",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {
        "description": "the scheme to authenticate with (RFC 6750 error for a bad token)",
        "schema": {"type": "string", "pattern": "^Bearer "},
    },
    "Allow": {
        "description": "the methods this path answers to",
        "schema": {"type": "string", "pattern": "^[A-Z]+(, [A-Z]+)*$"},
    },
    "X-Request-Id": {
        "description": "the request's id (the caller's X-Request-Id, or a new one)",
        "schema": {"type": "string", "minLength": 1},
    },
    "Cache-Control": {"description": "how long the answer may be cached", "schema": {}},
}
NULLABLE_STRING = {"type": ["string", "null"]}


def ref(kind: str, name: str) -> dict[str, str]:
    """A reference to ``#/components/<kind>/<name>``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def header_refs(*names: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """Response headers by name (always with X-Request-Id); ``required`` ones are always sent."""
    wanted = set(required)
    out: dict[str, Any] = {}
    for name in ("X-Request-Id", *names):
        if name in wanted or name == "X-Request-Id":
            out[name] = {**HEADERS[name], "required": True}
        else:
            out[name] = ref("headers", name)
    return out


def json_response(
    description: str,
    schema: Mapping[str, Any],
    *,
    headers: Iterable[str] = (),
    required_headers: Iterable[str] = (),
) -> dict[str, Any]:
    """A response with a JSON body of ``schema``."""
    return {
        "description": description,
        "headers": header_refs(*headers, required=required_headers),
        "content": {"application/json": {"schema": dict(schema)}},
    }


def text_response(description: str, media_type: str) -> dict[str, Any]:
    """A response with a non-JSON body."""
    return {
        "description": description,
        "headers": header_refs(),
        "content": {media_type: {"schema": {"type": "string"}}},
    }


def json_body(schema: Mapping[str, Any], example: Any = None) -> dict[str, Any]:
    """A required JSON request body (with an example of it, when given)."""
    media: dict[str, Any] = {"schema": dict(schema)}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


def param(name: str, where: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    """A parameter; path parameters are required."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": dict(schema),
        "description": description,
    }


def operation(
    summary: str,
    responses: Mapping[str, Any],
    *,
    security: list[dict[str, list[str]]] | None = None,
    body: Mapping[str, Any] | None = None,
    parameters: Iterable[Mapping[str, Any]] = (),
    errors: Iterable[int] = (),
    agent_route: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    """An operation with every error status it can answer.

    Every operation can answer 405 (for its path) and 500; an authenticated one 401, 403
    (API policy), 429 and 503; one with a body 400, 413 and 415; one that is not an agent
    route 404 (on the agent address).
    """
    statuses = {405, 500, *errors}
    if security is not None:
        statuses |= {401, 403, 429, 503}
    if body is not None:
        statuses |= {400, 413, 415}
    if not agent_route:
        statuses.add(404)
    op: dict[str, Any] = {"summary": summary}
    if description:
        op["description"] = description
    if security is not None:
        op["security"] = security
    params = list(parameters)
    if params:
        op["parameters"] = [dict(p) for p in params]
    if body is not None:
        op["requestBody"] = dict(body)
    op["responses"] = {
        **dict(responses),
        **{str(s): ref("responses", STATUS_TEXT[s]) for s in sorted(statuses)},
    }
    return op


def error_response(status: int) -> dict[str, Any]:
    codes = sorted(code for code, s in ERROR_CODES.items() if s == status)
    schema = {
        "allOf": [
            ref("schemas", "Error"),
            {"properties": {"error": {"properties": {"code": {"enum": codes}}}}},
        ]
    }
    headers: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
        401: (("WWW-Authenticate",), ("WWW-Authenticate",)),
        405: (("Allow",), ("Allow",)),
        429: (("Retry-After", "RateLimit", "RateLimit-Policy"), ("Retry-After",)),
        503: (("Retry-After",), ()),
    }
    names, required = headers.get(status, ((), ()))
    return json_response(
        f"{_STATUS_WHEN[status]} (codes: {', '.join(codes)})",
        schema,
        headers=names,
        required_headers=required,
    )


# --- the request bodies' JSON Schemas, inlined ------------------------------------------


def _component_name(rel: str) -> str:
    return BODY_SCHEMAS.get(rel) or "schemas." + rel.removesuffix(".json").replace("/", ".")


def _pointer_of_anchor(doc: Any, anchor: str, path: str = "") -> str | None:
    if isinstance(doc, dict):
        if doc.get("$anchor") == anchor:
            return path
        items: Iterable[tuple[str, Any]] = doc.items()
    elif isinstance(doc, list):
        items = ((str(i), v) for i, v in enumerate(doc))
    else:
        return None
    for key, value in items:
        escaped = key.replace("~", "~0").replace("/", "~1")
        found = _pointer_of_anchor(value, anchor, f"{path}/{escaped}")
        if found is not None:
            return found
    return None


def inline_schemas(documents: Mapping[str, Any], roots: Iterable[str]) -> dict[str, Any]:
    """``roots`` and every schema they reference, as components whose ``$ref`` stay inside.

    ``documents`` maps a path under ``schemas/`` to its JSON Schema (as ``SchemaSet`` loads
    them: each under ``SCHEMAS_BASE`` + path unless it declares its own ``$id``). A ``$ref``
    to another file becomes ``#/components/schemas/<name>`` plus its fragment; one that
    names nothing loaded is left as it is (the unit test finds it).
    """
    by_uri: dict[str, str] = {}
    for rel, doc in documents.items():
        by_uri[SCHEMAS_BASE + rel] = rel
        if isinstance(doc, dict) and isinstance(doc.get("$id"), str):
            by_uri[urldefrag(doc["$id"]).url] = rel
    out: dict[str, Any] = {}
    pending = [r for r in roots if r in documents]
    while pending:
        rel = pending.pop()
        name = _component_name(rel)
        if name in out:
            continue
        doc = documents[rel]
        base = SCHEMAS_BASE + rel
        if isinstance(doc, dict) and isinstance(doc.get("$id"), str):
            base = urljoin(base, doc["$id"])

        def rewrite(node: Any, base: str = base, rel: str = rel) -> Any:
            if isinstance(node, list):
                return [rewrite(v) for v in node]
            if not isinstance(node, dict):
                return node
            new = {k: rewrite(v) for k, v in node.items() if k not in ("$id", "$schema")}
            target = node.get("$ref")
            if isinstance(target, str):
                url, fragment = urldefrag(urljoin(base, target))
                target_rel = by_uri.get(url, rel if url == base else None)
                if target_rel is not None:
                    pending.append(target_rel)
                    if fragment and not fragment.startswith("/"):
                        fragment = _pointer_of_anchor(documents[target_rel], fragment) or ""
                    new["$ref"] = f"#/components/schemas/{_component_name(target_rel)}{fragment}"
            return new

        out[name] = rewrite(copy.deepcopy(doc)) if isinstance(doc, dict) else doc
    return out


def read_schemas(root: Path) -> dict[str, Any]:
    # Only when the hub has no configuration in force: read the files as they are, and
    # leave out what does not parse (the hub is degraded then and says why elsewhere).
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        try:
            found[path.relative_to(root).as_posix()] = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
    return found
