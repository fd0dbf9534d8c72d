"""Tools of MCP servers behind the hub: list, validate, decide, log, forward, check.

A registry entry with ``protocol: mcp`` offers its server's tools as ``{agent}.{tool}``.
Every ``tools/call`` of one is, in order: the arguments validated against the tool's
``inputSchema`` (``SchemaViolation`` with JSON pointers), the tools policy
(``data.gateway.tools.decision``) asked with the tool name and the arguments in its input
and its answer written to the decision log (kind ``tool``), the call forwarded to a server
the pool runs in the sandbox that decision granted, and the result checked against the
tool's ``outputSchema`` when it has one. ``tools/list`` shows the tools the same policy
lets a caller call, asked without arguments and not logged per tool, as for agent tools.

While a call runs, the server's progress reports reach the caller's ``on_progress``;
cancelling the call (its asyncio task) cancels it on the server (``McpClient``), which keeps
running for the next call.

No HTTP here: the MCP door calls ``visible`` and ``call``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from gateway.agents.mcp import ProgressFn
from gateway.agents.mcp_pool import CheckedTool, McpServer, McpServerPool
from gateway.bundle.config import Config
from gateway.bundle.registry import AgentSpec
from gateway.bundle.schemas import json_pointer
from gateway.decisionlog.sink import DecisionSink
from gateway.errors import GatewayError, PolicyDenied, SchemaViolation
from gateway.identity.apikeys import Subject
from gateway.logs import bound, get_logger
from gateway.policy.engine import TOOLS_QUERY, Decision

log = get_logger(__name__)
TOOLS_PATH = "gateway/tools/decision"
MAX_REPORTED_ERRORS = 50


class ToolCallFailed(GatewayError):
    """A forwarded call that did not produce a valid result (carried to the caller as an
    error result, never as a protocol error)."""

    code, status = "tool_failed", 502


def schema_errors(validator: Any, instance: Any) -> list[dict[str, str]]:
    """The violations of ``instance`` as pointer, keyword and message (as ``SchemaSet``)."""
    found = []
    for err in validator.iter_errors(instance):
        parts = list(err.instance_path)
        # As SchemaSet.errors: point at the member that is missing or unexpected.
        prop = getattr(err.kind, "property", None)
        unexpected = getattr(err.kind, "unexpected", None)
        if isinstance(prop, str):
            parts.append(prop)
        elif isinstance(unexpected, list) and unexpected:
            parts.append(unexpected[0])
        found.append(
            {
                "pointer": json_pointer(parts),
                "keyword": str(err.schema_path[-1]) if err.schema_path else "",
                "message": err.message,
            }
        )
        if len(found) >= MAX_REPORTED_ERRORS:
            break
    return found


class ToolRouter:
    """The MCP-server tools of the registry in force, decided and forwarded."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        decisions: DecisionSink,
        pool: McpServerPool,
    ) -> None:
        self._config = config
        self.decisions = decisions
        self.pool = pool

    @staticmethod
    def split(config: Config, name: str) -> tuple[AgentSpec, str] | None:
        """The MCP agent and server tool behind hub tool ``name``, or None."""
        agent_name, dot, tool = name.partition(".")
        agent = config.registry.agents.get(agent_name)
        if not dot or agent is None or agent.protocol != "mcp" or tool not in agent.tools:
            return None
        return agent, tool

    def _input(
        self,
        subject: Subject,
        agent: AgentSpec,
        tool: str,
        arguments: dict[str, Any] | None,
        request: dict[str, Any],
        call_id: str | None = None,
    ) -> dict[str, Any]:
        name = f"{agent.name}.{tool}"
        tool_input: dict[str, Any] = {"name": name, "server_tool": tool}
        if arguments is not None:
            tool_input["arguments"] = arguments
        return {
            "subject": subject.to_json(),
            "task": {
                "agent": agent.name,
                "input": arguments if arguments is not None else {},
                "id": call_id,
                "labels": {"mcp_tool": name},
            },
            "agent": agent.to_json(),
            "request": {**request, "tool": name},
            "tool": tool_input,
        }

    async def visible(self, subject: Subject, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The MCP-server tools the tools policy would let ``subject`` call (evaluated,
        not logged); a server seen for the first time is started to list its tools."""
        config = self._config()
        servers = [a for a in config.registry.agents.values() if a.protocol == "mcp"]
        # Servers never listed yet are started (each for its listing alone), side by side.
        unknown = [a for a in servers if self.pool.known_tools(a) is None]
        await asyncio.gather(*(self._discover(config, a, subject, request) for a in unknown))
        shown: list[dict[str, Any]] = []
        for agent in servers:
            tools = self.pool.known_tools(agent)
            if tools is None:
                continue
            for tool in tools.values():
                policy_input = self._input(subject, agent, tool.name, None, request)
                if config.policy.evaluate(TOOLS_QUERY, policy_input).allow:
                    shown.append(_hub_tool(agent, tool))
        return shown

    async def _discover(
        self, config: Config, agent: AgentSpec, subject: Subject, request: dict[str, Any]
    ) -> None:
        # The sandbox its listing server runs in is the policy's for this caller.
        probe = self._input(subject, agent, agent.tools[0], None, request)
        decision = config.policy.evaluate(TOOLS_QUERY, probe)
        if not decision.allow or decision.sandbox is None:
            return
        try:
            await self.pool.discover(agent, decision.sandbox)
        except GatewayError as e:
            log.warning(
                "MCP server tools left out of tools/list",
                extra={"agent": agent.name, "error": e.message},
            )

    async def _owner_tools(
        self, agent: AgentSpec, subject: Subject, sandbox: dict[str, Any]
    ) -> dict[str, CheckedTool]:
        async def listed(server: McpServer) -> dict[str, CheckedTool]:
            return server.tools

        return await self.pool.use(agent, subject.id, sandbox, listed)

    async def call(
        self,
        subject: Subject,
        name: str,
        arguments: dict[str, Any],
        request: dict[str, Any],
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Validate, decide, log, forward and check one call of hub tool ``name``; the
        ``CallToolResult`` JSON (``_meta`` names the decision). SchemaViolation (pointers
        relative to the arguments), PolicyDenied or ToolCallFailed otherwise. The server's
        progress goes to ``on_progress`` (its params: progress, total, message)."""
        config = self._config()
        found = self.split(config, name)
        assert found is not None, "callers check with split() first"
        agent, tool_name = found
        call_id = "mcp-call-" + str(uuid.uuid4())
        tool = (self.pool.known_tools(agent) or {}).get(tool_name)
        if tool is None:
            # First use: which sandbox its server may have is the policy's (no arguments yet).
            probe = self._input(subject, agent, tool_name, None, request, call_id)
            decision = config.policy.evaluate(TOOLS_QUERY, probe)
            if decision.allow and decision.sandbox is not None:
                tools = await self._owner_tools(agent, subject, decision.sandbox)
                tool = tools.get(tool_name)
            else:
                await self._record(config, subject, agent, probe, decision, call_id)
                raise self._denied(decision, None)
            if tool is None:
                raise ToolCallFailed(f"MCP server {agent.name} does not list tool {tool_name!r}")
        if not tool.input_validator.is_valid(arguments):
            errors = schema_errors(tool.input_validator, arguments)
            raise SchemaViolation(
                f"arguments for {name} do not match its inputSchema ({len(errors)} error"
                f"{'s' if len(errors) != 1 else ''})",
                details=errors,
            )
        policy_input = self._input(subject, agent, tool_name, arguments, request, call_id)
        decision = config.policy.evaluate(TOOLS_QUERY, policy_input)
        decision_id = await self._record(config, subject, agent, policy_input, decision, call_id)
        if not decision.allow or decision.sandbox is None:
            raise self._denied(decision, decision_id)
        started = time.perf_counter()

        async def forward(server: McpServer) -> dict[str, Any]:
            return await server.client.call_tool(tool_name, arguments, agent.timeout_s, on_progress)

        with bound(decision_id=decision_id, agent=agent.name):
            try:
                result = await self.pool.use(agent, subject.id, decision.sandbox, forward)
            except GatewayError as e:
                log.info("mcp tool call failed", extra={"tool": name, "error": e.message})
                raise ToolCallFailed(
                    e.message, details={"code": e.code}, decision_id=decision_id
                ) from e
            except asyncio.CancelledError:
                ms = round((time.perf_counter() - started) * 1000, 2)
                log.info(
                    "mcp tool call cancelled",
                    extra={"tool": name, "subject": subject.id, "ms": ms},
                )
                raise
            ms = round((time.perf_counter() - started) * 1000, 2)
            log.info("mcp tool call", extra={"tool": name, "subject": subject.id, "ms": ms})
        if tool.output_validator is not None and not result.get("isError"):
            structured = result.get("structuredContent")
            if structured is None or not tool.output_validator.is_valid(structured):
                errors = (
                    schema_errors(tool.output_validator, structured)
                    if structured is not None
                    else [{"pointer": "", "keyword": "required", "message": "no structuredContent"}]
                )
                raise ToolCallFailed(
                    f"the result of {name} does not match its outputSchema",
                    details={"code": "output_schema_violation", "errors": errors},
                    decision_id=decision_id,
                )
        meta = dict(result.get("_meta") or {})
        meta["io.agent-gateway/decision_id"] = decision_id
        return {**result, "_meta": meta}

    async def _record(
        self,
        config: Config,
        subject: Subject,
        agent: AgentSpec,
        policy_input: dict[str, Any],
        decision: Decision,
        call_id: str,
    ) -> str:
        return await self.decisions.record(
            kind="tool",
            path=TOOLS_PATH,
            input=policy_input,
            decision=decision,
            revision=config.revision,
            subject=subject.id,
            agent=agent.name,
            task_id=None,
        )

    @staticmethod
    def _denied(decision: Decision, decision_id: str | None) -> PolicyDenied:
        return PolicyDenied(
            f"policy denied the tool call: {'; '.join(decision.reasons)}",
            details={"reasons": list(decision.reasons)},
            decision_id=decision_id,
        )


def _hub_tool(agent: AgentSpec, tool: CheckedTool) -> dict[str, Any]:
    """The server's tool as the hub lists it: renamed, described as sandboxed."""
    listed = dict(tool.tool)
    listed["name"] = f"{agent.name}.{tool.name}"
    listed.pop("_meta", None)
    described = listed.get("description") or ""
    listed["description"] = (
        f"{described} (MCP server {agent.name}, tool {tool.name}; runs in a container)".strip()
    )
    return listed
