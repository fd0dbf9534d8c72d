"""The listener agents reach: the agent routes of the same Hub, and nothing else.

``agent-gateway serve`` runs two aiohttp applications on one Hub. The main one (every route)
listens on ``--host``; this one listens on the address containers are given in
``GATEWAY_URL`` (the internal network's gateway) and serves only:

| route | for |
|---|---|
| ``POST /v1/messages`` | messages and delegations |
| ``POST /v1/tasks/{task_id}/result`` | a result reported later |
| ``POST /v1/tasks/{task_id}/progress`` | progress of the task it runs (task event streams) |
| ``GET /v1/tasks/{task_id}`` | an agent's own or delegated task (JWT-SVID only) |
| ``GET /a2a/{agent}/.well-known/agent-card.json``, ``POST /a2a/{agent}`` | A2A agents'
  calls to other agents: delegations (JWT-SVID only; ``gateway.http.a2a``) |
| ``POST /mcp``, ``DELETE /mcp`` | agents' MCP tool calls (JWT-SVID only; ``gateway.http.mcp``) |
| ``POST /v1/identity/renew``, ``GET /v1/identity/bundle`` | identities |
| ``GET /healthz`` | liveness |

Everything else (the user, auditor and operator API) is 404 there, whatever the method.
When ``--host`` is a wildcard address the two listeners share the port (``SO_REUSEPORT``;
the kernel prefers the socket bound to the exact address). Whatever ``--host`` is, the main
app answers 404 to anything but the agent routes on a connection made to an agent address
(a wildcard listener before the agent listener is up, or ``--host`` set to that address).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.errors import NotFound
from gateway.http.a2a import setup_agent_a2a_routes
from gateway.http.agent_routes import agent_get_task, presents_svid, setup_agent_routes
from gateway.http.appkeys import HUB, MAX_BODY
from gateway.http.mcp import setup_agent_mcp_routes
from gateway.http.middlewares import error_middleware
from gateway.hub import Hub
from gateway.logs import get_logger

log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WILDCARDS = ("0.0.0.0", "::", "")


def _not_served() -> NotFound:
    return NotFound("no such endpoint on the agent listener")


@web.middleware
async def only_agent_routes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A known route with another method is 404 here too, not 405: nothing else is served."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        raise _not_served() from None


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_task(request: web.Request) -> web.Response:
    # The user API's task read (an API key) is not served to agents.
    if not presents_svid(request):
        raise _not_served()
    return await agent_get_task(request)


def create_agent_app(hub: Hub) -> web.Application:
    """The agent-facing application on ``hub`` (which the main application starts)."""
    app = web.Application(
        client_max_size=hub.settings.max_body_bytes,
        middlewares=[
            error_middleware(on_request=hub.metrics.observe_request),
            only_agent_routes,
        ],
    )
    app[MAX_BODY] = hub.settings.max_body_bytes
    setup_agent_routes(app, hub)
    setup_agent_a2a_routes(app, hub)
    setup_agent_mcp_routes(app, hub)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    app.router.add_get("/healthz", healthz)
    return app


def agent_routes(app: web.Application) -> frozenset[tuple[str, str]]:
    """(method, path template) of every route ``app`` serves."""
    return frozenset(
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    )


def agent_addresses(hub: Hub) -> set[str]:
    """The host addresses agent containers connect to."""
    facts = hub.facts
    found = {hub.settings.agent_listen_host, facts.get("internal_gateway")}
    found.add(facts.get("egress_gateway"))
    return {a for a in found if a}


def guard_agent_addresses(hub: Hub, allowed: frozenset[tuple[str, str]]) -> Callable[..., object]:
    """Main-app middleware: on a connection to an agent address, only the agent routes."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        # A dual-stack "::" socket sees IPv4 peers as IPv4-mapped IPv6 addresses.
        local = str(sock[0]).removeprefix("::ffff:") if sock else None
        if local and local in agent_addresses(hub):
            resource = request.match_info.route.resource
            key = (request.method, resource.canonical if resource is not None else "")
            user_read = (
                key[1] in ("/v1/tasks/{task_id}", "/mcp") or key[1].startswith("/a2a/")
            ) and not presents_svid(request)
            if key not in allowed or user_read:
                raise _not_served()
        return await handler(request)

    return guard


@dataclass
class Listeners:
    """The running sites of ``serve``: the main app and, once known, the agent address."""

    main: web.AppRunner
    agents: web.AppRunner
    port: int
    reuse_port: bool
    urls: list[str] = field(default_factory=list)
    _waiter: asyncio.Task[None] | None = None

    async def start_agent_site(self, host: str) -> None:
        await web.TCPSite(self.agents, host, self.port, reuse_port=self.reuse_port).start()
        self.urls.append(f"http://{host}:{self.port}")
        log.info("agent listener up", extra={"url": self.urls[-1]})

    async def close(self) -> None:
        """Stop the agent listener, then the main one (which stops the hub)."""
        if self._waiter is not None:
            self._waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiter
        await self.agents.cleanup()
        await self.main.cleanup()


async def start_listeners(app: web.Application, *, host: str, port: int) -> Listeners:
    """Start ``app`` (its hub with it) on ``host:port`` and the agent app on the agent address.

    Without an address yet (the container engine was down at start) the agent listener
    starts as soon as the hub learns it.
    """
    hub = app[HUB]
    agent_app = create_agent_app(hub)
    wildcard = host in WILDCARDS
    # Right after the error middleware, so the 404 comes before any authentication.
    app.middlewares.insert(1, guard_agent_addresses(hub, agent_routes(agent_app)))
    main = web.AppRunner(app, access_log=None)
    await main.setup()  # starts the hub, which prepares the networks
    agents = web.AppRunner(agent_app, access_log=None)
    await agents.setup()
    listeners = Listeners(main, agents, port, reuse_port=wildcard)
    try:
        await web.TCPSite(main, host, port, reuse_port=wildcard).start()
        listeners.urls.append(f"http://{host}:{port}")
        agent_host = hub.settings.agent_listen_host or hub.facts.get("internal_gateway")
        if agent_host and agent_host != host:
            await listeners.start_agent_site(agent_host)
        elif not agent_host:
            listeners._waiter = asyncio.create_task(_when_known(listeners, hub, host))
    except BaseException:
        await listeners.close()
        raise
    return listeners


async def _when_known(listeners: Listeners, hub: Hub, host: str) -> None:
    # The hub has no event for it: facts are set by its engine probe, a few seconds apart.
    while not (agent_host := hub.facts.get("internal_gateway")):  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    if agent_host != host:
        try:
            await listeners.start_agent_site(agent_host)
        except OSError as e:
            log.error("agent listener failed", extra={"host": agent_host, "error": str(e)})
