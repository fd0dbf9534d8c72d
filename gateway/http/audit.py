"""The auditor's view: a read-only web page and the chain's verification status.

| route | who |
|---|---|
| ``GET /audit`` (and its ``audit.js``, ``audit.css``) | anyone: a static page; it holds no data |
| ``GET /v1/decisions/verify`` | auditor: the hash chain verified now, and the revisions in force |

The page asks for an API key, keeps it in ``sessionStorage`` (gone when the tab closes) and
reads the auditor endpoints with it, so the page itself needs no session or cookie and the
API's role checks are the only gate. It is plain HTML and JavaScript with no build step and
nothing fetched from elsewhere; the Content-Security-Policy allows only this origin, and
logged values are rendered as text, never as HTML.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.decisionlog.verify import PROBLEM_KINDS
from gateway.http.access import authorize, authorize_subject
from gateway.http.appkeys import HUB
from gateway.http.openapi_parts import API_KEY, json_response, operation, ref, text_response
from gateway.hub import Hub

STATIC = Path(__file__).resolve().parent / "static"
# At most this many problems in one verify answer; ``problems_total`` has the full count.
MAX_PROBLEMS = 1000
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
FILES = {
    "/audit": ("index.html", "text/html"),
    "/audit/audit.js": ("audit.js", "text/javascript"),
    "/audit/audit.css": ("audit.css", "text/css"),
}
routes = web.RouteTableDef()


async def verify_decisions(request: web.Request) -> web.Response:
    """The decision log's chain, verified now, with the revisions in force."""
    hub = request.app[HUB]
    await authorize_subject(request, {"kind": "decisions"})
    report = await hub.decisions.verify()
    body = report.to_json()
    body["problems_total"] = len(report.problems)
    body["problems"] = body["problems"][:MAX_PROBLEMS]
    body["verified_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    body["revisions"] = hub.revisions() if hub.has_config else None
    return web.json_response(body)


def _static(name: str, content_type: str) -> Any:
    # Read once: the page is part of the package, not something edited while running.
    payload = (STATIC / name).read_bytes()

    async def handler(request: web.Request) -> web.Response:
        await authorize(request, {"kind": "public"})
        return web.Response(
            body=payload, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS
        )

    return handler


def setup_audit_routes(app: web.Application, hub: Hub) -> None:
    """Add the audit page and ``/v1/decisions/verify`` to ``app``.

    Call it before the routes with ``/v1/decisions/{decision_id}``: aiohttp matches in
    registration order, and ``verify`` would otherwise be taken for a decision id.
    """
    app[HUB] = hub
    app.router.add_get("/v1/decisions/verify", verify_decisions)
    for path, (name, content_type) in FILES.items():
        app.router.add_get(path, _static(name, content_type))


def audit_paths() -> dict[str, Any]:
    """OpenAPI path items for these routes (merged by ``gateway.http.openapi``)."""
    paths: dict[str, Any] = {
        path: {
            "get": operation(
                f"The auditor's web page ({name})",
                {"200": text_response("the file", content_type)},
            )
        }
        for path, (name, content_type) in FILES.items()
    }
    verified = {
        "type": "object",
        "required": ["ok", "checked", "problems", "problems_total", "head", "verified_at"],
        "properties": {
            "ok": {"type": "boolean"},
            "checked": {"type": "integer", "minimum": 0},
            "problems": {
                "type": "array",
                "maxItems": MAX_PROBLEMS,
                "items": {
                    "type": "object",
                    "required": ["kind", "message"],
                    "properties": {
                        # As stored: a tampered record's fields may have any type.
                        "seq": {},
                        "decision_id": {},
                        "kind": {"enum": list(PROBLEM_KINDS)},
                        "message": {"type": "string"},
                        # On a truncated tail: what the hub's head witness says it wrote.
                        "expected_count": {"type": ["integer", "null"]},
                        "expected_head": {"type": ["string", "null"]},
                        # On a problem with a prune's checkpoint: its id.
                        "checkpoint": {},
                    },
                },
            },
            "problems_total": {"type": "integer", "minimum": 0},
            "head": {"type": "string"},
            "start_seq": {"type": "integer", "minimum": 1},
            "checkpoint": {
                "description": "the last prune's checkpoint: the records it replaced and the "
                "SHA-256 of their export; null when the log was never pruned",
                "type": ["object", "null"],
                "properties": {
                    "id": {"type": "integer"},
                    "first_seq": {"type": "integer"},
                    "through_seq": {"type": "integer"},
                    "count": {"type": "integer"},
                    "start_hash": {"type": "string"},
                    "head_hash": {"type": "string"},
                    "export_sha256": {"type": "string"},
                    "export_name": {"type": "string"},
                    "created_at": {"type": "string"},
                    "prev_hash": {"type": "string"},
                    "hash": {"type": "string"},
                },
            },
            "witness": {
                "description": "the records the hub wrote and the last one's hash, as it "
                "recorded them with each append",
                "type": ["object", "null"],
                "properties": {"count": {"type": "integer"}, "head": {"type": "string"}},
            },
            "verified_at": {"type": "string"},
            "revisions": ref("schemas", "Revisions"),
        },
    }
    paths["/v1/decisions/verify"] = {
        "get": operation(
            "Verify the decision log's hash chain now (auditor)",
            {"200": json_response("the chain's state and the revisions in force", verified)},
            security=API_KEY,
        )
    }
    return paths
