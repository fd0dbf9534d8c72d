"""The tool catalog: every capability of every agent in the registry is an MCP tool.

A tool is named ``{agent}.{capability}`` (agent names hold no dot, so the first dot splits
it back). Its ``inputSchema`` and ``outputSchema`` are the agent's schemas with every
``$ref`` inlined: an MCP client validates with the tool's schema alone, and our schemas
point at each other (``../common.json#/$defs/text``). The catalog is built once per
registry and schemas revision.

Which tools a caller sees is the dispatch policy's answer for a call with empty arguments
(``visible``): the policy is evaluated, nothing is dispatched and nothing is written to the
decision log per tool (the ``tools/list`` call itself is one ``api`` decision). A rule that
depends on the arguments decides at call time, where its decision is logged as usual.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urldefrag, urljoin

from gateway.bundle.config import Config
from gateway.bundle.registry import AgentSpec
from gateway.bundle.schemas import BASE_URI
from gateway.identity.apikeys import Subject
from gateway.logs import get_logger
from gateway.policy.engine import DISPATCH_QUERY

log = get_logger(__name__)
# A $ref chain deeper than this is taken for a cycle; the tool is left out (and logged).
MAX_REF_DEPTH = 32


@dataclass(frozen=True, slots=True)
class ToolDef:
    """One tool: the agent and capability behind it and its MCP ``Tool`` as JSON."""

    name: str
    agent: str
    capability: str
    tool: dict[str, Any]


class SchemaInlineError(ValueError):
    """A schema whose ``$ref`` cannot be inlined (unknown target, or a cycle)."""


def inline_refs(documents: dict[str, Any], ref: str) -> dict[str, Any]:
    """The schema ``ref`` (a path under ``schemas/``) with every ``$ref`` replaced by its
    target, so it validates on its own."""
    by_uri = {_uri_of(path, doc): doc for path, doc in documents.items()}
    base = _uri_of(ref, documents[ref])
    out = _inline(documents[ref], base, by_uri, ())
    if not isinstance(out, dict):
        raise SchemaInlineError(f"{ref} is not a schema object")
    return out


def _uri_of(path: str, doc: Any) -> str:
    declared = doc.get("$id") if isinstance(doc, dict) else None
    return declared if isinstance(declared, str) else BASE_URI + path


def _inline(node: Any, base: str, by_uri: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, base, by_uri, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        target_uri = urljoin(base, ref)
        if target_uri in seen or len(seen) >= MAX_REF_DEPTH:
            raise SchemaInlineError(f"$ref cycle at {target_uri}")
        doc_uri, fragment = urldefrag(target_uri)
        doc = by_uri.get(doc_uri)
        if doc is None:
            raise SchemaInlineError(f"$ref to an unknown schema {doc_uri}")
        target = _follow(doc, fragment, target_uri)
        resolved = _inline(target, doc_uri, by_uri, (*seen, target_uri))
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        if not siblings:
            return _strip_ids(resolved)
        return {"allOf": [_strip_ids(resolved)], **_inline(siblings, base, by_uri, seen)}
    return {
        key: (
            value
            if key in ("const", "enum", "default", "examples")
            else _inline(value, base, by_uri, seen)
        )
        for key, value in node.items()
    }


def _follow(doc: Any, fragment: str, uri: str) -> Any:
    node = doc
    for raw in [p for p in fragment.split("/") if p]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise SchemaInlineError(f"$ref target {uri} does not exist")
    return node


def _strip_ids(schema: Any) -> Any:
    # An inlined document keeps no $id or $schema: they would rebase later refs.
    if isinstance(schema, dict):
        return {k: v for k, v in schema.items() if k not in ("$id", "$schema")}
    return schema


def tool_name(agent: str, capability: str) -> str:
    """``{agent}.{capability}``."""
    return f"{agent}.{capability}"


def _describe(agent: AgentSpec, capability: str) -> str:
    text = " ".join(agent.description.split()) or f"The {agent.name} agent."
    return f"{text} (agent {agent.name}, capability {capability}; runs in a container)"


def _tool(agent: AgentSpec, capability: str, documents: dict[str, Any]) -> dict[str, Any]:
    input_schema = inline_refs(documents, agent.input_schema)
    output_schema = inline_refs(documents, agent.output_schema)
    tool: dict[str, Any] = {
        "name": tool_name(agent.name, capability),
        "title": f"{agent.name}: {capability}",
        "description": _describe(agent, capability),
        "inputSchema": input_schema,
        "annotations": {
            "title": f"{agent.name}: {capability}",
            # A tool reaches the outside world only through the egress network.
            "openWorldHint": agent.network == "egress",
        },
    }
    # structuredContent must be an object before 2026-07-28; other outputs go as text only.
    if output_schema.get("type") == "object":
        tool["outputSchema"] = output_schema
    return tool


class ToolCatalog:
    """The tools of the registry in force, rebuilt when its revision changes."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._tools: dict[str, ToolDef] = {}

    def tools(self, config: Config) -> dict[str, ToolDef]:
        """Every tool by name, in registry order."""
        key = (config.registry_revision, config.schemas_revision)
        if key != self._key:
            self._tools = dict(self._build(config))
            self._key = key
        return self._tools

    def _build(self, config: Config) -> Iterable[tuple[str, ToolDef]]:
        documents = config.schemas.documents
        for agent in config.registry.agents.values():
            for capability in agent.capabilities:
                try:
                    tool = _tool(agent, capability, documents)
                except (SchemaInlineError, KeyError) as e:
                    log.warning(
                        "agent capability not offered as an MCP tool: its schema cannot be inlined",
                        extra={"agent": agent.name, "capability": capability, "error": str(e)},
                    )
                    continue
                name = tool["name"]
                yield name, ToolDef(name, agent.name, capability, tool)

    def get(self, config: Config, name: str) -> ToolDef | None:
        """The tool called ``name``, or None."""
        return self.tools(config).get(name)

    def visible(
        self, config: Config, subject: Subject, request: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The tools the dispatch policy would let ``subject`` call (evaluated, not logged)."""
        shown = []
        for tool in self.tools(config).values():
            agent = config.registry.agents[tool.agent]
            policy_input = {
                "subject": subject.to_json(),
                "task": {
                    "agent": tool.agent,
                    "input": {},
                    "id": None,
                    "labels": {"mcp_tool": tool.name},
                },
                "agent": agent.to_json(),
                "request": {**request, "tool": tool.name},
            }
            if config.policy.evaluate(DISPATCH_QUERY, policy_input).allow:
                shown.append(tool.tool)  # read-only: serialised at once
        return shown
