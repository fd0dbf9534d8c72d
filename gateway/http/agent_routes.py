"""HTTP routes for agents (authenticated by JWT-SVID): messages, results, identity.

| route | who |
|---|---|
| ``POST /v1/messages`` | an agent (``Authorization: Bearer <JWT-SVID>``) |
| ``POST /v1/tasks/{task_id}/result`` | the container instance running that task |
| ``POST /v1/tasks/{task_id}/progress`` | the same (progress for the task's event streams) |
| ``POST /v1/identity/renew`` | an agent with a still-valid token of this hub |
| ``GET /v1/identity/bundle`` | anyone (public keys only) |

``GET /v1/tasks/{task_id}`` also accepts an agent's token (for the tasks it delegated and its
own); ``gateway.http.app`` hands those requests to ``agent_get_task``. Parsing,
authentication and the status code of each outcome only: the routing logic is in
``gateway.routers.messages``, the response bodies in ``gateway.http.views``.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from aiohttp import web

from gateway import ids
from gateway.errors import BadRequest, NotTaskOwner, PayloadTooLarge, Unauthorized, UnknownTask
from gateway.http.appkeys import HUB
from gateway.http.middlewares import read_json
from gateway.http.views import child_view, delegated_view, delivered_view, replied_view
from gateway.hub import Hub
from gateway.routers.events import PROGRESS
from gateway.routers.messages import Delegated, Replied, Sender

SENDER = "agent_sender"
MAX_PROGRESS_MESSAGE = 2000
routes = web.RouteTableDef()


def bearer_token(request: web.Request) -> str | None:
    """The token in ``Authorization: Bearer <token>``; None when there is no header."""
    header = request.headers.get("Authorization", "")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization header must be 'Bearer <JWT-SVID>'")
    return value.strip()


def presents_svid(request: web.Request) -> bool:
    """Whether the request carries a JWT (three dot-separated parts) rather than an API key."""
    header = request.headers.get("Authorization", "")
    return header[:7].lower() == "bearer " and header.count(".") == 2


def authenticate_agent(request: web.Request) -> Sender:
    """The verified sender of the request, or an Unauthorized subclass saying why not."""
    cached = request.get(SENDER)
    if cached is None:
        hub = request.app[HUB]
        identity = hub.identities.verify(bearer_token(request))
        cached = request[SENDER] = hub.messages.sender(identity)
    return cached


def _wait(request: web.Request, hub: Hub) -> float | None:
    raw = request.query.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("query parameter 'wait' must be a number") from None
    if not 0 <= value <= hub.settings.max_wait_s:
        raise BadRequest(f"query parameter 'wait' must be within [0, {hub.settings.max_wait_s:g}]")
    return value


def _request_info(request: web.Request) -> dict[str, Any]:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {
        "method": request.method,
        "path": request.path,
        "remote_addr": peer[0] if peer else None,
        "time": dt.datetime.now(dt.UTC).isoformat(),
    }


@routes.post("/v1/messages")
async def post_message(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    sender = authenticate_agent(request)
    # Before the policy and its log: a flood of messages is counted, not written.
    hub.limiter.message(sender.identity.instance_id or sender.spiffe_id, sender.identity.agent)
    wait = _wait(request, hub)
    body = await read_json(request)
    # Only a delegation (a child task) records where its request came from.
    delegate = isinstance(body, dict) and body.get("type") == "delegate"
    # The agent's trace context (else its task's trace), for the decision and the child.
    parent = hub.router.trace_of(sender.instance.task_id) if sender.instance else None
    trace = {"traceparent": ids.traceparent(request.headers.get("traceparent"), parent=parent)}
    info = {**_request_info(request), **trace} if delegate else trace
    idem = request.headers.get("Idempotency-Key")
    if idem is not None and not 1 <= len(idem) <= 255:
        raise BadRequest("Idempotency-Key must be 1 to 255 characters")
    with hub.limiter.long_poll(wait if delegate else None):
        routed = await hub.messages.send(
            sender, body, wait_s=wait, request=info, idempotency_key=idem if delegate else None
        )
    if isinstance(routed, Delegated):
        # 200 once the child has ended (within the wait), else 202: poll its Location.
        return web.json_response(
            delegated_view(routed),
            status=200 if routed.task.terminal else 202,
            headers={"Location": f"/v1/tasks/{routed.task.id}"},
        )
    if isinstance(routed, Replied):
        return web.json_response(replied_view(routed))
    return web.json_response(delivered_view(routed), status=202)


@routes.post("/v1/tasks/{task_id}/result")
async def post_result(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    sender = authenticate_agent(request)
    body = await read_json(request)
    task = await hub.messages.report_result(sender, request.match_info["task_id"], body)
    return web.json_response({"task_id": task.id, "state": task.state})


@routes.post("/v1/tasks/{task_id}/progress")
async def post_progress(request: web.Request) -> web.Response:
    """``POST /v1/tasks/{task_id}/progress``: an event for the task's streams
    (``GET /v1/tasks/{id}/events``, A2A streams)."""
    hub = request.app[HUB]
    sender = authenticate_agent(request)
    task_id = request.match_info["task_id"]
    if sender.instance is None or sender.instance.task_id != task_id:
        raise NotTaskOwner(f"this instance does not run task {task_id}")
    # Counted like messages: a progress flood is refused before it reaches any stream.
    hub.limiter.message(sender.identity.instance_id or sender.spiffe_id, sender.identity.agent)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be an object", details=[{"pointer": "", "message": "object"}])
    message = body.get("message")
    fraction = body.get("fraction")
    if not isinstance(message, str):
        raise BadRequest("message must be a string", details=[{"pointer": "/message"}])
    if len(message) > MAX_PROGRESS_MESSAGE:
        raise PayloadTooLarge(f"message is over {MAX_PROGRESS_MESSAGE} characters")
    if fraction is not None and (
        not isinstance(fraction, int | float)
        or isinstance(fraction, bool)
        or not math.isfinite(fraction)
        or not 0 <= fraction <= 1
    ):
        raise BadRequest("fraction must be a number in [0, 1]", details=[{"pointer": "/fraction"}])
    data: dict[str, Any] = {"message": message, "fraction": fraction}
    if isinstance(body.get("sent_at"), int | float):
        data["sent_at"] = body["sent_at"]
    event = hub.events.publish(task_id, PROGRESS, data)
    return web.json_response({"task_id": task_id, "event_id": event.id}, status=202)


@routes.post("/v1/identity/renew")
async def renew_identity(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    svid = hub.identities.renew(bearer_token(request))
    return web.json_response(
        {"token": svid.token, "spiffe_id": svid.spiffe_id, "expires_at": int(svid.expires_at)}
    )


@routes.get("/v1/identity/bundle")
async def identity_bundle(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    return web.json_response(
        hub.identities.bundle(),
        headers={"Cache-Control": f"max-age={hub.settings.svid_ttl_s // 2}"},
    )


async def agent_get_task(request: web.Request) -> web.Response:
    """``GET /v1/tasks/{task_id}`` for an agent: its own task or one it delegated."""
    hub = request.app[HUB]
    sender = authenticate_agent(request)
    task_id = request.match_info["task_id"]
    wait = _wait(request, hub)
    own = sender.instance.task_id if sender.instance else None
    task = await hub.store.get_task(task_id)
    if own is None or own not in (task.id, task.parent_id):
        raise UnknownTask(f"no task {task_id!r}")
    if wait and not task.terminal:
        with hub.limiter.long_poll(wait):
            task = await hub.router.wait_for(task_id, wait)
    return web.json_response(child_view(task))


def setup_agent_routes(app: web.Application, hub: Hub) -> None:
    """Add the agent-facing routes to ``app`` (called by ``gateway.http.app.create_app``)."""
    app[HUB] = hub
    app.add_routes(routes)
