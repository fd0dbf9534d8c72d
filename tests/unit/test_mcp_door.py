"""The hub as an MCP server: the SDK's own client against a real hub on a real port.

Real SQLite, real policies, the fake container backend (example agents in-process). Each
revision the pinned client speaks is exercised; each bad input of issue 12 has its case.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.http.app import HUB, create_app
from gateway.http.mcp import MCP_DOOR
from tests.conftest import FakeBackend, make_settings
from tests.mcpclient import REVISIONS, mcp_client

SPIN = {"expression": "1", "spin_s": 30}


@pytest.fixture
async def hub_server(
    tmp_path: Any, keys: dict[str, str], aiohttp_server: Any
) -> AsyncIterator[tuple[Any, FakeBackend, str]]:
    """A hub on a real port: (server, backend, the /mcp URL)."""
    backend = FakeBackend()
    server = await aiohttp_server(create_app(make_settings(tmp_path), backend=backend))
    yield server, backend, f"http://127.0.0.1:{server.port}/mcp"


async def _decisions(server: Any, kind: str) -> list[dict[str, Any]]:
    records, _ = await server.app[HUB].decisions.list(kind=kind, limit=500)
    return list(records)


# --- the SDK client, per revision ----------------------------------------------------------


@pytest.mark.parametrize("revision", REVISIONS)
async def test_lists_differ_by_role_as_the_policy_says(
    hub_server: Any, keys: dict[str, str], revision: str, monkeypatch: Any
) -> None:
    server, backend, url = hub_server
    async with mcp_client(url, keys["user"], revision, monkeypatch) as client:
        user_tools = {t.name: t for t in (await client.list_tools()).tools}
    async with mcp_client(url, keys["developer"], revision, monkeypatch) as client:
        dev_tools = {t.name for t in (await client.list_tools()).tools}
    # code.eval and debug.probe are restricted to developers in policies/data.json.
    assert "echo.debug.echo" in user_tools
    assert "calc.code.eval" not in user_tools and "probe.debug.probe" not in user_tools
    assert dev_tools == set(user_tools) | {"calc.code.eval", "probe.debug.probe"}
    stats = user_tools["wordstats.text.stats"]
    # $refs between our schema files are inlined: the client validates with the tool alone.
    assert "$ref" not in json.dumps(stats.input_schema)
    assert stats.input_schema["properties"]["text"]["type"] == "string"
    assert stats.output_schema is not None and stats.annotations is not None
    assert backend.started == []  # listing dispatches nothing
    # Listing is one api decision per call, never a dispatch record per tool.
    assert await _decisions(server, "dispatch") == []
    lists = [
        d
        for d in await _decisions(server, "api")
        if d["input"]["request"]["params"].get("rpc") == "tools/list"
    ]
    assert len(lists) == 2 and all(d["input"]["request"]["protocol"] == "mcp" for d in lists)


@pytest.mark.parametrize("revision", REVISIONS)
async def test_call_echo_denial_and_schema_violation(
    hub_server: Any, keys: dict[str, str], revision: str, monkeypatch: Any
) -> None:
    server, backend, url = hub_server
    hub = server.app[HUB]
    async with mcp_client(url, keys["user"], revision, monkeypatch) as client:
        ok = await client.call_tool("echo.debug.echo", {"hello": "world"})
        assert not ok.is_error
        assert ok.structured_content == {"echo": {"hello": "world"}, "agent": "echo"}
        assert json.loads(ok.content[0].text) == ok.structured_content  # type: ignore[union-attr]
        task = await hub.router.get(ok.meta["io.agent-gateway/task_id"])  # type: ignore[index]
        assert task.state == "succeeded" and task.labels == {"mcp_tool": "echo.debug.echo"}
        dispatch = await hub.decisions.get(task.decision_id)
        assert dispatch["input"]["request"]["protocol"] == "mcp"
        assert dispatch["input"]["request"]["tool"] == "echo.debug.echo"

        denied = await client.call_tool("calc.code.eval", {"expression": "1+1"})
        assert denied.is_error
        error = denied.structured_content["error"]  # type: ignore[index]
        assert error["code"] == "policy_denied"
        assert error["details"]["reasons"] == [
            'capability "code.eval" requires one of the roles ["developer"]'
        ]
        logged = await hub.decisions.get(error["decision_id"])
        assert logged["kind"] == "dispatch" and logged["result"]["allow"] is False
        assert error["decision_id"] in denied.content[0].text  # type: ignore[union-attr]

        bad = await client.call_tool("wordstats.text.stats", {"txt": 3})
        assert bad.is_error
        details = bad.structured_content["error"]["details"]  # type: ignore[index]
        assert {d["pointer"] for d in details} == {"/txt", "/text"}
    # Only echo ran: the denial and the schema violation started nothing.
    assert [s.labels["io.agent-gateway.agent"] for s in backend.started] == ["echo"]


@pytest.mark.parametrize("revision", REVISIONS)
async def test_cancelling_a_call_cancels_its_task(
    hub_server: Any, keys: dict[str, str], revision: str, monkeypatch: Any
) -> None:
    server, backend, url = hub_server
    hub = server.app[HUB]
    async with mcp_client(url, keys["developer"], revision, monkeypatch) as client:
        call = asyncio.ensure_future(client.call_tool("calc.code.eval", SPIN))
        for _ in range(500):
            if backend.servers:
                break
            await asyncio.sleep(0.02)
        assert backend.servers, "the task never started"
        call.cancel()  # legacy: notifications/cancelled; 2026-07-28: the POST is aborted
        with pytest.raises(asyncio.CancelledError):
            await call
        tasks, _ = await hub.router.list(limit=10)
        for _ in range(500):  # the hub notices within its poll interval (0.5 s)
            task = await hub.router.get(tasks[0].id)
            if task.terminal and not backend.servers:
                break
            await asyncio.sleep(0.02)
        assert task.state == "cancelled", task.state
        assert "MCP" in (task.history[-1].detail or "")  # type: ignore[index]
        assert backend.servers == {}  # its container is gone
        # The client and its session still work.
        assert not (await client.call_tool("echo.debug.echo", {})).is_error


# --- sessions and the wire, raw ------------------------------------------------------------

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _h(key: str, **extra: str) -> dict[str, str]:
    return {**ACCEPT, "Authorization": f"Bearer {key}", **extra}


async def _post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
    data = body if isinstance(body, str) else json.dumps(body)
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None), r.headers


async def _session(url: str, key: str) -> str:
    status, body, headers = await _post(url, INIT, _h(key))
    assert status == 200, body
    return str(headers["Mcp-Session-Id"])


def _modern(
    method: str, params: dict[str, Any] | None = None, version: str = "2026-07-28"
) -> tuple[dict[str, Any], dict[str, str]]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": method,
        "params": {**(params or {}), "_meta": meta},
    }
    headers = {"MCP-Protocol-Version": version, "Mcp-Method": method}
    if method == "tools/call":
        headers["Mcp-Name"] = str((params or {}).get("name"))
    return body, headers


async def test_session_ids_by_revision(hub_server: Any, keys: dict[str, str]) -> None:
    server, _, url = hub_server
    door = server.app[MCP_DOOR]
    status, body, headers = await _post(url, INIT, _h(keys["user"]))
    assert status == 200 and body["result"]["protocolVersion"] == "2025-11-25"
    sid = headers["Mcp-Session-Id"]
    # An older revision is granted as asked; an unknown one gets our newest handshake one.
    for asked, granted in (("2025-06-18", "2025-06-18"), ("1999-01-01", "2025-11-25")):
        init = {**INIT, "params": {**INIT["params"], "protocolVersion": asked}}
        _, answer, _ = await _post(url, init, _h(keys["user"]))
        assert answer["result"]["protocolVersion"] == granted
    # Another key cannot use the session: to it the id does not exist.
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    status, body, _ = await _post(url, ping, _h(keys["developer"], **{"Mcp-Session-Id": sid}))
    assert status == 404 and body["error"]["code"] == -32600
    status, body, _ = await _post(url, ping, _h(keys["user"], **{"Mcp-Session-Id": sid}))
    assert status == 200 and body["result"] == {}
    # The stateless revision never gets a session id.
    discover, extra = _modern("server/discover")
    status, body, headers = await _post(url, discover, _h(keys["user"], **extra))
    assert status == 200 and "Mcp-Session-Id" not in headers
    assert body["result"]["supportedVersions"] == ["2025-06-18", "2025-11-25", "2026-07-28"]
    # DELETE ends a session: nothing is left behind.
    before = len(door.sessions)
    delete = _h(keys["user"], **{"Mcp-Session-Id": sid})
    async with aiohttp.ClientSession() as s, s.delete(url, headers=delete) as r:
        assert r.status == 204
    assert len(door.sessions) == before - 1
    status, _, _ = await _post(url, ping, _h(keys["user"], **{"Mcp-Session-Id": sid}))
    assert status == 404


async def test_no_key_is_a_401_with_the_resource_metadata(
    hub_server: Any, keys: dict[str, str]
) -> None:
    _, _, url = hub_server
    for headers in (ACCEPT, {**ACCEPT, "Authorization": "Bearer not-a-key"}):
        status, body, resp_headers = await _post(url, INIT, headers)
        assert status == 401, body
        challenge = resp_headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ") and 'resource_metadata="' in challenge
        assert body["error"]["code"] == -32010
    metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
    async with aiohttp.ClientSession() as s, s.get(metadata_url) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["resource"] == url and doc["bearer_methods_supported"] == ["header"]


BAD_INPUT = [
    # (note, body, extra headers, status, JSON-RPC code)
    ("malformed JSON", "{not json", {}, 400, -32700),
    ("a batch", [{"jsonrpc": "2.0", "id": 1, "method": "ping"}], {}, 400, -32600),
    ("not JSON-RPC 2.0", {"id": 1, "method": "ping"}, {}, 400, -32600),
    (
        "params not an object",
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]},
        {},
        400,
        -32600,
    ),
    (
        "a request without a session",
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {},
        400,
        -32600,
    ),
    ("an unsupported protocol version", INIT, {"MCP-Protocol-Version": "1999-01-01"}, 400, -32022),
    ("a foreign Origin", INIT, {"Origin": "http://evil.example"}, 403, -32011),
    ("a rebinding Host", INIT, {"Host": "evil.example:80"}, 421, -32600),
]


@pytest.mark.parametrize(
    ("note", "body", "extra", "status", "code"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input_gets_its_error_and_leaves_no_session(
    hub_server: Any,
    keys: dict[str, str],
    note: str,
    body: Any,
    extra: dict[str, str],
    status: int,
    code: int,
) -> None:
    server, backend, url = hub_server
    door = server.app[MCP_DOOR]
    got_status, answer, headers = await _post(url, body, _h(keys["user"], **extra))
    assert (got_status, answer["error"]["code"]) == (status, code), (note, answer)
    assert answer["jsonrpc"] == "2.0" and "Mcp-Session-Id" not in headers
    assert len(door.sessions) == 0 and backend.started == []


async def test_origin_same_or_absent_is_accepted(hub_server: Any, keys: dict[str, str]) -> None:
    _, _, url = hub_server
    same = url.removesuffix("/mcp")
    for extra in ({}, {"Origin": same}):
        status, body, _ = await _post(url, INIT, _h(keys["user"], **extra))
        assert status == 200, (extra, body)


async def test_unknown_method_and_unknown_tool_are_protocol_errors(
    hub_server: Any, keys: dict[str, str]
) -> None:
    server, _, url = hub_server
    sid = await _session(url, keys["user"])
    headers = _h(keys["user"], **{"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"})
    status, body, _ = await _post(
        url, {"jsonrpc": "2.0", "id": 3, "method": "resources/list"}, headers
    )
    assert (status, body["error"]["code"]) == (200, -32601)
    call = {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "tools/call",
        "params": {"name": "nope.x", "arguments": {}},
    }
    status, body, _ = await _post(url, call, headers)
    assert body["error"]["code"] == -32602 and "Unknown tool" in body["error"]["message"]
    call["params"] = {"name": "echo.debug.echo", "arguments": [1]}
    status, body, _ = await _post(url, call, headers)
    assert body["error"]["code"] == -32602
    # A session request at another revision than the session's is refused.
    status, body, _ = await _post(url, call, {**headers, "MCP-Protocol-Version": "2025-06-18"})
    assert status == 400
    # Each of these calls was decided and logged (kind api), with the JSON-RPC method.
    rpcs = [d["input"]["request"]["params"].get("rpc") for d in await _decisions(server, "api")]
    assert "resources/list" in rpcs and rpcs.count("tools/call") >= 2
    # Modern: unknown method is a 404, an unsupported _meta revision -32022, a header that
    # disagrees with the body -32020.
    body_, extra = _modern("resources/list")
    status, body, _ = await _post(url, body_, _h(keys["user"], **extra))
    assert (status, body["error"]["code"]) == (404, -32601)
    body_, extra = _modern("tools/list")
    body_["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2099-01-01"
    status, body, _ = await _post(url, body_, _h(keys["user"], **extra))
    assert (status, body["error"]["code"]) == (400, -32020)
    body_, extra = _modern("tools/list")
    status, body, _ = await _post(
        url, body_, _h(keys["user"], **{**extra, "Mcp-Method": "tools/call"})
    )
    assert (status, body["error"]["code"]) == (400, -32020)


async def test_a_result_over_the_size_limit_is_an_error_result(
    hub_server: Any, keys: dict[str, str], monkeypatch: Any
) -> None:
    server, _, url = hub_server
    server.app[MCP_DOOR].max_result_bytes = 1000
    async with mcp_client(url, keys["user"], "2025-11-25", monkeypatch) as client:
        small = await client.call_tool("echo.debug.echo", {"blob": "x" * 500})
        large = await client.call_tool("echo.debug.echo", {"blob": "x" * 2000})
    assert not small.is_error
    assert large.is_error
    error = large.structured_content["error"]  # type: ignore[index]
    assert error["code"] == "result_too_large" and error["task_id"]


@pytest.mark.parametrize("revision", REVISIONS)
async def test_progress_notifications_while_a_call_runs(
    hub_server: Any, keys: dict[str, str], revision: str, monkeypatch: Any
) -> None:
    _, _, url = hub_server
    seen: list[tuple[float, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, message))

    async with mcp_client(url, keys["user"], revision, monkeypatch) as client:
        result = await client.call_tool("echo.debug.echo", {"a": 1}, progress_callback=progress)
    assert result.structured_content == {"echo": {"a": 1}, "agent": "echo"}
    # The task's states, in order, each a notification with a rising progress value.
    assert [v for v, _ in seen] == sorted(v for v, _ in seen) and len(seen) >= 2
    assert seen[-1][1] == "task succeeded"
