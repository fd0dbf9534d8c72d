"""The A2A JSON-RPC door, ``POST /a2a/{agent}``: parse, negotiate the version, dispatch, map.

This follows the SDK's ``JsonRpcDispatcher`` (which is Starlette-only) step by step on
aiohttp: malformed JSON is -32700, a batch or a body that is not a JSON-RPC 2.0 request
-32600, an unknown method -32601, params that do not parse -32602 (with the field and JSON
pointer of each problem). A 1.0 method needs ``A2A-Version: 1.x``; a 0.3 method
(``message/send``, ``tasks/get``...) needs 0.x or no header (the SDK's rule: no header means
0.3); anything else is -32009. 0.3 requests are converted by the SDK's ``RequestHandler03``.
A body over the hub's limit is -32600 ("Payload too large"), as the SDK answers.

The hub's own errors become A2A's: an unknown (or concealed) task is -32001, cancelling an
ended one -32002, a schema violation -32602 with pointers into the request. Authentication
and authorization are HTTP-level in A2A: 401 and 403 (reasons and decision id in the JSON-RPC
error's data), 404 for an agent not in the registry, 429 over a limit, 503 when degraded.
Streams are Server-Sent Events; the first event is produced before the response starts, so
an upfront error is a plain JSON answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import pydantic
from a2a.compat.v0_3 import types as types_v03
from a2a.compat.v0_3.request_handler import RequestHandler03
from a2a.server.context import ServerCallContext
from a2a.server.jsonrpc_models import JSONParseError, JSONRPCError
from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.types import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    ListTasksResponse,
    SendMessageRequest,
    SendMessageResponse,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils import proto_utils
from a2a.utils.constants import VERSION_HEADER
from a2a.utils.errors import (
    A2AError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    TaskNotCancelableError,
    TaskNotFoundError,
    VersionNotSupportedError,
)
from aiohttp import web
from google.protobuf.json_format import MessageToDict, ParseDict
from jsonrpc.jsonrpc2 import JSONRPC20Request
from packaging.version import InvalidVersion, Version

from gateway import ids
from gateway.errors import (
    GatewayError,
    InvalidState,
    SchemaViolation,
    UnknownTask,
)
from gateway.http.a2a.handler import Caller, GovernedHandler
from gateway.http.access import remote_addr
from gateway.http.agent_routes import authenticate_agent, presents_svid
from gateway.http.appkeys import HUB, MAX_BODY
from gateway.http.middlewares import authenticate_optional
from gateway.logs import get_logger

log = get_logger(__name__)
# The SDK's tables (JsonRpcDispatcher.METHOD_TO_MODEL, JSONRPC03Adapter.METHOD_TO_MODEL), here
# because importing those modules pulls in Starlette.
METHODS_1_0: dict[str, type[Any]] = {
    "SendMessage": SendMessageRequest,
    "SendStreamingMessage": SendMessageRequest,
    "GetTask": GetTaskRequest,
    "ListTasks": ListTasksRequest,
    "CancelTask": CancelTaskRequest,
    "CreateTaskPushNotificationConfig": TaskPushNotificationConfig,
    "GetTaskPushNotificationConfig": GetTaskPushNotificationConfigRequest,
    "ListTaskPushNotificationConfigs": ListTaskPushNotificationConfigsRequest,
    "DeleteTaskPushNotificationConfig": DeleteTaskPushNotificationConfigRequest,
    "SubscribeToTask": SubscribeToTaskRequest,
    "GetExtendedAgentCard": GetExtendedAgentCardRequest,
}
METHODS_0_3: dict[str, type[Any]] = {
    "message/send": types_v03.SendMessageRequest,
    "message/stream": types_v03.SendStreamingMessageRequest,
    "tasks/get": types_v03.GetTaskRequest,
    "tasks/cancel": types_v03.CancelTaskRequest,
    "tasks/pushNotificationConfig/set": types_v03.SetTaskPushNotificationConfigRequest,
    "tasks/pushNotificationConfig/get": types_v03.GetTaskPushNotificationConfigRequest,
    "tasks/pushNotificationConfig/list": types_v03.ListTaskPushNotificationConfigRequest,
    "tasks/pushNotificationConfig/delete": types_v03.DeleteTaskPushNotificationConfigRequest,
    "tasks/resubscribe": types_v03.TaskResubscriptionRequest,
    "agent/getAuthenticatedExtendedCard": types_v03.GetAuthenticatedExtendedCardRequest,
}
STREAMING_1_0 = ("SendStreamingMessage", "SubscribeToTask")
STREAMING_0_3 = ("message/stream", "tasks/resubscribe")
# The 1.0 name of each 0.3 method: what the API policy sees.
NAMES_0_3 = {
    "message/send": "SendMessage",
    "message/stream": "SendStreamingMessage",
    "tasks/get": "GetTask",
    "tasks/cancel": "CancelTask",
    "tasks/pushNotificationConfig/set": "CreateTaskPushNotificationConfig",
    "tasks/pushNotificationConfig/get": "GetTaskPushNotificationConfig",
    "tasks/pushNotificationConfig/list": "ListTaskPushNotificationConfigs",
    "tasks/pushNotificationConfig/delete": "DeleteTaskPushNotificationConfig",
    "tasks/resubscribe": "SubscribeToTask",
    "agent/getAuthenticatedExtendedCard": "GetExtendedAgentCard",
}
HANDLERS_1_0 = {
    "SendMessage": "on_message_send",
    "GetTask": "on_get_task",
    "ListTasks": "on_list_tasks",
    "CancelTask": "on_cancel_task",
    "CreateTaskPushNotificationConfig": "on_create_task_push_notification_config",
    "GetTaskPushNotificationConfig": "on_get_task_push_notification_config",
    "ListTaskPushNotificationConfigs": "on_list_task_push_notification_configs",
    "DeleteTaskPushNotificationConfig": "on_delete_task_push_notification_config",
    "GetExtendedAgentCard": "on_get_extended_agent_card",
    "SendStreamingMessage": "on_message_send_stream",
    "SubscribeToTask": "on_subscribe_to_task",
}
HANDLERS_0_3 = {wire: HANDLERS_1_0[name] for wire, name in NAMES_0_3.items()}


HTTP_REASONS = {
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


class HttpFailure(Exception):
    """A JSON-RPC error that A2A puts at the HTTP level (401, 403, 429, 503)."""

    def __init__(self, status: int, error: JSONRPCError, headers: dict[str, str]) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error
        self.headers = headers


def traceparent(request: web.Request, parent: str | None = None) -> str:
    """The caller's W3C ``traceparent`` if well formed, else a new span of ``parent``'s
    trace (an agent calling for its task), else a new trace."""
    return ids.traceparent(request.headers.get("traceparent"), parent=parent)


def _compatible(version: str, major: int) -> bool:
    try:
        return Version(version).major == major
    except InvalidVersion:
        return False


def to_a2a_error(e: GatewayError) -> A2AError | HttpFailure:
    """The A2A error for a hub error."""
    data: dict[str, Any] = {"code": e.code}
    if e.decision_id is not None:
        data["decision_id"] = e.decision_id
    if isinstance(e.details, dict):
        data.update({k: v for k, v in e.details.items() if k in ("reasons", "roles", "limit")})
    if isinstance(e, UnknownTask):
        return TaskNotFoundError(e.message, data=data)
    if isinstance(e, InvalidState):
        return TaskNotCancelableError(e.message, data=data)
    if isinstance(e, SchemaViolation):
        errors = [
            {"field": str(d.get("pointer", "")), "message": str(d.get("message", "")), **d}
            for d in (e.details if isinstance(e.details, list) else [])
            if isinstance(d, dict)
        ]
        return InvalidParamsError(e.message, data={**data, "errors": errors})
    if e.status in HTTP_REASONS:
        headers = dict(e.headers)
        if e.status == 401:
            headers.setdefault("WWW-Authenticate", 'Bearer realm="agent-gateway"')
        code = -32603 if e.status == 503 else -32600
        # The shape of the SDK's error data: a google.rpc.ErrorInfo with the details.
        info = {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": HTTP_REASONS[e.status],
            "domain": "agent-gateway",
            "metadata": data,
        }
        return HttpFailure(
            e.status, JSONRPCError(code=code, message=e.message, data=[info]), headers
        )
    if e.status < 500:
        return InvalidParamsError(e.message, data=data)
    return InternalError(e.message, data=data)


def _error(
    request_id: Any, error: A2AError | JSONRPCError, status: int = 200, **headers: str
) -> web.Response:
    body = build_error_response(request_id, error)
    log.info(
        "a2a error",
        extra={"code": body["error"].get("code"), "error": body["error"].get("message")},
    )
    return web.json_response(body, status=status, headers=headers or None)


def _pointers(e: pydantic.ValidationError) -> list[dict[str, Any]]:
    out = []
    for err in e.errors()[:50]:
        loc = "/".join(str(p) for p in err.get("loc", ()))
        out.append({"field": loc, "message": err.get("msg", ""), "pointer": "/" + loc})
    return out


async def _body(request: web.Request) -> bytes:
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise InvalidRequestError("Payload too large", data={"limit": limit})
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise InvalidRequestError("Payload too large", data={"limit": limit}) from None
    if len(raw) > limit:
        raise InvalidRequestError("Payload too large", data={"limit": limit})
    return raw


async def handle(request: web.Request, handler: GovernedHandler) -> web.StreamResponse:
    """One JSON-RPC call to ``/a2a/{agent}``."""
    hub = request.app[HUB]
    request_id: Any = None
    try:
        # The agent first: an unknown one is 404, whatever the body.
        agent = hub.config.registry.get(request.match_info["agent"]).name
        raw = await _body(request)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            return _error(None, JSONParseError(message=f"Invalid JSON payload: {e}"))
        if isinstance(body, list):
            return _error(None, InvalidRequestError("Batch requests are not supported"))
        if isinstance(body, dict):
            rid = body.get("id")
            request_id = rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
        try:
            base = JSONRPC20Request.from_data(body)
        except Exception as e:
            return _error(request_id, InvalidRequestError(data={"parseError": str(e)}))
        if not isinstance(body, dict) or body.get("jsonrpc") != "2.0" or isinstance(base._id, bool):
            return _error(request_id, InvalidRequestError("'jsonrpc' must be exactly '2.0'"))
        method = base.method
        if not method:
            return _error(request_id, InvalidRequestError("Method is required"))
        version = request.headers.get(VERSION_HEADER) or "0.3"
        if method in METHODS_1_0:
            if not _compatible(version, 1):
                raise VersionNotSupportedError(
                    f"A2A version {version!r} is not supported by {method}; send "
                    f"'{VERSION_HEADER}: 1.0' (or use the 0.3 method names)"
                )
        elif method in METHODS_0_3:
            if not _compatible(version, 0):
                raise VersionNotSupportedError(
                    f"A2A version {version!r} is not supported by the 0.3 method {method}"
                )
        else:
            return _error(request_id, MethodNotFoundError(f"Method not found: {method}"))
        # An agent in a container calls with its JWT-SVID (a delegation), a client with an
        # API key (an "agk_..." key: never a three-part JWT).
        sender = authenticate_agent(request) if presents_svid(request) else None
        parent_trace = (
            hub.router.trace_of(sender.instance.task_id)
            if sender is not None and sender.instance is not None
            else None
        )
        context = ServerCallContext(
            state={
                "headers": dict(request.headers),
                "method": method,
                "request_id": request_id,
                "caller": Caller(
                    subject=None if sender is not None else authenticate_optional(request),
                    agent=agent,
                    remote_addr=remote_addr(request),
                    version=version,
                    wire_method=method,
                    traceparent=traceparent(request, parent_trace),
                    sender=sender,
                ),
            }
        )
        if method in METHODS_1_0:
            return await _call_1_0(request, handler, method, body, request_id, context)
        return await _call_0_3(request, handler, method, body, request_id, context)
    except A2AError as e:
        return _error(request_id, e)
    except GatewayError as e:
        mapped = to_a2a_error(e)
        if isinstance(mapped, HttpFailure):
            return _error(request_id, mapped.error, mapped.status, **mapped.headers)
        return _error(request_id, mapped)


async def _call_1_0(
    request: web.Request,
    handler: GovernedHandler,
    method: str,
    body: dict[str, Any],
    request_id: Any,
    context: ServerCallContext,
) -> web.StreamResponse:
    params = body.get("params", {})
    try:
        parsed = ParseDict(params, METHODS_1_0[method](), ignore_unknown_fields=True)
    except Exception as e:
        raise InvalidParamsError(
            f"params do not parse: {e}",
            data={"errors": [{"field": "params", "message": str(e)[:500], "pointer": "/params"}]},
        ) from None
    proto_utils.validate_proto_required_fields(parsed)
    func = getattr(handler, HANDLERS_1_0[method])
    if method in STREAMING_1_0:
        stream = func(parsed, context)
        return await _sse(request, stream, request_id, _frame_1_0)
    result = await func(parsed, context)
    if method == "SendMessage":
        doc: Any = MessageToDict(
            SendMessageResponse(task=result)
            if isinstance(result, Task)
            else SendMessageResponse(message=result)
        )
    elif method == "ListTasks":
        doc = _list_tasks(result, parsed.include_artifacts)
    elif result is None:
        doc = None
    else:
        doc = MessageToDict(result)
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": doc})


async def _call_0_3(
    request: web.Request,
    handler: GovernedHandler,
    method: str,
    body: dict[str, Any],
    request_id: Any,
    context: ServerCallContext,
) -> web.StreamResponse:
    try:
        parsed = METHODS_0_3[method].model_validate(body)  # type: ignore[attr-defined]
    except pydantic.ValidationError as e:
        raise InvalidParamsError("params do not validate", data={"errors": _pointers(e)}) from None
    compat = RequestHandler03(handler)
    func = getattr(compat, HANDLERS_0_3[method])
    if method in STREAMING_0_3:
        return await _sse(request, func(parsed, context), request_id, _frame_0_3)
    result = await func(parsed, context)
    if isinstance(result, list):
        doc: Any = [r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in result]
    elif result is None:
        doc = None
    else:
        doc = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": doc})


def _list_tasks(response: ListTasksResponse, include_artifacts: bool) -> dict[str, Any]:
    # As the SDK's serialize_list_tasks_response: empty fields shown, artifacts on request.
    doc = MessageToDict(response, always_print_fields_with_no_presence=True)
    if not include_artifacts:
        for task in doc["tasks"]:
            task.pop("artifacts", None)
    return doc


def _frame_1_0(event: Any, request_id: Any) -> bytes:
    result = MessageToDict(proto_utils.to_stream_response(event))
    return _data({"jsonrpc": "2.0", "id": request_id, "result": result})


def _frame_0_3(item: types_v03.SendStreamingMessageSuccessResponse, request_id: Any) -> bytes:
    return b"data: " + item.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n\n"


def _data(doc: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


async def _sse(
    request: web.Request,
    stream: AsyncGenerator[Any],
    request_id: Any,
    frame: Any,
) -> web.StreamResponse:
    # The first event before the response starts: an upfront error stays a JSON answer.
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        raise
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await resp.prepare(request)
        if first is not None:
            await resp.write(frame(first, request_id))
        async for event in stream:
            await resp.write(frame(event, request_id))
    except (ConnectionResetError, ConnectionError):
        # The client went away; the task goes on (A2A: a stream is not the task).
        log.info("a2a stream closed by the client", extra={"request_id": request_id})
    except A2AError as e:
        await resp.write(_data(build_error_response(request_id, e), "error"))
    except GatewayError as e:
        mapped = to_a2a_error(e)
        err = mapped.error if isinstance(mapped, HttpFailure) else mapped
        await resp.write(_data(build_error_response(request_id, err), "error"))
    finally:
        await stream.aclose()
    return resp
