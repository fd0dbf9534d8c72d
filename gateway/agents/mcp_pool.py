"""The pool of MCP servers behind the hub: one container per server process.

A server is started on first use (``tools/list`` or ``tools/call``), in the sandbox its
policy decision granted, initialized, and its tools checked against the registry entry: a
tool outside the allow-list, or a tool schema that is not valid 2020-12 JSON Schema (or
points outside itself with ``$ref``), refuses the whole server, and its container goes.

Reuse follows the entry's ``isolation``: ``per_owner`` (the default) keys a server by agent,
caller and sandbox, so callers never share a process and a caller whose grant changed gets
a new one; ``per_call`` starts a server for one call and stops it after. A server idle for
the entry's ``idle_s``, older than ``lifetime_s`` or whose connection broke (it exited, hung
or wrote garbage) is stopped; the next call starts a fresh one. A server that cannot be
started or is refused is not retried for ``retry_after_s``: every caller gets that error.

A caller cancelled while its server is starting does not take the start down with it: the
container being created would have no owner. The start runs to its end; a ``per_owner``
server then waits for its next call (or its idle stop), a ``per_call`` one is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jsonschema_rs

from gateway.agents.mcp import HttpConnection, McpClient, McpServerError, StdioConnection
from gateway.bundle.registry import AgentSpec
from gateway.containers.backend import ContainerBackend, ContainerHandle, ContainerSpec
from gateway.errors import AgentUnavailable, GatewayError
from gateway.logs import get_logger

T = TypeVar("T")
log = get_logger(__name__)
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
HTTP_READY_POLL_S = 0.1


@dataclass(frozen=True)
class CheckedTool:
    """A server's tool that passed the checks, with its compiled schemas."""

    name: str
    tool: dict[str, Any]
    input_validator: Any
    output_validator: Any | None


@dataclass(eq=False)  # identity: a server is kept in sets
class McpServer:
    """One running MCP server process (one container)."""

    agent: str
    key: tuple[str, str, str]
    handle: ContainerHandle
    client: McpClient
    tools: dict[str, CheckedTool]
    isolation: str
    idle_s: float
    started: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0

    @property
    def broken(self) -> str | None:
        return self.client.connection.broken


def schema_problem(schema: Any, *, input_schema: bool) -> str | None:
    """Why ``schema`` is not an acceptable tool schema, or None."""
    if not isinstance(schema, dict):
        return "it is not an object"
    declared = schema.get("$schema")
    if declared not in (None, DRAFT_2020_12):
        return f"$schema {declared!r} is not draft 2020-12"
    if input_schema and schema.get("type") != "object":
        return 'its type is not "object"'
    outside = _external_ref(schema)
    if outside is not None:
        return f"it has a $ref outside itself ({outside[:200]!r})"
    try:
        jsonschema_rs.meta.validate(schema)
        jsonschema_rs.Draft202012Validator(schema)
    except jsonschema_rs.ValidationError as e:
        pointer = "".join(f"/{p}" for p in e.instance_path)
        return f"at {pointer or '/'}: {e.message}"
    except (ValueError, jsonschema_rs.ReferencingError) as e:
        return str(e)[:300]
    return None


def _external_ref(node: Any) -> str | None:
    # A remote or relative $ref would make validation fetch or depend on something else.
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                if not value.startswith("#"):
                    return value
            elif key not in ("const", "enum", "default", "examples"):
                found = _external_ref(value)
                if found is not None:
                    return found
    elif isinstance(node, list):
        for item in node:
            found = _external_ref(item)
            if found is not None:
                return found
    return None


def check_tools(agent: AgentSpec, listed: list[dict[str, Any]]) -> dict[str, CheckedTool]:
    """The server's tools checked against ``agent``; McpServerError refuses the server."""
    names = [t.get("name") for t in listed]
    outside = sorted(str(n) for n in names if n not in agent.tools)
    if outside:
        raise McpServerError(
            f"MCP server {agent.name} is refused: it lists tools outside its allow-list "
            f"{list(agent.tools)}: {outside}"
        )
    if len(set(names)) != len(names):
        raise McpServerError(f"MCP server {agent.name} is refused: it lists a tool twice")
    checked: dict[str, CheckedTool] = {}
    for tool in listed:
        name = tool["name"]
        for key, is_input in (("inputSchema", True), ("outputSchema", False)):
            if key not in tool and not is_input:
                continue
            problem = schema_problem(tool.get(key), input_schema=is_input)
            if problem is not None:
                raise McpServerError(
                    f"MCP server {agent.name} is refused: tool {name!r} has an invalid "
                    f"{key} ({problem})"
                )
        output = tool.get("outputSchema")
        checked[name] = CheckedTool(
            name=name,
            tool=tool,
            input_validator=jsonschema_rs.Draft202012Validator(tool["inputSchema"]),
            output_validator=jsonschema_rs.Draft202012Validator(output) if output else None,
        )
    missing = sorted(set(agent.tools) - set(checked))
    if missing:
        log.info(
            "MCP server lists fewer tools than allowed",
            extra={"agent": agent.name, "missing": missing},
        )
    return checked


def fingerprint(agent: AgentSpec, sandbox: dict[str, Any]) -> str:
    """What a reused server must match: its registry entry and the sandbox granted."""
    return json.dumps(
        [agent.to_json(), dict(agent.env), sandbox], sort_keys=True, separators=(",", ":")
    )


class McpServerPool:
    """Starts, reuses and stops the MCP servers of ``protocol: mcp`` entries."""

    def __init__(
        self,
        *,
        backend: Callable[[], ContainerBackend],
        spec_for: Callable[[AgentSpec, dict[str, Any], str, float], ContainerSpec],
        start_timeout_s: float = 30.0,
        lifetime_s: float = 3600.0,
        retry_after_s: float = 5.0,
        reap_every_s: float = 2.0,
    ) -> None:
        self._backend = backend
        self._spec_for = spec_for
        self.start_timeout_s = start_timeout_s
        self.lifetime_s = lifetime_s
        self.retry_after_s = retry_after_s
        self.reap_every_s = reap_every_s
        self._servers: dict[tuple[str, str, str], McpServer] = {}
        self._per_call: set[McpServer] = set()
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        # fingerprint -> (when, the error): a start that failed is not retried at once.
        self._failed: dict[str, tuple[float, GatewayError]] = {}
        # agent fingerprint -> the tools its servers list (the same image lists the same).
        self._catalog: dict[str, dict[str, CheckedTool]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Future[None]] = set()
        self._closing = False

    # -- what the hub asks

    def known_tools(self, agent: AgentSpec) -> dict[str, CheckedTool] | None:
        """The checked tools of ``agent`` if one of its servers ever listed them."""
        return self._catalog.get(_agent_key(agent))

    def container_ids(self) -> set[str]:
        """Containers the pool owns (the orphan scan leaves them alone)."""
        return {s.handle.id for s in [*self._servers.values(), *self._per_call]}

    def __len__(self) -> int:
        return len(self._servers) + len(self._per_call)

    async def use(
        self,
        agent: AgentSpec,
        owner: str,
        sandbox: dict[str, Any],
        work: Callable[[McpServer], Awaitable[T]],
    ) -> T:
        """Run ``work`` on a server of ``agent`` for ``owner`` in ``sandbox`` (started if
        needed); a server whose connection broke meanwhile is stopped afterwards."""
        self._ensure_reaper()
        acquiring = asyncio.ensure_future(self._acquire(agent, owner, sandbox))
        try:
            server = await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            acquiring.add_done_callback(self._abandoned)
            raise
        server.busy += 1
        try:
            return await work(server)
        finally:
            server.busy -= 1
            server.last_used = time.monotonic()
            if server.isolation == "per_call" or server.broken is not None:
                await self._retire(server, server.broken or "per_call: one call only")

    def _abandoned(self, acquiring: asyncio.Future[McpServer]) -> None:
        # The caller went away while its server started: keep no per_call server.
        if acquiring.cancelled() or acquiring.exception() is not None:
            return
        server = acquiring.result()
        if server.isolation == "per_call" or self._closing:
            retire = asyncio.ensure_future(self._retire(server, "its caller went away"))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)

    async def discover(self, agent: AgentSpec, sandbox: dict[str, Any]) -> dict[str, CheckedTool]:
        """The checked tools of ``agent`` from a server started for that alone and stopped
        at once (``tools/list`` leaves no process behind); cached for the entry."""
        known = self.known_tools(agent)
        if known is not None:
            return known
        server = await self._start(
            agent, (agent.name, "discover-" + secrets.token_hex(8), ""), sandbox
        )
        self._per_call.add(server)
        await self._retire(server, "listed its tools")
        return server.tools

    async def close(self) -> None:
        """Stop every server and the reaper."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        for server in [*self._servers.values(), *self._per_call]:
            await self._retire(server, "the hub is stopping")
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- lifecycle of servers

    async def _acquire(self, agent: AgentSpec, owner: str, sandbox: dict[str, Any]) -> McpServer:
        if self._closing:
            raise AgentUnavailable("the hub is stopping")
        if agent.isolation == "per_call":
            server = await self._start(agent, (agent.name, secrets.token_hex(8), ""), sandbox)
            self._per_call.add(server)
            return server
        key = (agent.name, owner, fingerprint(agent, sandbox))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            server = self._servers.get(key)
            if server is not None and server.broken is not None:
                await self._retire(server, server.broken)
                server = None
            if server is None:
                server = await self._start(agent, key, sandbox)
                self._servers[key] = server
            return server

    async def _start(
        self, agent: AgentSpec, key: tuple[str, str, str], sandbox: dict[str, Any]
    ) -> McpServer:
        print_key = fingerprint(agent, sandbox)
        failed = self._failed.get(print_key)
        if failed is not None and time.monotonic() - failed[0] < self.retry_after_s:
            raise failed[1]
        backend = self._backend()
        call_id = "mcp-" + secrets.token_hex(8)
        spec = self._spec_for(agent, sandbox, call_id, self.lifetime_s)
        started = time.perf_counter()
        handle: ContainerHandle | None = None
        client: McpClient | None = None
        try:
            if agent.transport == "stdio":
                start_stdio = getattr(backend, "start_stdio", None)
                if start_stdio is None:
                    raise AgentUnavailable(
                        "the container backend cannot attach to a container's stdio"
                    )
                handle, sock, keep = await start_stdio(spec)
                connection = StdioConnection(sock, agent=agent.name, keep=keep)
                await connection.open()
                client = McpClient(connection, agent=agent.name)
                await client.initialize(self.start_timeout_s)
            else:
                handle = await backend.start(spec)
                http = HttpConnection(f"{handle.base_url}{agent.mcp_path}", agent=agent.name)
                client = McpClient(http, agent=agent.name)
                await self._initialize_http(client, agent)
            tools = check_tools(agent, await client.list_tools(self.start_timeout_s))
        except BaseException as e:
            if client is not None:
                await client.close()
            if handle is not None:
                with contextlib.suppress(GatewayError):
                    await backend.remove(handle.id)
            if isinstance(e, GatewayError):
                self._failed[print_key] = (time.monotonic(), e)
                log.warning(
                    "MCP server not started", extra={"agent": agent.name, "error": e.message}
                )
            raise
        self._failed.pop(print_key, None)
        self._catalog[_agent_key(agent)] = tools
        log.info(
            "MCP server started",
            extra={
                "agent": agent.name,
                "container": handle.name,
                "tools": sorted(tools),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return McpServer(
            agent=agent.name,
            key=key,
            handle=handle,
            client=client,
            tools=tools,
            isolation=agent.isolation,
            idle_s=agent.idle_s,
        )

    async def _initialize_http(self, client: McpClient, agent: AgentSpec) -> None:
        # The server listens a moment after its container starts: retry until it answers.
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                await client.initialize(max(0.5, deadline - time.monotonic()))
                return
            except McpServerError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(HTTP_READY_POLL_S)
                client.connection._broken = None  # type: ignore[attr-defined]

    async def _retire(self, server: McpServer, why: str) -> None:
        if self._servers.get(server.key) is server:
            del self._servers[server.key]
        self._per_call.discard(server)
        await server.client.close()
        with contextlib.suppress(GatewayError):
            await self._backend().remove(server.handle.id)
        log.info(
            "MCP server stopped",
            extra={"agent": server.agent, "container": server.handle.name, "why": why},
        )

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_loop(), name="mcp-pool-reaper")

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_every_s)
            await self.reap()

    async def reap(self) -> int:
        """Stop idle, too old and broken servers nobody is using; how many."""
        now = time.monotonic()
        stopped = 0
        for server in list(self._servers.values()):
            if server.busy:
                continue
            why = server.broken
            if why is None and now - server.last_used >= server.idle_s:
                why = f"idle for {server.idle_s:g} s"
            if why is None and now - server.started >= self.lifetime_s - 60:
                why = "reached its lifetime"
            if why is not None:
                await self._retire(server, why)
                stopped += 1
        return stopped


def _agent_key(agent: AgentSpec) -> str:
    return json.dumps([agent.to_json(), dict(agent.env)], sort_keys=True)
