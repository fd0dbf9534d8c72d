"""An agent container calls a tool through ``GATEWAY_URL/mcp`` with its JWT-SVID.

The probe container runs ``GatewayClient.call_tool`` against the agent listener (the
internal network's gateway address); its call is decided by messages.rego (a message of
type ``tool``) and runs echo in its own container as the probe's child task.
"""

from __future__ import annotations

import pytest

from tests.integration.test_messages_docker import Live, live  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]


async def test_an_agent_container_calls_echos_tool_through_the_hub(
    live: Live,  # noqa: F811
) -> None:
    task_id = await live.submit(
        "probe",
        {
            "script": [
                {"op": "tool", "name": "echo.debug.echo", "arguments": {"via": "mcp"}},
                {"op": "tool", "name": "wordstats.text.stats", "arguments": {"text": "x y"}},
            ]
        },
    )
    task = await live.result(task_id, wait=120)
    assert task["state"] == "succeeded", task
    allowed, denied = task["result"]["results"]
    assert allowed["ok"] is True, allowed
    result = allowed["result"]
    assert not result.get("isError"), result
    assert result["structuredContent"] == {"echo": {"via": "mcp"}, "agent": "echo"}
    child = await live.hub.router.get(result["_meta"]["io.agent-gateway/task_id"])
    assert child.parent_id == task_id and child.state == "succeeded" and child.container_id
    # The messages policy refused the other: an error result naming its decision.
    error = denied["result"]["structuredContent"]["error"]
    assert denied["result"]["isError"] is True and error["code"] == "policy_denied"
    records, _ = await live.hub.decisions.list(kind="message", limit=50)
    tools = {
        r["input"]["message"]["tool"]: r["allow"]
        for r in records
        if r["input"]["message"]["type"] == "tool"
    }
    assert tools == {"echo.debug.echo": True, "wordstats.text.stats": False}
