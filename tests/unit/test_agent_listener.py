"""The agent listener serves the agent routes and nothing else (gateway.http.agent_app).

With the fake backend: the main app and the agent app share one hub; every other route of
the main app is 404 on the agent app, whatever the method or credentials. ``serve``'s
listeners are started for real on loopback addresses standing in for the gateway address.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.http.agent_app import agent_routes, create_agent_app, start_listeners
from gateway.http.app import HUB, create_app
from tests.conftest import FakeBackend, auth, make_settings
from tests.messaging import svid_auth, until

pytestmark = pytest.mark.timeout(60)
AGENT_ROUTES = {
    ("POST", "/v1/messages"),
    ("POST", "/v1/tasks/{task_id}/result"),
    ("POST", "/v1/tasks/{task_id}/progress"),
    ("GET", "/v1/tasks/{task_id}"),
    ("POST", "/v1/identity/renew"),
    ("GET", "/v1/identity/bundle"),
    ("GET", "/healthz"),
    # A2A agents' calls to other agents (JWT-SVID only): delegations.
    ("GET", "/a2a/{agent}/.well-known/agent-card.json"),
    ("POST", "/a2a/{agent}"),
    # Agents' MCP tool calls (JWT-SVID only), decided by the messages policy.
    ("POST", "/mcp"),
    ("DELETE", "/mcp"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def clients(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """(main app client, agent app client) on one hub with the fake backend."""
    app = create_app(make_settings(tmp_path), backend=FakeBackend())
    main = await aiohttp_client(app)  # starts the hub
    agents = await aiohttp_client(create_agent_app(app[HUB]))
    yield main, agents


def main_routes(app: Any) -> set[tuple[str, str]]:
    return {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_the_agent_app_has_exactly_the_agent_routes(clients: tuple[Any, Any]) -> None:
    main, agents = clients
    assert agent_routes(agents.app) == AGENT_ROUTES
    assert main_routes(main.app) >= AGENT_ROUTES  # the main listener keeps serving them


async def test_every_other_route_is_404_there(
    clients: tuple[Any, Any], keys: dict[str, str]
) -> None:
    main, agents = clients
    others = main_routes(main.app) - AGENT_ROUTES
    assert {("POST", "/v1/tasks"), ("GET", "/v1/status"), ("GET", "/v1/decisions")} <= others
    for method, path in sorted(others):
        # With an operator's key, so a 404 is not an authentication failure in disguise.
        for headers in ({}, auth(keys["operator"]), auth(keys["developer"])):
            resp = await agents.request(method, concrete(path), headers=headers)
            body = await resp.json()
            assert resp.status == 404, (method, path, body)
            assert body["error"]["code"] == "not_found", (method, path, body)
    # The same requests reach the main app's handlers (not one 404 among them).
    for method, path in sorted(others):
        resp = await main.request(method, concrete(path), headers=auth(keys["operator"]))
        assert resp.status != 404 or (await resp.json())["error"]["code"] != "not_found", path


async def test_other_methods_on_agent_paths_are_404_not_405(clients: tuple[Any, Any]) -> None:
    _, agents = clients
    for method, path in [
        ("DELETE", "/v1/tasks/x"),
        ("PUT", "/v1/messages"),
        ("GET", "/v1/tasks/x/result"),
    ]:
        resp = await agents.request(method, path)
        assert resp.status == 404, (method, path)


async def test_agent_routes_answer_there(clients: tuple[Any, Any], keys: dict[str, str]) -> None:
    main, agents = clients
    assert (await agents.get("/healthz")).status == 200
    bundle = await agents.get("/v1/identity/bundle")
    assert bundle.status == 200 and (await bundle.json())["keys"]
    for path in ("/v1/messages", "/v1/tasks/x/result", "/v1/identity/renew"):
        resp = await agents.post(path, json={})
        assert resp.status == 401, path  # served, and refused without a token

    resp = await main.post(
        "/v1/tasks",
        json={"agent": "probe", "input": {"hold_s": 30, "expect_messages": 1}},
        headers=auth(keys["developer"]),
    )
    task_id = (await resp.json())["task_id"]
    hub = main.app[HUB]
    inst = await until(lambda: hub.instances.for_task(task_id), what="probe instance")
    token = inst.env["AGENT_SVID"]
    own = await agents.get(f"/v1/tasks/{task_id}", headers=svid_auth(token))
    assert own.status == 200 and (await own.json())["task_id"] == task_id
    # A user's key on the agent listener: the user API's task read is not there.
    user_read = await agents.get(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))
    assert user_read.status == 404
    assert (await main.get(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))).status == 200
    await main.delete(f"/v1/tasks/{task_id}", headers=auth(keys["developer"]))


async def get(url: str, key: str | None = None) -> int:
    headers = auth(key) if key else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as resp:
        return resp.status


async def test_a_wildcard_host_still_gives_agent_addresses_only_agent_routes(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    """On 0.0.0.0 the main app answers every address; at the agent addresses (the fake
    gateway 127.0.0.1 with its own listener, and an egress gateway without one) only the
    agent routes answer."""
    port = free_port()
    app = create_app(make_settings(tmp_path, port=port), backend=FakeBackend())
    listeners = await start_listeners(app, host="0.0.0.0", port=port)
    try:
        app[HUB].facts["egress_gateway"] = "127.0.0.3"
        assert listeners.urls == [f"http://0.0.0.0:{port}", f"http://127.0.0.1:{port}"]
        for address in ("127.0.0.1", "127.0.0.3"):
            assert await get(f"http://{address}:{port}/healthz") == 200
            assert await get(f"http://{address}:{port}/v1/status", keys["operator"]) == 404
            assert await get(f"http://{address}:{port}/readyz") == 404
        # Any other address of the host gets the whole API, as before.
        assert await get(f"http://127.0.0.2:{port}/readyz") == 200
    finally:
        await listeners.close()


class LateEngine(FakeBackend):
    """An engine that is down at start: the hub learns its addresses later."""

    async def prepare(self) -> dict[str, str]:
        return {}


async def test_the_agent_listener_starts_once_the_address_is_known(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    port = free_port()
    app = create_app(make_settings(tmp_path, port=port), backend=LateEngine())
    listeners = await start_listeners(app, host="127.0.0.1", port=port)
    try:
        assert listeners.urls == [f"http://127.0.0.1:{port}"]
        app[HUB].facts["internal_gateway"] = "127.0.0.2"
        await until(lambda: len(listeners.urls) == 2, within_s=5, what="agent listener")
        assert await get(f"http://127.0.0.2:{port}/healthz") == 200
        assert await get(f"http://127.0.0.2:{port}/v1/status", keys["operator"]) == 404
        assert await get(f"http://127.0.0.2:{port}/readyz") == 404
        assert await get(f"http://127.0.0.1:{port}/readyz") == 200
    finally:
        await listeners.close()
