"""The aiohttp application: parse, authenticate, call the hub, map errors. Nothing else.

Every handler asks the API policy first (``gateway.http.access.authorize``): who may make
which call is in ``policies/api.rego``, not here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.containers.backend import ContainerBackend
from gateway.errors import BadRequest, ConfigError, GatewayError, InvalidConfig
from gateway.http.a2a import setup_a2a_routes
from gateway.http.access import admit_submission, authorize, authorize_subject
from gateway.http.agent_routes import agent_get_task, presents_svid, setup_agent_routes
from gateway.http.appkeys import HUB, KEYS, MAX_BODY
from gateway.http.audit import setup_audit_routes
from gateway.http.mcp import setup_mcp_routes
from gateway.http.middlewares import error_middleware, read_json
from gateway.http.openapi import openapi_document
from gateway.http.openapi_parts import MAX_CURSOR_DIGITS
from gateway.http.task_events import setup_task_event_routes
from gateway.http.views import task_view
from gateway.hub import Hub
from gateway.routers.access import task_resource
from gateway.settings import Settings
from gateway.store import TERMINAL_STATES

routes = web.RouteTableDef()


def _float_param(request: web.Request, name: str, low: float, high: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(
            f"query parameter {name!r} must be a number", details={"parameter": name}
        ) from None
    if not low <= value <= high:
        raise BadRequest(
            f"query parameter {name!r} must be within [{low:g}, {high:g}]",
            details={"parameter": name},
        )
    return value


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = _float_param(request, name, low, high)
    if value is None:
        return default
    if value != int(value):
        raise BadRequest(
            f"query parameter {name!r} must be an integer", details={"parameter": name}
        )
    return int(value)


def _cursor_param(request: web.Request) -> int | None:
    # ASCII digits only ("²".isdigit() is true), and few enough to fit SQLite's INTEGER.
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_CURSOR_DIGITS):
        raise BadRequest("cursor is not valid", details={"parameter": "cursor"})
    return int(raw)


# --- tasks ----------------------------------------------------------------------------


@routes.post("/v1/tasks")
async def submit_task(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    wait = _float_param(request, "wait", 0, hub.settings.max_wait_s)
    # Limits first: a refused submission is neither evaluated nor logged.
    with admit_submission(request), hub.limiter.long_poll(wait):
        return await _submit_task(request, hub, wait)


async def _submit_task(request: web.Request, hub: Hub, wait: float | None) -> web.Response:
    # The API decision's record is written with the task (one commit); if no task is
    # written (a bad body, a denied dispatch, a replay), it is written on its own.
    subject, access = await authorize_subject(request, defer=True)
    try:
        body = await read_json(request)
        idem = request.headers.get("Idempotency-Key")
        if idem is not None and not 1 <= len(idem) <= 255:
            raise BadRequest("Idempotency-Key must be 1 to 255 characters")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        task, created = await hub.router.submit(
            subject,
            body,
            request={
                "method": request.method,
                "path": request.path,
                "remote_addr": peer[0] if peer else None,
                "time": dt.datetime.now(dt.UTC).isoformat(),
                # The caller's W3C trace context; the router starts one when it is absent.
                "traceparent": request.headers.get("traceparent"),
            },
            idempotency_key=idem,
            records=access.pending,
        )
    finally:
        if access.pending:
            await asyncio.shield(hub.access.commit(access))
    # Read again (with its history) even without a wait: the runner may have moved it on.
    task = await hub.router.wait_for(task.id, wait or 0)
    status = 200 if task.terminal else 202
    headers = {"Location": f"/v1/tasks/{task.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(task_view(task), status=status, headers=headers)


@routes.get("/v1/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    if presents_svid(request):  # an agent polling a task it delegated
        return await agent_get_task(request)
    hub = request.app[HUB]
    wait = _float_param(request, "wait", 0, hub.settings.max_wait_s)
    task_id = request.match_info["task_id"]
    with hub.limiter.long_poll(wait):  # before the policy, like every limit
        task = await hub.router.get(task_id)
        await authorize_subject(request, task_resource(task))
        if wait and not task.terminal:
            task = await hub.router.wait_for(task_id, wait)
    return web.json_response(task_view(task))


@routes.get("/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    subject, access = await authorize_subject(request, {"kind": "tasks"})
    limit = _int_param(request, "limit", 50, 1, 500)
    before = _cursor_param(request)
    state = request.query.get("state")
    if state is not None and state not in ("pending", "dispatched", "running", *TERMINAL_STATES):
        raise BadRequest(f"unknown state {state!r}", details={"parameter": "state"})
    tasks, next_cursor = await hub.router.list(
        subject=None if access.sees_all else subject.id,
        state=state,
        agent=request.query.get("agent"),
        limit=limit,
        before=before,
    )
    return web.json_response(
        {
            "tasks": [task_view(t) for t in tasks],
            "next_cursor": str(next_cursor) if next_cursor is not None else None,
        }
    )


@routes.delete("/v1/tasks/{task_id}")
async def cancel_task(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    task_id = request.match_info["task_id"]
    subject, _ = await authorize_subject(request, task_resource(await hub.router.get(task_id)))
    task = await hub.router.cancel(task_id, by=subject.id)
    return web.json_response(task_view(task))


# --- registry, decisions, status ------------------------------------------------------


@routes.get("/v1/agents")
async def list_agents(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request, {"kind": "agents"})
    return web.json_response(
        {
            "revision": hub.config.registry_revision,
            "agents": list(hub.config.registry.to_json().values()),
        }
    )


@routes.get("/v1/agents/{name}")
async def get_agent(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request, {"kind": "agent", "name": request.match_info["name"]})
    agent = hub.config.registry.get(request.match_info["name"])
    return web.json_response({"revision": hub.config.registry_revision, **agent.to_json()})


@routes.get("/v1/decisions")
async def list_decisions(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request, {"kind": "decisions"})
    limit = _int_param(request, "limit", 50, 1, 500)
    allow_raw = request.query.get("allow") or request.query.get("decision")
    allow: bool | None = None
    if allow_raw is not None:
        mapping = {"true": True, "allow": True, "false": False, "deny": False}
        if allow_raw not in mapping:
            raise BadRequest("decision must be allow or deny", details={"parameter": "decision"})
        allow = mapping[allow_raw]
    before = _cursor_param(request)
    records, next_cursor = await hub.decisions.list(
        allow=allow,
        agent=request.query.get("agent"),
        subject=request.query.get("subject"),
        kind=request.query.get("kind"),
        since=request.query.get("since"),
        until=request.query.get("until"),
        limit=limit,
        before=before,
    )
    return web.json_response(
        {"decisions": records, "next_cursor": str(next_cursor) if next_cursor else None}
    )


@routes.get("/v1/decisions/{decision_id}")
async def get_decision(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    decision_id = request.match_info["decision_id"]
    await authorize_subject(request, {"kind": "decision", "id": decision_id})
    return web.json_response(await hub.decisions.get(decision_id))


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request)
    return web.json_response(await hub.status())


@routes.post("/v1/admin/reload")
async def admin_reload(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request)
    try:
        revisions = await hub.reload()
    except ConfigError as e:
        # The details are what /v1/status shows: location, failing tests, kept revisions.
        raise InvalidConfig(
            f"reload refused: {e.message}",
            details=hub.reloader.last_error or {"location": e.location},
        ) from None
    return web.json_response(
        {"reloaded": True, "revisions": revisions, "reload": hub.reloader.last_reload}
    )


@routes.post("/v1/admin/identity/rotate")
async def admin_rotate_identity_key(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request)
    return web.json_response(hub.identities.rotate())


@routes.post("/v1/admin/mode")
async def admin_mode(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize_subject(request)
    body = await read_json(request)
    mode = body.get("mode") if isinstance(body, dict) else None
    if mode not in ("normal", "degraded", "auto"):
        raise BadRequest(
            "mode must be 'normal', 'degraded' or 'auto'", details={"pointer": "/mode"}
        )
    hub.modes.force(None if mode == "auto" else mode)
    return web.json_response({"mode": hub.modes.mode, "forced_mode": hub.modes.forced})


# --- health, metrics, description ---------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    await authorize(request, {"kind": "public"})
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize(request, {"kind": "public"})
    reason = hub.modes.blocker()
    if reason:
        return web.json_response(
            {"status": "degraded", "reason": reason}, status=503, headers={"Retry-After": "5"}
        )
    return web.json_response({"status": "ready"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize(request, {"kind": "public"})
    await hub.status()  # refreshes the gauges read from the store
    return web.Response(body=hub.metrics.render(), content_type="text/plain", charset="utf-8")


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize(request, {"kind": "public"})
    schemas = hub.config.schemas.documents if hub.has_config else None
    return web.json_response(openapi_document(settings=hub.settings, schemas=schemas))


def create_app(settings: Settings, *, backend: ContainerBackend | None = None) -> web.Application:
    """The hub as an aiohttp application; the Hub starts and stops with the app."""
    hub = Hub(settings, backend=backend)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware(on_request=hub.metrics.observe_request)],
    )
    app[HUB] = hub
    app[KEYS] = hub.keys
    app[MAX_BODY] = settings.max_body_bytes
    # First: /v1/decisions/verify must be matched before /v1/decisions/{decision_id}.
    setup_audit_routes(app, hub)
    app.add_routes(routes)
    setup_agent_routes(app, hub)
    setup_task_event_routes(app)
    setup_a2a_routes(app, hub)
    setup_mcp_routes(app, hub)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await hub.start()
        yield
        await hub.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["HUB", "GatewayError", "create_app", "task_view"]
