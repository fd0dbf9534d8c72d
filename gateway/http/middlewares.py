"""HTTP middlewares and request helpers: errors as JSON, body limits, authentication.

This is the one place where the gateway's typed errors become HTTP responses.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.errors import (
    GatewayError,
    MalformedJSON,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from gateway.http.appkeys import KEYS, MAX_BODY
from gateway.identity.apikeys import Subject
from gateway.ids import uuid4_hex
from gateway.logs import bound, get_logger

log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SUBJECT = "subject"


def error_response(err: GatewayError, request_id: str | None = None) -> web.Response:
    """The JSON response for a gateway error."""
    body = err.to_json()
    if request_id:
        body["error"]["request_id"] = request_id
    headers = dict(err.headers)
    if err.status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="agent-gateway"')
    return web.json_response(body, status=err.status, headers=headers)


def error_middleware(
    *, on_request: Callable[[str, str, int, float], None] | None = None
) -> Callable[..., Any]:
    """Map every failure to ``{"error": {...}}``; never a stack trace; log one line a request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or uuid4_hex()[:16]
        start = time.perf_counter()
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        with bound(request_id=request_id):
            try:
                response = await handler(request)
            except GatewayError as e:
                response = error_response(e, request_id)
                if e.status >= 500:
                    log.warning("request failed", extra={"code": e.code, "error": e.message})
            except web.HTTPException as e:
                response = error_response(_from_http_exception(e), request_id)
            except Exception:
                log.exception("unhandled error", extra={"path": request.path})
                response = error_response(
                    GatewayError("internal error; see the hub's log", details=None), request_id
                )
            response.headers["X-Request-Id"] = request_id
            elapsed = time.perf_counter() - start
            if on_request is not None:
                on_request(route_name, request.method, response.status, elapsed)
            if log.isEnabledFor(logging.DEBUG):  # the line's fields cost more than the check
                log.debug(
                    "request",
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "status": response.status,
                        "ms": round(elapsed * 1000, 2),
                    },
                )
            return response

    return middleware


def _from_http_exception(e: web.HTTPException) -> GatewayError:
    if e.status == 404:
        return NotFound("no such endpoint")
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return MethodNotAllowed(
            f"{e.method} is not allowed on this endpoint; it allows {allowed}",
            details={"allowed": sorted(e.allowed_methods)},
            headers={"Allow": allowed},
        )
    if e.status == 413:
        return PayloadTooLarge("request body is too large")
    err = GatewayError(e.reason or "HTTP error")
    err.status = e.status
    err.code = "http_error"
    return err


def presented_key(request: web.Request) -> str | None:
    """The API key in ``Authorization: Bearer <key>`` (or ``X-API-Key``); None if none."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <API key>'")
        return value.strip()
    return request.headers.get("X-API-Key") or None


def authenticate(request: web.Request) -> Subject:
    """The caller's subject from its API key; Unauthorized when it has none or a bad one.

    Authentication only: what the subject may do is the API policy's (``gateway.http.access``).
    """
    cached = request.get(SUBJECT)
    if cached is None:
        cached = request[SUBJECT] = request.app[KEYS].authenticate(presented_key(request))
    return cached


def authenticate_optional(request: web.Request) -> Subject | None:
    """The caller's subject, or None for a caller that presents no key (a bad key is 401)."""
    if request.get(SUBJECT) is None and presented_key(request) is None:
        return None
    return authenticate(request)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON: 415 if not JSON, 413 if over the limit, 400 if malformed."""
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {ctype or 'missing'!r}"
        )
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}",
            details={"limit": limit},
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"request body is over the limit of {limit} bytes", details={"limit": limit}
        ) from None
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    try:
        text = raw.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise MalformedJSON(f"body is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MalformedJSON(
            f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
            details={"line": e.lineno, "column": e.colno},
        ) from None
