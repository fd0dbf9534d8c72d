"""The aiohttp application: parse, authenticate, call the hub, map errors. Nothing else."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.containers.backend import ContainerBackend
from gateway.errors import BadRequest, ConfigError, GatewayError, InvalidConfig
from gateway.http.agent_routes import agent_get_task, presents_svid, setup_agent_routes
from gateway.http.audit import setup_audit_routes
from gateway.http.middlewares import KEYS, MAX_BODY, authenticate, error_middleware, read_json
from gateway.http.openapi import openapi_document
from gateway.hub import Hub
from gateway.settings import Settings
from gateway.store import TERMINAL_STATES

HUB = web.AppKey("hub", Hub)
routes = web.RouteTableDef()


def task_view(task: dict[str, Any]) -> dict[str, Any]:
    """A stored task as the API shows it."""
    view: dict[str, Any] = {
        "task_id": task["id"],
        "state": task["state"],
        "agent": task["agent"],
        "capability": task.get("capability"),
        "subject": task.get("subject"),
        "decision_id": task.get("decision_id"),
        "timeout_s": task.get("timeout_s"),
        "created_at": task.get("created_at"),
        "updated_at": task.get("updated_at"),
        "container": (
            {"id": task["container_id"], "name": task.get("container_name")}
            if task.get("container_id")
            else None
        ),
        "labels": task.get("labels"),
    }
    if task.get("sandbox") is not None:
        view["sandbox"] = task["sandbox"]
    if task.get("result") is not None:
        view["result"] = task["result"]
    if task.get("error") is not None:
        view["error"] = task["error"]
    if "history" in task:
        view["history"] = task["history"]
    return view


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


# --- tasks ----------------------------------------------------------------------------


@routes.post("/v1/tasks")
async def submit_task(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    subject = authenticate(request)
    wait = _float_param(request, "wait", 0, hub.settings.max_wait_s)
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
        },
        idempotency_key=idem,
    )
    if wait:
        await hub.router.wait(task["id"], wait)
    task = await hub.store.get_task(task["id"])
    status = 200 if task["state"] in TERMINAL_STATES else 202
    headers = {"Location": f"/v1/tasks/{task['id']}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(task_view(task), status=status, headers=headers)


@routes.get("/v1/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    if presents_svid(request):  # an agent polling a task it delegated
        return await agent_get_task(request)
    hub = request.app[HUB]
    subject = authenticate(request)
    wait = _float_param(request, "wait", 0, hub.settings.max_wait_s)
    task_id = request.match_info["task_id"]
    task = await hub.router.get(task_id, subject)
    if wait and task["state"] not in TERMINAL_STATES:
        await hub.router.wait(task_id, wait)
        task = await hub.router.get(task_id, subject)
    return web.json_response(task_view(task))


@routes.get("/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    subject = authenticate(request)
    limit = _int_param(request, "limit", 50, 1, 500)
    cursor = request.query.get("cursor")
    before = None
    if cursor is not None:
        if not cursor.isdigit():
            raise BadRequest("cursor is not valid", details={"parameter": "cursor"})
        before = int(cursor)
    state = request.query.get("state")
    if state is not None and state not in ("pending", "dispatched", "running", *TERMINAL_STATES):
        raise BadRequest(f"unknown state {state!r}", details={"parameter": "state"})
    tasks, next_cursor = await hub.router.list(
        subject, state=state, agent=request.query.get("agent"), limit=limit, before=before
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
    subject = authenticate(request)
    task = await hub.router.cancel(request.match_info["task_id"], subject)
    return web.json_response(task_view(task))


# --- registry, decisions, status ------------------------------------------------------


@routes.get("/v1/agents")
async def list_agents(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request)
    return web.json_response(
        {
            "revision": hub.config.registry_revision,
            "agents": list(hub.config.registry.to_json().values()),
        }
    )


@routes.get("/v1/agents/{name}")
async def get_agent(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request)
    agent = hub.config.registry.get(request.match_info["name"])
    return web.json_response({"revision": hub.config.registry_revision, **agent.to_json()})


@routes.get("/v1/decisions")
async def list_decisions(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request, role="auditor")
    limit = _int_param(request, "limit", 50, 1, 500)
    allow_raw = request.query.get("allow") or request.query.get("decision")
    allow: bool | None = None
    if allow_raw is not None:
        mapping = {"true": True, "allow": True, "false": False, "deny": False}
        if allow_raw not in mapping:
            raise BadRequest("decision must be allow or deny", details={"parameter": "decision"})
        allow = mapping[allow_raw]
    cursor = request.query.get("cursor")
    if cursor is not None and not cursor.isdigit():
        raise BadRequest("cursor is not valid", details={"parameter": "cursor"})
    records, next_cursor = await hub.decisions.list(
        allow=allow,
        agent=request.query.get("agent"),
        subject=request.query.get("subject"),
        kind=request.query.get("kind"),
        since=request.query.get("since"),
        until=request.query.get("until"),
        limit=limit,
        before=int(cursor) if cursor else None,
    )
    return web.json_response(
        {"decisions": records, "next_cursor": str(next_cursor) if next_cursor else None}
    )


@routes.get("/v1/decisions/{decision_id}")
async def get_decision(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request, role="auditor")
    return web.json_response(await hub.decisions.get(request.match_info["decision_id"]))


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request, role="operator")
    return web.json_response(await hub.status())


@routes.post("/v1/admin/reload")
async def admin_reload(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request, role="operator")
    try:
        revisions = await hub.reload()
    except ConfigError as e:
        # The details are what /v1/status shows: location, failing tests, kept revisions.
        raise InvalidConfig(
            f"reload refused: {e.message}",
            details=hub.last_reload_error or {"location": e.location},
        ) from None
    return web.json_response(
        {"reloaded": True, "revisions": revisions, "reload": hub.reloader.last_reload}
    )


@routes.post("/v1/admin/identity/rotate")
async def admin_rotate_identity_key(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request, role="operator")
    return web.json_response(hub.identities.rotate())


@routes.post("/v1/admin/mode")
async def admin_mode(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    authenticate(request, role="operator")
    body = await read_json(request)
    mode = body.get("mode") if isinstance(body, dict) else None
    if mode not in ("normal", "degraded", "auto"):
        raise BadRequest(
            "mode must be 'normal', 'degraded' or 'auto'", details={"pointer": "/mode"}
        )
    hub.set_mode(None if mode == "auto" else mode)
    return web.json_response({"mode": hub.mode, "forced_mode": hub.forced_mode})


# --- health, metrics, description ---------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    reason = hub.dispatch_blocker()
    if reason:
        return web.json_response(
            {"status": "degraded", "reason": reason}, status=503, headers={"Retry-After": "5"}
        )
    return web.json_response({"status": "ready"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await hub.status()  # refreshes the gauges read from the store
    return web.Response(body=hub.metrics.render(), content_type="text/plain", charset="utf-8")


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


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

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await hub.start()
        yield
        await hub.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["HUB", "GatewayError", "create_app", "task_view"]
