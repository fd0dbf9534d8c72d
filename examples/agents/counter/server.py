"""An MCP server over Streamable HTTP, written with the official SDK's low-level ``Server``.

Deterministic tools, so tests and the README can show a server the hub reaches over HTTP
(``transport: http`` in agents.yaml) and what the hub forwards of a call while it runs:

- ``count(to, delay_ms)``: counts from 1 to ``to``, one step every ``delay_ms``, and reports
  each step as progress (``notifications/progress`` when the caller sent a progress token);
  a long count is how the tests cancel a call that is still running
- ``upper(text)``: the text in capitals

It listens on ``0.0.0.0:$AGENT_PORT`` (8000) at ``/mcp``, with sessions, and answers each
request with an event stream, the only way a server sends progress during a call. A
``count`` cancelled by the client (``notifications/cancelled``) stops at once and says so
on stderr, which the tests read in the hub's log.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.transport_security import TransportSecuritySettings

MAX_COUNT = 1000
MAX_DELAY_MS = 10_000
MAX_TEXT = 1_000_000

TOOLS = [
    types.Tool(
        name="count",
        description="Count from 1 to `to`, one step every `delay_ms`, reporting each step.",
        input_schema={
            "type": "object",
            "properties": {
                "to": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
                "delay_ms": {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS},
            },
            "required": ["to"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"counted": {"type": "integer"}},
            "required": ["counted"],
        },
        annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False),
    ),
    types.Tool(
        name="upper",
        description="The text in capitals.",
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": MAX_TEXT}},
            "required": ["text"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
        annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False),
    ),
]


def _ok(structured: dict[str, Any], text: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=text)], structured_content=structured
    )


async def list_tools(
    ctx: Any, params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def _count(ctx: Any, to: int, delay_ms: int) -> types.CallToolResult:
    step = 0
    try:
        for step in range(1, to + 1):
            if delay_ms:
                await anyio.sleep(delay_ms / 1000)
            # A no-op unless the caller sent a progress token.
            await ctx.session.report_progress(step, to, f"counted {step} of {to}")
    except anyio.get_cancelled_exc_class():
        print(f"counter: count cancelled at {step} of {to}", file=sys.stderr, flush=True)
        raise
    return _ok({"counted": to}, str(to))


async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    if params.name == "count":
        return await _count(ctx, int(args["to"]), int(args.get("delay_ms", 0)))
    if params.name == "upper":
        text = str(args["text"]).upper()
        return _ok({"text": text}, text)
    return types.CallToolResult(
        content=[types.TextContent(text=f"unknown tool: {params.name}")], is_error=True
    )


server = Server("counter", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool)


def main() -> None:
    port = int(os.environ.get("AGENT_PORT", "8000"))
    # Every interface of the container (its one network); tests run it on loopback.
    host = os.environ.get("COUNTER_MCP_HOST", "0.0.0.0")
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,
        # Only the hub reaches this port (the container's internal network, by IP); there is
        # no browser to rebind a name for, and the Host is an address not known in advance.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    print(f"counter MCP server ready on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
