"""MCP servers behind the hub without an engine: the registry entry and the tool checks.

The real path (a container, the SDK client through the hub) is in
tests/integration/test_mcp_servers_docker.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.agents.mcp_pool import check_tools, schema_problem
from gateway.bundle.registry import load_registry
from gateway.bundle.schemas import SchemaSet
from gateway.errors import ConfigError
from tests.conftest import REPO

SCHEMAS = SchemaSet.load(REPO / "schemas")
MCP_AGENT = """\
version: 1
agents:
  - name: files
    protocol: mcp
    transport: stdio
    image: agent-gateway/files:dev
    tools: [read, add]
"""


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    return load_registry(path, SCHEMAS)


def test_an_mcp_entry_loads_with_its_defaults(tmp_path: Path) -> None:
    agent = _load(tmp_path, MCP_AGENT).get("files")
    assert (agent.protocol, agent.transport, agent.isolation) == ("mcp", "stdio", "per_owner")
    assert agent.tools == ("read", "add") and agent.capabilities == ()
    assert agent.to_json()["tools"] == ["read", "add"]


def test_the_default_protocol_is_gateway() -> None:
    registry = load_registry(REPO / "agents.yaml", SCHEMAS)
    assert registry.get("echo").protocol == "gateway"
    assert registry.get("files").protocol == "mcp"


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        # note: an MCP entry needs its allow-list and transport
        (lambda t: t.replace("    tools: [read, add]\n", ""), "/agents/0"),
        (lambda t: t.replace("    transport: stdio\n", ""), "/agents/0"),
        # its tools bring their schemas: an agent's schema fields are refused
        (lambda t: t + "    input_schema: agents/echo.input.json\n", "/agents/0/input_schema"),
        # Streamable HTTP needs a port
        (lambda t: t.replace("transport: stdio", "transport: http"), "/agents/0"),
        (lambda t: t.replace("isolation", "x") + "    isolation: shared\n", "/agents/0/isolation"),
        (lambda t: t.replace("[read, add]", "[read, 'bad name']"), "/agents/0/tools/1"),
    ],
)
def test_bad_mcp_entries_are_refused(tmp_path: Path, change: Any, pointer: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, change(MCP_AGENT))
    assert pointer in e.value.message


def test_a_gateway_entry_may_not_carry_mcp_fields(tmp_path: Path) -> None:
    text = (
        (REPO / "agents.yaml")
        .read_text()
        .replace(
            "    timeout_s: 30\n    resources: {memory: 64m",
            "    tools: [x]\n    timeout_s: 30\n    resources: {memory: 64m",
            1,
        )
    )
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert "/agents/0/tools" in e.value.message


def _agent(tmp_path: Path) -> Any:
    return _load(tmp_path, MCP_AGENT).get("files")


def _tool(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "inputSchema": {"type": "object"}, **extra}


@pytest.mark.parametrize(
    ("schema", "input_schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {"type": "number"}}}, True, None),
        ({"type": "object", "properties": {"a": {"type": "nope"}}}, True, "/properties/a/type"),
        ({"type": "string"}, True, 'type is not "object"'),
        ({"type": "string"}, False, None),  # an output schema may be any type
        ({"type": "object", "$schema": "http://json-schema.org/draft-07/schema#"}, True, "2020-12"),
        ({"type": "object", "properties": {"a": {"$ref": "https://x.test/s.json"}}}, True, "$ref"),
        (
            {"type": "object", "$defs": {"n": {}}, "properties": {"a": {"$ref": "#/$defs/n"}}},
            True,
            None,
        ),
        ([], True, "not an object"),
    ],
)
def test_schema_problems(schema: Any, input_schema: bool, problem: str | None) -> None:
    found = schema_problem(schema, input_schema=input_schema)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_check_tools_refuses_a_tool_outside_the_allow_list(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"outside its allow-list \['read', 'add'\]: \['crash'\]"):
        check_tools(_agent(tmp_path), [_tool("read"), _tool("crash")])


def test_check_tools_refuses_an_invalid_output_schema(tmp_path: Path) -> None:
    bad = _tool("add", outputSchema={"type": "object", "required": "sum"})
    with pytest.raises(Exception, match="tool 'add' has an invalid outputSchema"):
        check_tools(_agent(tmp_path), [_tool("read"), bad])


def test_check_tools_keeps_compiled_validators(tmp_path: Path) -> None:
    add = _tool("add", outputSchema={"type": "object", "required": ["sum"]})
    checked = check_tools(_agent(tmp_path), [add])  # fewer tools than allowed is fine
    assert set(checked) == {"add"}
    assert checked["add"].output_validator.is_valid({"sum": 1})
    assert not checked["add"].output_validator.is_valid({})
