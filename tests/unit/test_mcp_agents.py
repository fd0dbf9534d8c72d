"""Agents calling MCP tools at ``/mcp`` with their JWT-SVID (issue 12 item 5), in-process.

The example agents run in-process with the real SDK and real tokens (as in test_messages):
an agent's ``tools/call`` is a message of type ``tool`` decided by ``messages.rego``, logged
as a message decision, then run as a child task for the owner of the sender's task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.decisionlog.masking import REDACTED
from gateway.http.agent_app import create_agent_app
from gateway.sdk.client import GatewayClient
from tests.conftest import auth
from tests.messaging import bad_tokens, svid_auth
from tests.unit.test_messages import Ctx, make_ctx  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(60)
VERSION = "2026-07-28"
SECRET = "s3cret-value"


@pytest.fixture
async def ctx(make_ctx: Callable[..., Awaitable[Ctx]]) -> AsyncIterator[Ctx]:  # noqa: F811
    yield await make_ctx()


def rpc(method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """A stateless (2026-07-28) JSON-RPC request and its routing headers."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": method,
        "params": {**(params or {}), "_meta": meta},
    }
    headers = {"MCP-Protocol-Version": VERSION, "Mcp-Method": method}
    if method == "tools/call":
        headers["Mcp-Name"] = str((params or {}).get("name"))
    return body, headers


async def post(client: Any, token_headers: dict[str, str], method: str, **params: Any) -> Any:
    body, headers = rpc(method, params)
    resp = await client.post("/mcp", json=body, headers={**headers, **token_headers})
    return resp.status, await resp.json()


async def test_an_agent_calls_an_allowed_tool_as_a_child_task(ctx: Ctx) -> None:
    probe = await ctx.probe(expect=0)
    status, body = await post(
        ctx.client,
        svid_auth(ctx.token(probe)),
        "tools/call",
        name="echo.debug.echo",
        arguments={"api_key": SECRET, "n": 1},
    )
    assert status == 200, body
    result = body["result"]
    assert not result.get("isError"), result
    assert result["structuredContent"]["echo"] == {"api_key": SECRET, "n": 1}
    # Decided by messages.rego as a message of type "tool", the secret masked in the log.
    decisions = [
        d for d in await ctx.message_decisions() if d["input"]["message"]["type"] == "tool"
    ]
    assert len(decisions) == 1
    record = decisions[0]
    assert record["kind"] == "message" and record["allow"] is True
    assert record["input"]["message"]["tool"] == "echo.debug.echo"
    assert record["input"]["message"]["arguments"] == {"api_key": REDACTED, "n": 1}
    assert record["input"]["source"]["owner"] == "developer"
    # Run as the probe's child task, for the probe task's owner.
    task_id = result["_meta"]["io.agent-gateway/task_id"]
    task = await ctx.hub.store.get_task(task_id)
    assert task.parent_id == probe.task_id and task.subject == "developer"


async def test_a_tool_the_messages_policy_refuses_is_an_error_result(ctx: Ctx) -> None:
    probe = await ctx.probe(expect=0)
    before = len(ctx.backend.started)
    status, body = await post(
        ctx.client,
        svid_auth(ctx.token(probe)),
        "tools/call",
        name="wordstats.text.stats",
        arguments={"text": "a b"},
    )
    assert status == 200, body
    result = body["result"]
    assert result["isError"] is True
    error = result["structuredContent"]["error"]
    assert error["code"] == "policy_denied"
    record = await ctx.hub.decisions.get(error["decision_id"])
    assert record["kind"] == "message" and record["allow"] is False
    assert record["input"]["message"]["type"] == "tool"
    assert len(ctx.backend.started) == before  # nothing was dispatched


async def test_tools_list_shows_what_the_messages_policy_allows(ctx: Ctx) -> None:
    probe = await ctx.probe(expect=0)
    before = len(await ctx.message_decisions())
    status, body = await post(ctx.client, svid_auth(ctx.token(probe)), "tools/list")
    assert status == 200, body
    names = {t["name"] for t in body["result"]["tools"]}
    assert "echo.debug.echo" in names
    assert "wordstats.text.stats" not in names
    # A developer's API key sees wordstats: the agent's list is the messages policy's.
    status, body = await post(ctx.client, auth(ctx.keys["developer"]), "tools/list")
    assert "wordstats.text.stats" in {t["name"] for t in body["result"]["tools"]}
    assert len(await ctx.message_decisions()) == before  # asked, not logged


async def test_bad_tokens_are_401_with_the_precise_error(ctx: Ctx) -> None:
    sender = await ctx.probe(expect=0)
    cases = bad_tokens(ctx.state_dir, sender)
    before = len(await ctx.message_decisions())
    for name, (header, code) in cases.items():
        if header is None or header.count(".") != 2:
            continue  # not a JWT: the API-key path answers those (test_mcp_door)
        status, body = await post(ctx.client, {"Authorization": header}, "tools/list")
        assert status == 401, (name, body)
        assert body["error"]["data"]["code"] == code, (name, body)
        assert body["error"]["message"], name
    assert "expired" in cases
    assert len(await ctx.message_decisions()) == before


async def test_the_sdk_calls_a_tool_from_inside_an_agent(ctx: Ctx) -> None:
    # The probe's script runs GatewayClient.call_tool in its (in-process) container.
    task_id = await ctx.start(
        "probe",
        {
            "script": [
                {"op": "tool", "name": "echo.debug.echo", "arguments": {"n": 2}},
                {"op": "tool", "name": "wordstats.text.stats", "arguments": {"text": "x"}},
            ]
        },
    )
    task = await ctx.task(task_id)
    assert task["state"] == "succeeded", task
    allowed, denied = task["result"]["results"]
    assert allowed["result"]["structuredContent"]["echo"] == {"n": 2}
    assert denied["result"]["isError"] is True


async def test_the_agent_listener_serves_mcp_to_agents_only(ctx: Ctx, aiohttp_client: Any) -> None:
    probe = await ctx.probe(expect=0)
    agents = await aiohttp_client(create_agent_app(ctx.hub))
    status, body = await post(agents, auth(ctx.keys["developer"]), "tools/list")
    assert status == 404, body
    status, body = await post(agents, svid_auth(ctx.token(probe)), "tools/list")
    assert status == 200, body
    assert "echo.debug.echo" in {t["name"] for t in body["result"]["tools"]}
    # The SDK helper against the agent listener, as a container would call it.
    client = GatewayClient(str(agents.make_url("")), ctx.token(probe))
    result = await asyncio.to_thread(client.call_tool, "echo.debug.echo", {"n": 3})
    assert result["structuredContent"]["echo"] == {"n": 3}
