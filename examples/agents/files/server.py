"""An MCP server over stdio, written with the official SDK's low-level ``Server``.

Deterministic tools over a small built-in read-only file system, so tests and the README
can show the hub deciding a call by its arguments (the shipped policy lets role ``user``
``read`` only under ``public/``):

- ``read(path)``: the text of one file
- ``list(prefix)``: the paths under a prefix
- ``add(a, b)``: a sum

With ``FILES_MCP_DEBUG=1`` it also lists ``crash`` (the process exits mid-call), ``hang``
(never answers) and ``garbage`` (writes a line that is not JSON-RPC to stdout): how the
tests make a server fail. ``FILES_MCP_BAD_SCHEMA=1`` lists a tool whose ``inputSchema`` is
not valid JSON Schema. Nothing here is fake in the protocol: the SDK frames every message.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

FILES = {
    "public/readme.txt": "Hello from the files MCP server.\n",
    "public/numbers.csv": "n,square\n1,1\n2,4\n3,9\n",
    "private/secret.txt": "The launch code is 0000.\n",
}
DEBUG = os.environ.get("FILES_MCP_DEBUG") == "1"
# The SDK points fd 1 at stderr while it serves (a stray print cannot corrupt the wire):
# ``garbage`` writes to a copy of the real stdout taken before that.
WIRE = os.dup(1) if DEBUG else -1
BAD_SCHEMA = os.environ.get("FILES_MCP_BAD_SCHEMA") == "1"

_PATH = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[a-z0-9_./-]+$"}
TOOLS = [
    types.Tool(
        name="read",
        description="The text of one file of the built-in file system.",
        input_schema={
            "type": "object",
            "properties": {"path": _PATH},
            "required": ["path"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
        annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False),
    ),
    types.Tool(
        name="list",
        description="The paths of the built-in file system under a prefix.",
        input_schema={
            "type": "object",
            "properties": {"prefix": {"type": "string", "maxLength": 200}},
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"paths": {"type": "array", "items": {"type": "string"}}},
            "required": ["paths"],
        },
        annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False),
    ),
    types.Tool(
        name="add",
        description="The sum of two numbers.",
        input_schema={
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"sum": {"type": "number"}},
            "required": ["sum"],
        },
        annotations=types.ToolAnnotations(read_only_hint=True, open_world_hint=False),
    ),
]
_NO_ARGS = {"type": "object", "additionalProperties": False}
if DEBUG:
    TOOLS += [
        types.Tool(name="crash", description="Exit mid-call (tests).", input_schema=_NO_ARGS),
        types.Tool(name="hang", description="Never answer (tests).", input_schema=_NO_ARGS),
        types.Tool(name="garbage", description="Write non-JSON to stdout.", input_schema=_NO_ARGS),
        types.Tool(
            name="wrong_output",
            description="A result that breaks its outputSchema (tests).",
            input_schema=_NO_ARGS,
            output_schema={
                "type": "object",
                "properties": {"n": {"type": "integer"}},
                "required": ["n"],
            },
        ),
    ]
if BAD_SCHEMA:
    TOOLS.append(
        types.Tool(
            name="broken",
            description="A tool whose schema is not JSON Schema.",
            input_schema={"type": "object", "properties": {"x": {"type": "no-such-type"}}},
        )
    )


def _ok(structured: dict[str, Any], text: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=text)], structured_content=structured
    )


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


async def list_tools(
    ctx: Any, params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    name = params.name
    if name == "read":
        path = args["path"]
        if path not in FILES:
            return _error(f"no such file: {path}")
        return _ok({"path": path, "content": FILES[path]}, FILES[path])
    if name == "list":
        prefix = args.get("prefix", "")
        paths = sorted(p for p in FILES if p.startswith(prefix))
        return _ok({"paths": paths}, "\n".join(paths))
    if name == "add":
        total = args["a"] + args["b"]
        return _ok({"sum": total}, str(total))
    if DEBUG and name == "crash":
        print("files: crashing on request", file=sys.stderr, flush=True)
        os._exit(3)
    if DEBUG and name == "hang":
        while True:
            time.sleep(60)  # noqa: ASYNC251 - blocks the loop on purpose: no answer
    if DEBUG and name == "garbage":
        os.write(WIRE, b"this is not JSON-RPC\n")
        return _ok({}, "")
    if DEBUG and name == "wrong_output":
        return _ok({"n": "not a number"}, "")
    return _error(f"unknown tool: {name}")


server = Server("files", version="1.0.0", on_list_tools=list_tools, on_call_tool=call_tool)


async def main() -> None:
    print("files MCP server ready on stdio", file=sys.stderr, flush=True)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
