"""Task event streams: ``GET /v1/tasks/{task_id}/events`` and agents' progress reports.

| route | who |
|---|---|
| ``GET /v1/tasks/{task_id}/events`` | whoever may read the task (API key, ``api.rego``) |
| ``POST /v1/tasks/{task_id}/progress`` | the container instance running that task (SVID; in
  ``gateway.http.agent_routes``) |

The stream is ``text/event-stream``: ``state`` and ``progress`` events with per-task ids, a
comment every ``KEEPALIVE_S`` to keep proxies from closing it, and the task's final state as
the last event (then the response ends). ``Last-Event-ID`` (or ``?after=``) resumes after the
given event from the task's buffer (``gateway.routers.events``). A stream of a task that ended
before the hub last started replays nothing but gets the stored final state.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import BadRequest
from gateway.http.access import authorize_subject
from gateway.http.appkeys import HUB
from gateway.routers.access import task_resource
from gateway.routers.events import StreamEvent

KEEPALIVE_S = 15.0
routes = web.RouteTableDef()


def _after(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
        raise BadRequest("Last-Event-ID must be an event id", details={"parameter": "after"})
    return int(raw)


@routes.get("/v1/tasks/{task_id}/events")
async def task_events(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    task_id = request.match_info["task_id"]
    after = _after(request)
    task = await hub.router.get(task_id)
    await authorize_subject(request, task_resource(task))
    sub = hub.events.subscribe(task_id, after=after)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await resp.prepare(request)
        # Read after subscribing: an end between the two is in the subscription.
        task = await hub.router.get(task_id)
        if task.terminal and not hub.events.ended(task_id):
            await resp.write(_stored_final(task))
            return resp
        while True:
            event = await sub.next(KEEPALIVE_S)
            if event is None:
                if sub.finished:
                    break
                stored = await hub.router.get(task_id)
                if stored.terminal and not hub.events.ended(task_id):
                    await resp.write(_stored_final(stored))
                    break
                await resp.write(b": keepalive\n\n")
                continue
            await resp.write(_with_result(event, await _final_task(hub, event)))
            if event.final:
                break
    except (ConnectionResetError, ConnectionError):
        pass  # the consumer went away; its queue goes with the subscription
    finally:
        sub.close()
    return resp


async def _final_task(hub: Any, event: StreamEvent) -> Any:
    return await hub.router.get(event.task_id) if event.final else None


def _with_result(event: StreamEvent, task: Any) -> bytes:
    if task is None:
        return event.sse()
    data = {**event.data, "state": task.state}
    if task.result is not None:
        data["result"] = task.result
    if task.error is not None:
        data["error"] = task.error
    return StreamEvent(event.id, event.task_id, event.kind, data, True, event.at).sse()


def _stored_final(task: Any) -> bytes:
    data: dict[str, Any] = {"task_id": task.id, "state": task.state, "final": True}
    if task.result is not None:
        data["result"] = task.result
    if task.error is not None:
        data["error"] = task.error
    return f"event: state\ndata: {json.dumps(data)}\n\n".encode()


def setup_task_event_routes(app: web.Application) -> None:
    """Add the event stream to ``app``."""
    app.add_routes(routes)
