"""The A2A door: signed Agent Cards and the JSON-RPC endpoint of every registered agent.

| route | what |
|---|---|
| ``GET /a2a/{agent}/.well-known/agent-card.json`` | the agent's signed card (public) |
| ``GET /.well-known/agent-card.json`` | the hub's card: the agents the caller may use |
| ``GET /.well-known/jwks.json`` | the public key the cards are signed with |
| ``POST /a2a/{agent}`` | A2A JSON-RPC 1.0 and 0.3 (``jsonrpc``), streams as SSE |

On the agent listener (``setup_agent_a2a_routes``) the card and ``POST /a2a/{agent}`` are
served to agents presenting their JWT-SVID only: an A2A agent's call to another agent is a
delegation, decided by the message policy with its lineage (``GovernedHandler``).

Parts: ``cards`` (cards and their signing key), ``mapping`` (messages and tasks),
``handler`` (the SDK's ``RequestHandler`` over the governed task path), ``push`` (webhooks),
``jsonrpc`` (the wire).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.errors import NotFound
from gateway.http.a2a.cards import CARD_PATH, JWKS_PATH, CardCache, CardSigner
from gateway.http.a2a.handler import GovernedHandler
from gateway.http.a2a.jsonrpc import handle
from gateway.http.a2a.mapping import a2a_task
from gateway.http.a2a.push import PushNotifier
from gateway.http.access import authorize
from gateway.http.agent_routes import authenticate_agent, presents_svid
from gateway.http.appkeys import HUB
from gateway.hub import Hub
from gateway.policy.engine import API_QUERY
from gateway.routers.access import subject_input

CARDS = web.AppKey("a2a_cards", CardCache)
HANDLER = web.AppKey("a2a_handler", GovernedHandler)


def base_url(request: web.Request) -> str:
    """The hub's URL as this caller reached it."""
    return f"{request.scheme}://{request.host}"


async def agent_card(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    await authorize(request, {"kind": "public"})
    agent = hub.config.registry.get(request.match_info["agent"])
    doc = request.app[CARDS].agent(hub.config, agent, base_url(request))
    return web.json_response(doc, headers={"Cache-Control": "max-age=60"})


async def hub_card(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    subject, _ = await authorize(request, {"kind": "public"})
    config = hub.config
    # The agents the caller may send to: the API policy's answer for each (not logged: a
    # card read changes nothing, and the SendMessage itself is decided and logged).
    usable = []
    for agent in config.registry.agents.values():
        decision = config.policy.evaluate(
            API_QUERY,
            {
                "subject": subject_input(subject),
                "request": {
                    "method": "POST",
                    "route": "/a2a/{agent}",
                    "params": {"agent": agent.name, "method": "SendMessage"},
                    "protocol": "a2a",
                },
                "resource": {"kind": "agent", "name": agent.name},
            },
        )
        if decision.allow or subject is None:
            usable.append(agent)
    doc = request.app[CARDS].hub(config, usable, base_url(request), hub.hub_id)
    return web.json_response(doc)


async def jwks(request: web.Request) -> web.Response:
    await authorize(request, {"kind": "public"})
    return web.json_response(
        request.app[CARDS].signer.jwks(), headers={"Cache-Control": "max-age=300"}
    )


async def rpc(request: web.Request) -> web.StreamResponse:
    return await handle(request, request.app[HANDLER])


def setup_a2a_routes(app: web.Application, hub: Hub) -> None:
    """Add the A2A routes to ``app`` and start the push worker with it."""
    app[CARDS] = CardCache(CardSigner(hub.settings.state_dir))
    push = PushNotifier(lambda task_id: hub.router.get(task_id), a2a_task)
    app[HANDLER] = GovernedHandler(hub, push)
    hub.events.listeners.append(push.on_event)
    app.router.add_get("/a2a/{agent}" + CARD_PATH, agent_card)
    app.router.add_get(CARD_PATH, hub_card)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_post("/a2a/{agent}", rpc)

    def worker(app: web.Application) -> AsyncIterator[None]:
        return push.run()

    app.cleanup_ctx.append(worker)


async def agent_side_card(request: web.Request) -> web.Response:
    # An agent's card read on the agent listener: its SVID, not an API key, lets it in.
    if not presents_svid(request):
        raise NotFound("no such endpoint on the agent listener")
    authenticate_agent(request)
    hub = request.app[HUB]
    agent = hub.config.registry.get(request.match_info["agent"])
    return web.json_response(request.app[CARDS].agent(hub.config, agent, base_url(request)))


async def agent_side_rpc(request: web.Request) -> web.StreamResponse:
    if not presents_svid(request):
        raise NotFound("no such endpoint on the agent listener")
    return await handle(request, request.app[HANDLER])


def setup_agent_a2a_routes(app: web.Application, hub: Hub) -> None:
    """The A2A door on the agent listener: for agents' calls (JWT-SVID) only."""
    app[CARDS] = CardCache(CardSigner(hub.settings.state_dir))
    # No push worker: an agent's call sets no webhook (GovernedHandler refuses it).
    app[HANDLER] = GovernedHandler(hub, PushNotifier(lambda tid: hub.router.get(tid), a2a_task))
    app.router.add_get("/a2a/{agent}" + CARD_PATH, agent_side_card)
    app.router.add_post("/a2a/{agent}", agent_side_rpc)


__all__ = ["setup_a2a_routes", "setup_agent_a2a_routes"]
