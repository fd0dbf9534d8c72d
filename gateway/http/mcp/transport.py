"""``POST /mcp``: Streamable HTTP, as a thin aiohttp handler over the SDK's types.

The ``mcp`` SDK's server transport is an ASGI (Starlette) app; mounting it would add an
ASGI bridge and a second request model beside aiohttp's, and its session manager owns the
request lifecycle we need for authorization (each JSON-RPC call is an ``api`` decision with
the method and tool in its input). So this door reuses the SDK's framework-neutral parts:
the wire types (``mcp_types``), the protocol revisions (``mcp_types.version``), the
2026-07-28 request classifier and header checks (``mcp.shared.inbound``) and its
error-to-status table, and answers every request with one ``application/json`` body.

Order of checks for every request: Host and ``Origin`` (DNS-rebinding protection; 421/403),
the bearer API key or an agent's JWT-SVID (401 with ``WWW-Authenticate`` naming the
protected-resource metadata, and what is wrong with a token),
the body (415, 400 parse error, 400 invalid request), the revision (a handshake revision
with its session, or the stateless 2026-07-28 envelope), the API policy (``POST /mcp`` with
``params.rpc`` and ``params.tool``), then the method.

An agent in a container calls with its JWT-SVID (here, and on the agent listener where only
that is accepted): its ``tools/call`` is a message of type ``tool`` decided by the messages
policy (``MessageRouter.decide_tool``) and run for the owner of the sender's task; its
``tools/list`` shows what that policy would let it call.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import mcp_types as types
from aiohttp import web
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PROTOCOL_VERSION_HEADER,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    UNSUPPORTED_PROTOCOL_VERSION,
)
from mcp_types.version import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    KNOWN_PROTOCOL_VERSIONS,
    LATEST_HANDSHAKE_VERSION,
    MODERN_PROTOCOL_VERSIONS,
)

from gateway import __version__
from gateway.agents.mcp import ProgressFn
from gateway.errors import (
    DelegationTooDeep,
    GatewayError,
    PolicyDenied,
    SchemaViolation,
    Unauthorized,
)
from gateway.http.access import admit_submission, remote_addr
from gateway.http.agent_routes import authenticate_agent, presents_svid
from gateway.http.appkeys import MAX_BODY
from gateway.http.mcp.sessions import Session, SessionTable
from gateway.http.mcp.tools import ToolCatalog
from gateway.http.middlewares import authenticate_optional
from gateway.hub import Hub
from gateway.identity.apikeys import Subject
from gateway.logs import get_logger
from gateway.routers.access import ApiCall, task_resource
from gateway.routers.messages import Sender
from gateway.store import Task

log = get_logger(__name__)
SESSION_HEADER = "Mcp-Session-Id"
METADATA_PATH = "/.well-known/oauth-protected-resource"
# Implementation-defined JSON-RPC codes (the -32000..-32019 band; the SDK uses -32000/-32001).
UNAUTHORIZED = -32010
FORBIDDEN = -32011
TOO_MANY_REQUESTS = -32012
UNAVAILABLE = -32013
REQUEST_CANCELLED = -32800
_STATUS_CODES = {401: UNAUTHORIZED, 403: FORBIDDEN, 429: TOO_MANY_REQUESTS, 503: UNAVAILABLE}
# How often a stateless call checks whether its client went away (that is its cancel).
DISCONNECT_POLL_S = 0.5
# How long a cancelled forwarded call may take to tell its MCP server (McpClient bounds it).
CANCEL_WAIT_S = 5.0
# Progress reports of an MCP server kept for a slow client; past that, new ones are dropped.
MAX_QUEUED_PROGRESS = 256
# Keys the 2026-07-28 results carry that the handshake revisions do not define.
_MODERN_ONLY_KEYS = ("resultType", "ttlMs", "cacheScope")
SUPPORTED = [*HANDSHAKE_PROTOCOL_VERSIONS[2:], *MODERN_PROTOCOL_VERSIONS]


# Who calls: a user or client (API key) or an agent in a container (JWT-SVID).
Caller = Subject | Sender


def caller_id(caller: Caller) -> str:
    """The id sessions are bound to: the subject, or the agent's instance (else SPIFFE id)."""
    if isinstance(caller, Subject):
        return caller.id
    return f"svid:{caller.identity.instance_id or caller.spiffe_id}"


class RpcError(Exception):
    """A JSON-RPC error answer, with the HTTP status it goes out with."""

    def __init__(
        self, code: int, message: str, data: Any = None, *, status: int = 200, headers: Any = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.data, self.status = code, message, data, status
        self.headers: dict[str, str] = dict(headers or {})


class ClientGone(Exception):
    """The client of a stateless call closed its stream (and so cancelled the call)."""


class McpDoor:
    """The MCP server: its sessions, tool catalog and allowed origins."""

    def __init__(
        self, hub: Hub, *, allowed_origins: tuple[str, ...] = (), svid_only: bool = False
    ) -> None:
        self.hub = hub
        # The agent listener's door: agents' tokens only, never an API key.
        self.svid_only = svid_only
        self.catalog = ToolCatalog()
        self.sessions = SessionTable()
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins)
        self.allowed_hosts = frozenset({"localhost", hub.settings.host.lower()})
        # A result larger than this is an error result: as large as a request may be.
        self.max_result_bytes = hub.settings.max_body_bytes

    # -- transport checks

    def check_origin(self, request: web.Request) -> None:
        """DNS-rebinding protection: a Host that is an IP or a known name, an Origin (when
        sent) that is allowed or the request's own."""
        host = request.host
        name = urlsplit(f"//{host}").hostname or ""
        if not (_is_ip(name) or name in self.allowed_hosts):
            raise RpcError(INVALID_REQUEST, f"Host {host!r} is not allowed", status=421)
        origin = request.headers.get("Origin")
        if origin is None:
            return  # not a browser: a browser sends Origin on every cross-origin POST
        origin = origin.rstrip("/")
        if origin in self.allowed_origins:
            return
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower():
            return
        raise RpcError(FORBIDDEN, f"Origin {origin!r} is not allowed", status=403)

    def subject(self, request: web.Request) -> Caller:
        """The caller: a subject (API key) or a verified agent (JWT-SVID); 401 with the
        protected-resource metadata when neither."""
        try:
            if self.svid_only or presents_svid(request):
                return authenticate_agent(request)
            subject = authenticate_optional(request)
        except Unauthorized as e:
            raise self._unauthorized(request, e.message, invalid=True, code=e.code) from None
        if subject is None:
            raise self._unauthorized(request, "this endpoint needs an API key (Bearer)")
        return subject

    def _unauthorized(
        self, request: web.Request, message: str, *, invalid: bool = False, code: str | None = None
    ) -> RpcError:
        challenge = f'Bearer realm="agent-gateway", resource_metadata="{metadata_url(request)}"'
        if invalid:
            challenge += ', error="invalid_token"'
        data = {"code": code} if code else None
        return RpcError(
            UNAUTHORIZED, message, data, status=401, headers={"WWW-Authenticate": challenge}
        )

    async def authorize(self, request: web.Request, subject: Caller, rpc: str, tool: Any) -> None:
        """The API policy's decision on this JSON-RPC call (one ``api`` record); an agent's
        calls are counted as its messages (its tool calls are decided by the messages
        policy)."""
        hub = self.hub
        if isinstance(subject, Sender):
            hub.limiter.message(
                subject.identity.instance_id or subject.spiffe_id, subject.identity.agent
            )
            return
        hub.limiter.api_call(subject, remote_addr(request))
        params: dict[str, Any] = {"rpc": rpc[:256]}
        if isinstance(tool, str):
            params["tool"] = tool[:256]
        call = ApiCall(
            method="POST",
            route="/mcp",
            params=params,
            protocol="mcp",
            remote_addr=remote_addr(request),
        )
        await hub.access.authorize(subject, call, {"kind": "mcp"})

    # -- methods

    def initialize(self, subject: Caller, params: dict[str, Any]) -> tuple[dict[str, Any], Session]:
        """Open a session at the revision the client asked for, or our newest."""
        asked = params.get("protocolVersion")
        version = asked if asked in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE_VERSION
        client = params.get("clientInfo") if isinstance(params.get("clientInfo"), dict) else None
        session = self.sessions.open(caller_id(subject), version, client)
        result = types.InitializeResult(
            protocol_version=version,
            capabilities=_capabilities(),
            server_info=_server_info(),
            instructions=INSTRUCTIONS,
        )
        return dump(result, version), session

    def discover(self) -> dict[str, Any]:
        """``server/discover`` (2026-07-28)."""
        result = types.DiscoverResult(
            supported_versions=SUPPORTED,
            capabilities=_capabilities(),
            instructions=INSTRUCTIONS,
        )
        return dump(result, MODERN_PROTOCOL_VERSIONS[-1])

    async def list_tools(
        self, request: web.Request, subject: Caller, version: str
    ) -> dict[str, Any]:
        """The tools the dispatch policy (agents) and the tools policy (MCP servers behind
        the hub) would let ``subject`` call; for an agent, those the messages policy would
        let it call (and, for MCP servers' tools, the tools policy its task's owner)."""
        config = self.hub.config
        info = _request_info(request, "tools/list")
        if isinstance(subject, Sender):
            return {"tools": await self._agent_tools(subject, info), **_result_extra(version)}
        tools = self.catalog.visible(config, subject, info)
        tools += await self.hub.tools.visible(subject, info)
        return {"tools": tools, **_result_extra(version)}

    async def _agent_tools(self, sender: Sender, info: dict[str, Any]) -> list[dict[str, Any]]:
        hub = self.hub
        config = hub.config
        if sender.instance is None:
            return []  # only an agent running a task may call tools (messages policy)
        shown = [
            t.tool
            for t in self.catalog.tools(config).values()
            if hub.messages.tool_allowed(sender, config.registry.agents[t.agent], t.name)
        ]
        for tool in await hub.tools.visible(sender.instance.subject, info):
            found = hub.tools.split(config, tool["name"])
            if found is not None and hub.messages.tool_allowed(sender, found[0], tool["name"]):
                shown.append(tool)
        return shown

    async def call_tool(
        self,
        request: web.Request,
        subject: Caller,
        params: dict[str, Any],
        version: str,
        *,
        session: Session | None,
        request_id: str | int,
        on_task: Callable[[str], None] | None = None,
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Run the tool as a task (the path of ``POST /v1/tasks``), or forward it to its MCP
        server (``on_progress`` gets that server's progress reports); its result, or an
        error result for a denial, a schema violation or a task or call that failed."""
        name = params.get("name")
        arguments = params.get("arguments")
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, "tools/call needs a string 'name'", status=400)
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise RpcError(INVALID_PARAMS, "tools/call 'arguments' must be an object", status=400)
        hub = self.hub
        if hub.tools.split(hub.config, name) is not None:
            return await self._call_server_tool(
                request,
                subject,
                name,
                arguments,
                version,
                session=session,
                request_id=request_id,
                on_progress=on_progress,
            )
        tool = self.catalog.get(hub.config, name)
        if tool is None:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}", status=400)
        info = _request_info(request, "tools/call", tool=name)
        if isinstance(subject, Sender):
            spec = hub.config.registry.agents[tool.agent]
            try:
                routed = await hub.messages.tool_task(subject, spec, name, arguments, info)
            except (PolicyDenied, SchemaViolation, DelegationTooDeep) as e:
                return error_result(e.to_json()["error"], version, pointers_from="/input")
            task = routed.task
        else:
            envelope = {"agent": tool.agent, "input": arguments, "labels": {"mcp_tool": name}}
            with admit_submission(request):
                try:
                    task, _ = await hub.router.submit(subject, envelope, request=info)
                except (PolicyDenied, SchemaViolation) as e:
                    return error_result(e.to_json()["error"], version, pointers_from="/input")
        if on_task is not None:
            on_task(task.id)
        if session is not None:
            session.inflight[request_id] = task.id
        try:
            task = await self._wait(request, task, cancel_on_disconnect=session is None)
        finally:
            if session is not None:
                session.inflight.pop(request_id, None)
        return task_result(task, version, limit=self.max_result_bytes)

    async def _call_server_tool(
        self,
        request: web.Request,
        subject: Caller,
        name: str,
        arguments: dict[str, Any],
        version: str,
        *,
        session: Session | None,
        request_id: str | int,
        on_progress: ProgressFn | None,
    ) -> dict[str, Any]:
        """A tool of an MCP server behind the hub (``gateway.routers.tools``); an agent's
        call is first decided by the messages policy, then made for its task's owner. The
        forwarded call is what ``notifications/cancelled`` (or, stateless, a client that
        went away) cancels."""
        info = _request_info(request, "tools/call", tool=name)
        hub = self.hub
        try:
            if isinstance(subject, Sender):
                found = hub.tools.split(hub.config, name)
                assert found is not None, "the caller checked with split() first"
                await hub.messages.decide_tool(subject, found[0], name, arguments, info)
                assert subject.instance is not None, "decide_tool refuses a sender without a task"
                owner = subject.instance.subject
            else:
                owner = subject
            call = asyncio.ensure_future(hub.tools.call(owner, name, arguments, info, on_progress))
            if session is not None:
                session.server_calls[request_id] = call
            try:
                result = await self._wait_call(request, call, cancel_on_disconnect=session is None)
            finally:
                if session is not None:
                    session.server_calls.pop(request_id, None)
        except GatewayError as e:
            # A denial, a schema violation or a server that failed: a tool error result.
            return error_result(e.to_json()["error"], version)
        if result is None:
            # Cancelled by the client: it reads no result (the caller answers for that).
            return error_result({"code": "cancelled", "message": "the call was cancelled"}, version)
        size = len(json.dumps(result, ensure_ascii=False, separators=(",", ":")))
        if size > self.max_result_bytes:
            return error_result(
                {
                    "code": "result_too_large",
                    "message": f"the result is {size} bytes; the limit is {self.max_result_bytes}",
                },
                version,
            )
        return {**result, **_result_extra(version)}

    @staticmethod
    async def _wait_call(
        request: web.Request, call: asyncio.Future[dict[str, Any]], *, cancel_on_disconnect: bool
    ) -> dict[str, Any] | None:
        """The forwarded call's result, or None when it was cancelled; a client that went
        away (stateless: that is its cancel) or this handler's cancellation cancels it."""
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=DISCONNECT_POLL_S)
                transport = request.transport
                if cancel_on_disconnect and (transport is None or transport.is_closing()):
                    raise ClientGone
        except (ClientGone, asyncio.CancelledError):
            call.cancel()
            # Until it has told the server (bounded inside): nothing is left running.
            await asyncio.wait({call}, timeout=CANCEL_WAIT_S)
            raise
        if call.cancelled():
            return None
        return call.result()

    async def _wait(self, request: web.Request, task: Task, *, cancel_on_disconnect: bool) -> Task:
        router = self.hub.router
        task_id, owner = task.id, task.subject
        try:
            while True:
                task = await router.wait_for(task_id, DISCONNECT_POLL_S)
                if task.terminal:
                    return task
                transport = request.transport
                if cancel_on_disconnect and (transport is None or transport.is_closing()):
                    raise ClientGone
        except (ClientGone, asyncio.CancelledError):
            # 2026-07-28 has no cancel notification over HTTP: a closed stream is the cancel
            # (seen here, or as this handler's cancellation where the server cancels those).
            if cancel_on_disconnect:
                with contextlib.suppress(GatewayError):
                    await asyncio.shield(
                        router.cancel(task_id, by=f"{owner} (MCP client went away)")
                    )
            raise

    async def cancel(
        self, request: web.Request, subject: Caller, session: Session, params: Any
    ) -> None:
        """``notifications/cancelled``: cancel the task behind that request, if the API
        policy lets this subject cancel it (the rule of ``DELETE /v1/tasks/{task_id}``)."""
        if not isinstance(params, dict):
            return
        call = session.server_calls.get(params.get("requestId"))  # type: ignore[arg-type]
        if call is not None:
            # The session is the caller's own, and so is the forwarded call it started in it.
            if not call.done():
                session.cancelled[params.get("requestId")] = True  # type: ignore[index]
                call.cancel()
            return
        task_id = session.inflight.get(params.get("requestId"))  # type: ignore[arg-type]
        if task_id is None:
            return  # finished already, or never ours: nothing to do (the spec allows that)
        hub = self.hub
        task = await hub.router.get(task_id)
        if task.terminal:
            return
        if isinstance(subject, Sender):
            # The session is the agent's, and so is the child task it started in it.
            await self._cancel(session, params, task_id, caller_id(subject))
            return
        call = ApiCall(
            method="DELETE",
            route="/v1/tasks/{task_id}",
            params={"task_id": task_id, "rpc": "notifications/cancelled"},
            protocol="mcp",
            remote_addr=remote_addr(request),
        )
        await hub.access.authorize(subject, call, task_resource(task))
        await self._cancel(session, params, task_id, subject.id)

    async def _cancel(
        self, session: Session, params: dict[str, Any], task_id: str, who: str
    ) -> None:
        hub = self.hub
        session.cancelled[params.get("requestId")] = True  # type: ignore[index]
        reason = params.get("reason")
        why = f": {reason}" if isinstance(reason, str) else ""
        by = f"{who} (MCP notifications/cancelled{why})"
        try:
            await hub.router.cancel(task_id, by=by[:300])
        except GatewayError as e:
            log.info("cancel of an MCP call found its task ended", extra={"error": e.message})


INSTRUCTIONS = (
    "Each tool runs one task on an agent of the agent-gateway in a sandboxed container; "
    "every call is decided by the gateway's policies and written to its decision log."
)


def _capabilities() -> types.ServerCapabilities:
    return types.ServerCapabilities(tools=types.ToolsCapability(list_changed=False))


def _server_info() -> types.Implementation:
    return types.Implementation(name="agent-gateway", version=__version__)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def metadata_url(request: web.Request) -> str:
    """The protected-resource metadata of ``/mcp`` (RFC 9728: the path after the well-known)."""
    return f"{request.scheme}://{request.host}{METADATA_PATH}/mcp"


def _request_info(request: web.Request, rpc: str, *, tool: str | None = None) -> dict[str, Any]:
    """``input.request`` of the dispatch policy for an MCP call."""
    info: dict[str, Any] = {
        "method": "POST",
        "path": "/mcp",
        "protocol": "mcp",
        "rpc_method": rpc,
        "remote_addr": remote_addr(request),
        "time": dt.datetime.now(dt.UTC).isoformat(),
    }
    if tool is not None:
        info["tool"] = tool
    return info


def _result_extra(version: str) -> dict[str, Any]:
    if version in MODERN_PROTOCOL_VERSIONS:
        return {"resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    return {}


def dump(result: types.Result, version: str) -> dict[str, Any]:
    """A result as JSON for ``version`` (the 2026-07-28 keys only where they exist)."""
    body: dict[str, Any] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    if version not in MODERN_PROTOCOL_VERSIONS:
        for key in _MODERN_ONLY_KEYS:
            body.pop(key, None)
    return body


def error_result(error: dict[str, Any], version: str, *, pointers_from: str = "") -> dict[str, Any]:
    """A tool result with ``isError``: the gateway error (code, message, decision id,
    details; schema pointers relative to the arguments) as structured content and text."""
    error = dict(error)
    details = error.get("details")
    if pointers_from and isinstance(details, list):
        error["details"] = [
            {**d, "pointer": d["pointer"].removeprefix(pointers_from)}
            if isinstance(d, dict) and isinstance(d.get("pointer"), str)
            else d
            for d in details
        ]
    text = error.get("message", "error")
    if error.get("decision_id"):
        text += f" (decision {error['decision_id']})"
    body = {
        "content": [{"type": "text", "text": text}],
        "structuredContent": {"error": error},
        "isError": True,
    }
    return {**body, **_result_extra(version)}


def task_result(task: Task, version: str, *, limit: int) -> dict[str, Any]:
    """The tool result of a finished task."""
    if task.state != "succeeded":
        error = dict(task.error or {})
        error.setdefault("code", task.state)
        error.setdefault("message", f"the task ended {task.state}")
        error["task_id"] = task.id
        return error_result(error, version)
    output = task.result
    text = json.dumps(output, ensure_ascii=False, separators=(",", ":"))
    if len(text) > limit:
        return error_result(
            {
                "code": "result_too_large",
                "message": f"the result is {len(text)} bytes; the limit is {limit}",
                "task_id": task.id,
            },
            version,
        )
    body: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": False}
    if isinstance(output, dict) or version in MODERN_PROTOCOL_VERSIONS:
        body["structuredContent"] = output
    body["_meta"] = {
        "io.agent-gateway/task_id": task.id,
        "io.agent-gateway/decision_id": task.decision_id,
    }
    return {**body, **_result_extra(version)}


# --- the handler -------------------------------------------------------------------------


def _reply(request_id: Any, *, result: Any = None, error: RpcError | None = None) -> web.Response:
    if error is not None:
        err: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            err["data"] = error.data
        body = {"jsonrpc": "2.0", "id": request_id, "error": err}
        return web.json_response(body, status=error.status, headers=error.headers)
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": result})


def _from_gateway_error(e: GatewayError, modern: bool) -> RpcError:
    data: dict[str, Any] = {"code": e.code}
    if e.details is not None:
        data["details"] = e.details
    if e.decision_id is not None:
        data["decision_id"] = e.decision_id
    code = _STATUS_CODES.get(e.status)
    if code is None:
        code = INVALID_PARAMS if 400 <= e.status < 500 else INTERNAL_ERROR
    status = (
        e.status
        if e.status in _STATUS_CODES
        else (ERROR_CODE_HTTP_STATUS.get(code, 200) if modern else 200)
    )
    return RpcError(code, e.message, data, status=status, headers=e.headers)


def _unsupported(requested: str) -> RpcError:
    data = types.UnsupportedProtocolVersionErrorData(supported=SUPPORTED, requested=requested)
    return RpcError(
        UNSUPPORTED_PROTOCOL_VERSION,
        "Unsupported protocol version",
        data.model_dump(mode="json"),
        status=400,
    )


async def _read_body(request: web.Request) -> Any:
    ctype = request.content_type
    if ctype != "application/json":
        raise RpcError(INVALID_REQUEST, "Content-Type must be application/json", status=415)
    accept = request.headers.get("Accept", "*/*")
    if not any(a in accept for a in ("application/json", "*/*", "application/*")):
        raise RpcError(INVALID_REQUEST, "Accept must include application/json", status=406)
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise RpcError(
            INVALID_REQUEST, f"request body is over the limit of {limit} bytes", status=413
        )
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise RpcError(PARSE_ERROR, "Parse error: the body is not JSON", status=400) from None


async def post_mcp(request: web.Request) -> web.StreamResponse:
    """One JSON-RPC message in, one JSON answer (or 202 for a notification) out."""
    door = request.app[MCP_DOOR]
    request_id: Any = None
    modern = request.headers.get(MCP_PROTOCOL_VERSION_HEADER) in MODERN_PROTOCOL_VERSIONS
    try:
        door.check_origin(request)
        subject = door.subject(request)
        body = await _read_body(request)
        if isinstance(body, list):
            raise RpcError(
                INVALID_REQUEST, "batches are not supported: send one message", status=400
            )
        if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
            raise RpcError(INVALID_REQUEST, "the body must be one JSON-RPC 2.0 message", status=400)
        request_id = body.get("id")
        method = body.get("method")
        if method is None and ("result" in body or "error" in body):
            return web.Response(status=202)  # a reply to a request we never send
        if not isinstance(method, str):
            raise RpcError(INVALID_REQUEST, "'method' must be a string", status=400)
        if request_id is not None and (
            isinstance(request_id, bool) or not isinstance(request_id, str | int)
        ):
            request_id = None
            raise RpcError(INVALID_REQUEST, "'id' must be a string or an integer", status=400)
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            raise RpcError(INVALID_REQUEST, "'params' must be an object", status=400)
        params = params or {}
        if modern:
            return await _modern(request, door, subject, body, method, params)
        return await _handshake(request, door, subject, body, method, params)
    except RpcError as e:
        if request_id is None and e.status == 200:
            e.status = 400
        return _reply(request_id, error=e)
    except GatewayError as e:
        return _reply(request_id, error=_from_gateway_error(e, modern))


async def _handshake(
    request: web.Request,
    door: McpDoor,
    subject: Caller,
    body: dict[str, Any],
    method: str,
    params: dict[str, Any],
) -> web.StreamResponse:
    """2025-06-18 and 2025-11-25 (and older handshake revisions): a session per initialize."""
    request_id = body.get("id")
    header_version = request.headers.get(MCP_PROTOCOL_VERSION_HEADER)
    if header_version is not None and header_version not in KNOWN_PROTOCOL_VERSIONS:
        raise _unsupported(header_version)
    tool = params.get("name") if method == "tools/call" else None
    if method == "initialize":
        if request_id is None:
            raise RpcError(INVALID_REQUEST, "initialize is a request: it needs an id", status=400)
        await door.authorize(request, subject, method, None)
        result, session = door.initialize(subject, params)
        response = _reply(request_id, result=result)
        response.headers[SESSION_HEADER] = session.id
        log.info(
            "mcp session opened",
            extra={"subject": caller_id(subject), "version": session.protocol_version},
        )
        return response
    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None:
        raise RpcError(INVALID_REQUEST, f"missing {SESSION_HEADER}: initialize first", status=400)
    session = door.sessions.get(session_id, caller_id(subject))
    if session is None:
        raise RpcError(
            INVALID_REQUEST, "session not found (expired or ended): initialize again", status=404
        )
    if header_version is not None and header_version != session.protocol_version:
        raise RpcError(
            INVALID_REQUEST,
            f"{MCP_PROTOCOL_VERSION_HEADER} {header_version} is not this session's "
            f"{session.protocol_version}",
            status=400,
        )
    await door.authorize(request, subject, method, tool)
    if request_id is None:  # a notification
        if method == "notifications/initialized":
            session.initialized = True
        elif method == "notifications/cancelled":
            await door.cancel(request, subject, session, params)
        return web.Response(status=202)
    version = session.protocol_version
    if method == "ping":
        return _reply(request_id, result={})
    if method == "tools/list":
        return _reply(request_id, result=await door.list_tools(request, subject, version))
    if method == "tools/call":
        token = _progress_token(params)
        if token is not None:
            return await _call_with_progress(
                request,
                door,
                subject,
                params,
                version,
                session=session,
                request_id=request_id,
                token=token,
            )
        result = await door.call_tool(
            request, subject, params, version, session=session, request_id=request_id
        )
        if session.cancelled.pop(request_id, None):
            # The client gave up on this request: it reads no result (it ignores this one).
            return _reply(request_id, error=RpcError(REQUEST_CANCELLED, "request cancelled"))
        return _reply(request_id, result=result)
    raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")


async def _modern(
    request: web.Request,
    door: McpDoor,
    subject: Caller,
    body: dict[str, Any],
    method: str,
    params: dict[str, Any],
) -> web.StreamResponse:
    """2026-07-28: no handshake, no session; every request carries its envelope."""
    request_id = body.get("id")
    if request_id is None:
        # The revision defines no client notifications over HTTP; acknowledged and dropped.
        return web.Response(status=202)
    duplicated = find_duplicated_routing_header(
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
    )
    if duplicated is not None:
        raise _ladder(InboundLadderRejection(-32020, f"{duplicated} header appears more than once"))
    headers = {k.lower(): v for k, v in request.headers.items()}
    verdict = classify_inbound_request(
        body, headers=headers, supported_modern_versions=MODERN_PROTOCOL_VERSIONS
    )
    if isinstance(verdict, InboundLadderRejection):
        raise _ladder(verdict)
    version = verdict.protocol_version
    tool = params.get("name") if method == "tools/call" else None
    await door.authorize(request, subject, method, tool)
    if method == "server/discover":
        return _reply(request_id, result=door.discover())
    if method == "tools/list":
        return _reply(request_id, result=await door.list_tools(request, subject, version))
    if method == "tools/call":
        token = _progress_token(params)
        try:
            if token is not None:
                return await _call_with_progress(
                    request,
                    door,
                    subject,
                    params,
                    version,
                    session=None,
                    request_id=request_id,
                    token=token,
                )
            result = await door.call_tool(
                request, subject, params, version, session=None, request_id=request_id
            )
        except ClientGone:
            return web.Response(status=499)  # nobody is listening any more
        return _reply(request_id, result=result)
    raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}", status=404)


def _progress_token(params: dict[str, Any]) -> str | int | None:
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


def _sse(message: dict[str, Any]) -> bytes:
    return f"event: message\ndata: {json.dumps(message, separators=(',', ':'))}\n\n".encode()


class _ProgressStream:
    """The ``notifications/progress`` of one call, written to its event stream: a task's
    events (its states and its agent's reports), or an MCP server's own reports."""

    def __init__(self, response: web.StreamResponse, events: Any, token: str | int) -> None:
        self.response = response
        self.events = events
        self.token = token
        self._writers: list[asyncio.Task[None]] = []
        self._notes: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._relaying = False
        self._last = float("-inf")

    async def _write(self, note: dict[str, Any]) -> None:
        message = {"jsonrpc": "2.0", "method": "notifications/progress", "params": note}
        await self.response.write(_sse(message))

    def task(self, task_id: str) -> None:
        """Forward the events of task ``task_id`` (``call_tool``'s ``on_task``)."""
        self._writers.append(asyncio.create_task(self._task_events(task_id)))

    async def _task_events(self, task_id: str) -> None:
        count = 0
        async for event in self.events.subscribe(task_id, after=0):
            count += 1
            data = event.data
            note: dict[str, Any] = {"progressToken": self.token, "progress": count}
            message = data.get("message") or (f"task {data['state']}" if "state" in data else None)
            if isinstance(message, str):
                note["message"] = message[:500]
            if isinstance(data.get("total"), int | float) and data["total"] >= count:
                note["total"] = data["total"]
            await self._write(note)
            if event.final:
                return

    def server(self, report: dict[str, Any]) -> None:
        """Queue an MCP server's report under the client's token (``on_progress``); one
        that does not increase is dropped (the spec: progress increases), as are reports
        past ``MAX_QUEUED_PROGRESS`` waiting for a slow client."""
        if report["progress"] <= self._last or self._notes.qsize() >= MAX_QUEUED_PROGRESS:
            return
        self._last = report["progress"]
        note = {"progressToken": self.token, **report}
        if isinstance(note.get("message"), str):
            note["message"] = note["message"][:500]
        if not self._relaying:
            self._relaying = True
            self._writers.append(asyncio.create_task(self._server_notes()))
        self._notes.put_nowait(note)

    async def _server_notes(self) -> None:
        while (note := await self._notes.get()) is not None:
            await self._write(note)

    async def close(self) -> None:
        """Let what is due out (briefly), then stop the writers."""
        self._notes.put_nowait(None)
        for writer in self._writers:
            # A task's final state is published before it is signalled done: let it out.
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), 1.0)
            writer.cancel()


async def _call_with_progress(
    request: web.Request,
    door: McpDoor,
    subject: Caller,
    params: dict[str, Any],
    version: str,
    *,
    session: Session | None,
    request_id: str | int,
    token: str | int,
) -> web.StreamResponse:
    """``tools/call`` answered as an event stream: the task's events (its states and the
    progress its agent reports), or the progress an MCP server behind the hub reports, as
    ``notifications/progress``, then the result."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    progress = _ProgressStream(response, door.hub.events, token)
    try:
        result = await door.call_tool(
            request,
            subject,
            params,
            version,
            session=session,
            request_id=request_id,
            on_task=progress.task,
            on_progress=progress.server,
        )
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "result": result}
    except RpcError as e:
        reply = {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": e.code, "message": e.message},
        }
    finally:
        await progress.close()
    if session is not None and session.cancelled.pop(request_id, None):
        reply = {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": REQUEST_CANCELLED, "message": "request cancelled"},
        }
    await response.write(_sse(reply))
    await response.write_eof()
    return response


def _ladder(rejection: InboundLadderRejection) -> RpcError:
    return RpcError(
        rejection.code,
        rejection.message,
        rejection.data,
        status=ERROR_CODE_HTTP_STATUS.get(rejection.code, 400),
    )


async def get_mcp(request: web.Request) -> web.Response:
    """No server-initiated stream is offered (the spec allows 405)."""
    return web.Response(
        status=405, text="", content_type="text/plain", headers={"Allow": "POST, DELETE"}
    )


async def delete_mcp(request: web.Request) -> web.Response:
    """End a session (the client's ``terminate_session``)."""
    door = request.app[MCP_DOOR]
    try:
        door.check_origin(request)
        subject = door.subject(request)
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is None:
            raise RpcError(INVALID_REQUEST, f"missing {SESSION_HEADER}", status=400)
        if door.sessions.get(session_id, caller_id(subject)) is None:
            raise RpcError(INVALID_REQUEST, "session not found", status=404)
        await door.authorize(request, subject, "session/delete", None)
    except RpcError as e:
        return _reply(None, error=e)
    except GatewayError as e:
        return _reply(None, error=_from_gateway_error(e, False))
    door.sessions.close(session_id)
    return web.Response(status=204)


async def protected_resource(request: web.Request) -> web.Response:
    """RFC 9728 protected-resource metadata for ``/mcp``: bearer API keys, sent in the header."""
    from gateway.http.access import authorize

    await authorize(request, {"kind": "public"})
    base = f"{request.scheme}://{request.host}"
    return web.json_response(
        {
            "resource": f"{base}/mcp",
            "resource_name": "agent-gateway MCP server",
            "bearer_methods_supported": ["header"],
            "resource_documentation": f"{base}/openapi.json",
        }
    )


MCP_DOOR = web.AppKey("mcp_door", McpDoor)
