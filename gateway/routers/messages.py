"""The message router: agent-to-agent messages through the hub, and results reported later.

For every message the hub validates the envelope and the payload of its kind, asks the
``gateway.messages`` policy whether the (verified) sender may send it to its target, writes
the decision to the decision log, and only then routes it:

- ``request``: to one running instance of the target agent (``POST /message``); its reply
  is returned (``Replied``; a timeout is a 504 and nothing is queued: the sender retries);
- ``event``: to every running instance of the agents subscribed to the topic
  (``Delivered``);
- ``broadcast``: to every running agent the policy lets the sender reach (one decision per
  target agent; ``Delivered``);
- ``delegate``: a child task through the normal dispatch path, linked to the sender's task
  (``Delegated``);
- ``tool``: an MCP ``tools/call`` an agent makes at ``/mcp`` (built by the hub, never sent
  as a ``POST /v1/messages`` body): decided here, then run by the MCP door (``tool_task``
  for an agent's capability, ``gateway.routers.tools`` for an MCP server's tool).

Messages are not persisted. No HTTP here: ``gateway.http.agent_routes`` calls these methods
and picks the status code and body of each outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.agents.instances import Instance, InstanceRegistry
from gateway.agents.wire import AgentWire
from gateway.bundle.config import MESSAGE_SCHEMA, RESULT_SCHEMA, Config
from gateway.bundle.registry import AgentSpec
from gateway.decisionlog.masking import SecretPointers
from gateway.decisionlog.sink import DecisionSink
from gateway.errors import (
    AgentNotRunning,
    DelegationTooDeep,
    GatewayError,
    NotTaskOwner,
    PolicyDenied,
    SchemaViolation,
    UnknownMessageKind,
    UnknownTopic,
)
from gateway.identity.svid import VerifiedIdentity
from gateway.ids import uuid4_str
from gateway.logs import bound, get_logger
from gateway.policy.engine import MESSAGES_QUERY, Decision
from gateway.routers.tasks import TaskRouter
from gateway.settings import MessageSettings
from gateway.store import Task

log = get_logger(__name__)
MESSAGES_PATH = "gateway/messages/decision"
KINDS_DIR = "messages/kinds/"
MESSAGE_ENDPOINT = "/message"
# What the policy input's ``request`` shows of the call that carried the message: the door
# (protocol, method) and the W3C trace context, so one request can be followed across hops.
REQUEST_CONTEXT = ("protocol", "rpc_method", "traceparent")
TOOL_KIND = "mcp.tools/call"
_request_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "message_request_context", default=None
)


@dataclass(frozen=True, slots=True)
class Replied:
    """A request's outcome: the reply of the one instance of the target agent that took it."""

    reply: Any
    agent: str
    spiffe_id: str
    message_id: str
    decision_id: str
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """An event's or a broadcast's outcome: how many of its recipients took it."""

    kind: Literal["event", "broadcast"]
    delivered: int
    recipients: int
    # An event's one decision; a broadcast's, one per running target agent (sorted by name).
    decision_ids: tuple[str, ...]
    refused: tuple[str, ...] = ()  # broadcast: the agents the policy kept it from, sorted


@dataclass(frozen=True, slots=True)
class Delegated:
    """A delegation's outcome: the child task, as submitted or after the wait."""

    task: Task
    decision_id: str  # of the message (the child task has its own dispatch decision)


Routed = Replied | Delivered | Delegated


@dataclass(frozen=True, slots=True)
class Sender:
    """A verified sender; ``instance`` only for a live container this hub minted the token for."""

    identity: VerifiedIdentity
    instance: Instance | None

    @property
    def spiffe_id(self) -> str:
        return self.identity.spiffe_id

    def source(self) -> dict[str, Any]:
        """The policy's ``input.source``: only what the hub verified or knows itself."""
        inst = self.instance
        return {
            "spiffe_id": self.identity.spiffe_id,
            "trust_domain": self.identity.trust_domain,
            "agent": self.identity.agent,
            "instance_id": inst.instance_id if inst else None,
            "task_id": inst.task_id if inst else None,
            "local": inst is not None,
            "depth": inst.depth if inst else 0,
            "lineage": [e.to_json() for e in inst.lineage] if inst else [],
            # Whose task it runs: the user who submitted the root task (tenancy).
            "owner": inst.subject.id if inst else None,
        }


class MessageRouter:
    """Validates, decides, logs and routes messages between agents."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        instances: InstanceRegistry,
        decisions: DecisionSink,
        tasks: TaskRouter,
        trust_domain: str,
        options: MessageSettings,
    ) -> None:
        self._config = config
        self.instances = instances
        self.decisions = decisions
        # Hand-offs to agents: the lean keep-alive client (the hot path of every message).
        self.wire = AgentWire()
        instances.on_close(self._forget)
        self.tasks = tasks
        self.trust_domain = trust_domain
        self.options = options
        # Registry entries as policy input, built once per loaded configuration.
        self._targets_of: Config | None = None
        self._targets: dict[str, dict[str, Any]] = {}
        # The x-secret fields of kinds' payload and agents' input schemas, per schema set.
        self._secrets = SecretPointers()
        self._turn = 0  # round robin over the instances a request may reach

    def sender(self, identity: VerifiedIdentity) -> Sender:
        """Who sent a message: the live instance behind a token this hub minted, if any."""
        inst = None
        # Only our own tokens name our instances; another trust domain's claim means nothing.
        if identity.trust_domain == self.trust_domain:
            inst = self.instances.get(identity.instance_id)
            if inst is not None and inst.agent != identity.agent:
                inst = None
        return Sender(identity, inst)

    # -- messages

    async def send(
        self,
        sender: Sender,
        envelope: Any,
        *,
        wait_s: float | None = None,
        request: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Routed:
        """Route one message; return its outcome, or raise a GatewayError.

        A delegation sent again with the same ``idempotency_key`` by the same task (an agent
        retrying across a hub restart) gets the child task the first one created.
        """
        config = self._config()
        config.schemas.validate(MESSAGE_SCHEMA, envelope, what="message")
        kind_schema = KINDS_DIR + envelope["kind"] + ".json"
        if not config.schemas.has(kind_schema):
            raise UnknownMessageKind(
                f"no schema for message kind {envelope['kind']!r} "
                f"(expected {config.schemas.root.name}/{kind_schema})",
                details={"pointer": "/kind"},
            )
        config.schemas.validate(
            kind_schema, envelope["payload"], prefix="/payload", what=f"{envelope['kind']} payload"
        )
        inst = sender.instance
        context = {k: request[k] for k in REQUEST_CONTEXT if request and k in request}
        token = _request_context.set(context or None)
        try:
            with bound(agent=sender.identity.agent, task_id=inst.task_id if inst else None):
                return await self._route(config, sender, envelope, wait_s, request, idempotency_key)
        finally:
            _request_context.reset(token)

    async def _route(
        self,
        config: Config,
        sender: Sender,
        envelope: dict[str, Any],
        wait_s: float | None,
        request: dict[str, Any] | None,
        idempotency_key: str | None,
    ) -> Routed:
        kind = envelope["type"]
        if kind == "request":
            return await self._request(config, sender, envelope)
        if kind == "event":
            return await self._event(config, sender, envelope)
        if kind == "broadcast":
            return await self._broadcast(config, sender, envelope)
        return await self._delegate(
            config, sender, envelope, wait_s, request or {}, idempotency_key
        )

    async def _request(self, config: Config, sender: Sender, envelope: dict[str, Any]) -> Replied:
        target = config.registry.get(envelope["to"])
        candidates = self.instances.running(target.name, exclude=_instance_id(sender))
        decision_id, reachable = await self._decide_recipients(
            config, sender, envelope, self._target(config, target), candidates
        )
        # The same answer whether no instance runs or only ones the sender may not reach,
        # so a sender learns nothing of other owners' containers.
        inst = self._round_robin(reachable)
        if inst is None or inst.handle is None:
            raise AgentNotRunning(
                f"no container of agent {target.name!r} is running; start a task for it first",
                decision_id=decision_id,
            )
        timeout_s = min(
            float(envelope.get("timeout_s") or self.options.timeout_s), self.options.max_timeout_s
        )
        body = _delivery(sender, envelope)
        reply = await self.wire.post(inst.handle, MESSAGE_ENDPOINT, body, timeout_s)
        return Replied(
            # None also for an Accepted (202): the agent took the message without a reply.
            reply=reply.get("reply") if isinstance(reply, dict) else None,
            agent=inst.agent,
            spiffe_id=inst.spiffe_id,
            message_id=body["message_id"],
            decision_id=decision_id,
            correlation_id=envelope.get("correlation_id"),
        )

    async def _event(self, config: Config, sender: Sender, envelope: dict[str, Any]) -> Delivered:
        topic = envelope["topic"]
        subscribers = sorted(
            a.name for a in config.registry.agents.values() if topic in a.subscriptions
        )
        if not subscribers:
            raise UnknownTopic(
                f"no agent subscribes to topic {topic!r}",
                details={
                    "known": sorted(
                        {t for a in config.registry.agents.values() for t in a.subscriptions}
                    )
                },
            )
        target = {"type": "topic", "topic": topic, "subscribers": subscribers}
        candidates = [
            i
            for name in subscribers
            for i in self.instances.running(name, exclude=_instance_id(sender))
        ]
        decision_id, recipients = await self._decide_recipients(
            config, sender, envelope, target, candidates
        )
        delivered = await self._deliver_all(recipients, _delivery(sender, envelope))
        return Delivered("event", delivered, len(recipients), (decision_id,))

    async def _broadcast(
        self, config: Config, sender: Sender, envelope: dict[str, Any]
    ) -> Delivered:
        by_agent: dict[str, list[Instance]] = {}
        for inst in self.instances.running(exclude=_instance_id(sender)):
            by_agent.setdefault(inst.agent, []).append(inst)
        allowed: list[Instance] = []
        refused: dict[str, list[str]] = {}
        decision_ids: list[str] = []
        for name in sorted(by_agent):
            spec = config.registry.agents.get(name)
            if spec is None:
                continue  # removed from the registry by a reload; its containers run on
            try:
                decision_id, reachable = await self._decide_recipients(
                    config, sender, envelope, self._target(config, spec), by_agent[name]
                )
                decision_ids.append(decision_id)
                allowed.extend(reachable)
            except PolicyDenied as e:
                decision_ids.append(e.decision_id or "")
                refused[name] = list(e.details.get("reasons", [])) if e.details else []
        if refused and not allowed:
            raise PolicyDenied(
                "policy lets the sender reach none of the running agents",
                details={"refused": refused},
                decision_id=decision_ids[0],
            )
        delivered = await self._deliver_all(allowed, _delivery(sender, envelope))
        return Delivered(
            "broadcast", delivered, len(allowed), tuple(decision_ids), tuple(sorted(refused))
        )

    # -- tools called by agents (the MCP door on a JWT-SVID)

    def tool_allowed(self, sender: Sender, spec: AgentSpec, tool: str) -> bool:
        """Whether the policy would let ``sender`` call ``tool`` of ``spec`` (asked without
        arguments, not logged: for ``tools/list``)."""
        config = self._config()
        policy_input = {
            "source": sender.source(),
            "message": tool_message(spec.name, tool, None),
            "target": self._target(config, spec),
        }
        return config.policy.evaluate(MESSAGES_QUERY, policy_input).allow

    async def decide_tool(
        self,
        sender: Sender,
        spec: AgentSpec,
        tool: str,
        arguments: dict[str, Any],
        request: dict[str, Any] | None = None,
    ) -> str:
        """Decide and log ``sender``'s call of ``tool`` (a message of type ``tool``); its
        decision id, or PolicyDenied / DelegationTooDeep."""
        config = self._config()
        envelope = tool_message(spec.name, tool, arguments)
        target = self._target(config, spec)
        context = {k: request[k] for k in REQUEST_CONTEXT if request and k in request}
        token = _request_context.set(context or None)
        try:
            if spec.protocol != "mcp":
                await self._check_depth(config, sender, envelope, target)
            decision_id = await self._decide(config, sender, envelope, target)
        finally:
            _request_context.reset(token)
        if sender.instance is None:
            # The policy should have refused already: a call runs for the sender's task's owner.
            raise PolicyDenied(
                "only an agent running a task may call tools", decision_id=decision_id
            )
        return decision_id

    async def tool_task(
        self,
        sender: Sender,
        spec: AgentSpec,
        tool: str,
        arguments: dict[str, Any],
        request: dict[str, Any],
    ) -> Delegated:
        """An agent capability called as a tool by an agent: decided, then a child task of
        the sender's task, for that task's owner (as a delegation)."""
        decision_id = await self.decide_tool(sender, spec, tool, arguments, request)
        parent = sender.instance
        assert parent is not None, "decide_tool refuses a sender without a task"
        task_envelope: dict[str, Any] = {
            "agent": spec.name,
            "input": arguments,
            "labels": {
                "delegated_by": sender.spiffe_id,
                "parent_task": parent.task_id,
                "mcp_tool": tool,
            },
        }
        task, _ = await self.tasks.submit(
            parent.subject, task_envelope, request=request, parent=parent
        )
        log.info("tool call as a child task", extra={"child_task_id": task.id, "tool": tool})
        return Delegated(task, decision_id)

    async def _check_depth(
        self, config: Config, sender: Sender, envelope: dict[str, Any], target: dict[str, Any]
    ) -> None:
        parent = sender.instance
        limit = self.options.max_delegation_depth
        if parent is not None and parent.depth + 1 > limit:
            # The hub's own ceiling, whatever the policy says; still an audited decision.
            decision = Decision(
                allow=False,
                reasons=(
                    f"delegation depth {parent.depth + 1} exceeds the hub's limit of {limit}",
                ),
                error="depth_limit",
            )
            decision_id = await self._record(config, sender, envelope, target, decision)
            raise DelegationTooDeep(
                decision.reasons[0],
                details={"depth": parent.depth + 1, "limit": limit, "lineage": _lineage(parent)},
                decision_id=decision_id,
            )

    async def _delegate(
        self,
        config: Config,
        sender: Sender,
        envelope: dict[str, Any],
        wait_s: float | None,
        request: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> Delegated:
        target = config.registry.get(envelope["to"])
        parent = sender.instance
        await self._check_depth(config, sender, envelope, self._target(config, target))
        decision_id = await self._decide(config, sender, envelope, self._target(config, target))
        if parent is None:
            # The policy should have refused already: a task needs a parent to descend from.
            raise PolicyDenied("only an agent running a task may delegate", decision_id=decision_id)
        payload = envelope["payload"]
        task_envelope: dict[str, Any] = {
            "agent": target.name,
            "input": payload["input"],
            "labels": {"delegated_by": sender.spiffe_id, "parent_task": parent.task_id},
        }
        if "timeout_s" in payload:
            task_envelope["timeout_s"] = payload["timeout_s"]
        # On behalf of the user who submitted the root task: delegation never adds roles.
        task, _ = await self.tasks.submit(
            parent.subject,
            task_envelope,
            request=request,
            parent=parent,
            # Scoped to the parent task: the key is the agent's, the subject the root's.
            idempotency_key=f"delegate:{parent.task_id}:{idempotency_key}"
            if idempotency_key
            else None,
        )
        log.info(
            "delegated",
            extra={"child_task_id": task.id, "to": target.name, "depth": parent.depth + 1},
        )
        if wait_s:
            task = await self.tasks.wait_for(task.id, wait_s)
        return Delegated(task, decision_id)

    def _forget(self, inst: Instance) -> None:
        if inst.handle is not None:
            self.wire.forget(inst.handle)

    async def close(self) -> None:
        """Close idle connections to agents."""
        await self.wire.close()

    # -- results reported later

    async def report_result(self, sender: Sender, task_id: str, body: Any) -> Task:
        """Accept the result of ``task_id`` from the container running it (and nobody else);
        return the task as it is once the result is recorded (or after 5 s)."""
        config = self._config()
        config.schemas.validate(RESULT_SCHEMA, body, what="result")
        running = self.instances.for_task(task_id)
        inst = sender.instance
        if running is None and inst is not None and self.instances.is_remote(inst):
            # A container another hub of the cluster runs reported here (its GATEWAY_URL
            # names a hub that died and came back, or any hub behind one address).
            running = inst if inst.task_id == task_id else None
            if running is not None:
                return await self._report_elsewhere(config, running, task_id, body)
        if sender.instance is None or running is None or running is not sender.instance:
            # The same answer whether the task exists or not: no probing of task ids.
            raise NotTaskOwner(
                f"only the container running task {task_id!r} may report its result",
                details={"task_id": task_id},
            )
        errors: list[dict[str, str]] = []
        spec = config.registry.agents.get(running.agent)
        if "output" in body and spec is not None:
            errors = config.schemas.errors(spec.output_schema, body["output"], "/output")
        self.tasks.deliver_report(task_id, body)
        task = await self.tasks.wait_for(task_id, 5.0)
        if errors:
            # Delivered all the same: the task fails with the reason, as for a direct answer.
            raise SchemaViolation(
                f"output does not match {spec.output_schema if spec else 'its schema'}; "
                f"task {task_id} is {task.state}",
                details=errors,
            )
        return task

    async def _report_elsewhere(
        self, config: Config, running: Instance, task_id: str, body: dict[str, Any]
    ) -> Task:
        """Record a result for a task another hub runs straight in the shared store (the
        guarded transition: the first end wins); that hub's runner sees it within a second."""
        spec = config.registry.agents.get(running.agent)
        if spec is None:
            raise NotTaskOwner(
                f"agent {running.agent!r} is not in the registry", details={"task_id": task_id}
            )
        task = await self.tasks.record_report(task_id, spec, body)
        if "output" in body and task.state == "failed":
            errors = config.schemas.errors(spec.output_schema, body["output"], "/output")
            if errors:
                raise SchemaViolation(
                    f"output does not match {spec.output_schema}; task {task_id} is failed",
                    details=errors,
                )
        return task

    # -- helpers

    def _target(self, config: Config, spec: AgentSpec) -> dict[str, Any]:
        if self._targets_of is not config:
            self._targets_of, self._targets = config, {}
        target = self._targets.get(spec.name)
        if target is None:
            target = self._targets[spec.name] = {"type": "agent", "agent": spec.to_json()}
        return target

    async def _decide_recipients(
        self,
        config: Config,
        sender: Sender,
        envelope: dict[str, Any],
        target: dict[str, Any],
        candidates: list[Instance],
    ) -> tuple[str, list[Instance]]:
        """Decide a message to ``candidates`` (the running instances it could reach); return
        its decision id and the candidates the policy's ``deliver_to`` names (none if absent:
        fail closed). PolicyDenied when the message itself is refused."""
        target = {**target, "instances": [_instance_json(i) for i in candidates]}
        decision_id, decision = await self._evaluate(config, sender, envelope, target)
        chosen = decision.extra.get("deliver_to")
        ids = {str(i) for i in chosen} if isinstance(chosen, list) else set()
        return decision_id, [i for i in candidates if i.instance_id in ids]

    def _round_robin(self, found: list[Instance]) -> Instance | None:
        if not found:
            return None
        self._turn += 1
        return found[self._turn % len(found)]

    async def _decide(
        self, config: Config, sender: Sender, envelope: dict[str, Any], target: dict[str, Any]
    ) -> str:
        """Evaluate and log the decision; PolicyDenied (with its id) when refused."""
        return (await self._evaluate(config, sender, envelope, target))[0]

    async def _evaluate(
        self, config: Config, sender: Sender, envelope: dict[str, Any], target: dict[str, Any]
    ) -> tuple[str, Decision]:
        """Evaluate and log the decision; its id and the decision, or PolicyDenied."""
        policy_input = {"source": sender.source(), "message": envelope, "target": target}
        context = _request_context.get()
        if context:
            policy_input["request"] = context
        decision = config.policy.evaluate(MESSAGES_QUERY, policy_input)
        decision_id = await self._record(config, sender, envelope, target, decision, policy_input)
        if not decision.allow:
            name = _target_name(target)
            log.info(
                "message denied",
                extra={"decision_id": decision_id, "to": name, "reasons": list(decision.reasons)},
            )
            raise PolicyDenied(
                f"policy denied the message: {'; '.join(decision.reasons)}",
                details={"reasons": list(decision.reasons), "target": name},
                decision_id=decision_id,
            )
        return decision_id, decision

    async def _record(
        self,
        config: Config,
        sender: Sender,
        envelope: dict[str, Any],
        target: dict[str, Any],
        decision: Decision,
        policy_input: dict[str, Any] | None = None,
    ) -> str:
        inst = sender.instance
        return await self.decisions.record(
            kind="message",
            path=MESSAGES_PATH,
            input=policy_input
            or {"source": sender.source(), "message": envelope, "target": target},
            decision=decision,
            revision=config.revision,
            subject=sender.spiffe_id,
            agent=_target_name(target) if target["type"] == "agent" else None,
            task_id=inst.task_id if inst else None,
            secret_pointers=self._secret_pointers(config, envelope, target),
        )

    def _secret_pointers(
        self, config: Config, envelope: dict[str, Any], target: dict[str, Any]
    ) -> list[str]:
        """Where the logged input holds fields marked x-secret: in the payload of the
        message's kind and, for a delegation, in the child's input (its agent's schema)."""
        documents = config.schemas.documents
        if envelope["type"] == "tool":
            # A tool call's arguments are the input of the agent (MCP servers: not marked).
            spec = config.registry.agents.get(_target_name(target))
            if spec is None or spec.protocol == "mcp":
                return []
            return list(self._secrets.of(documents, spec.input_schema, "/message/arguments"))
        found = list(
            self._secrets.of(documents, KINDS_DIR + envelope["kind"] + ".json", "/message/payload")
        )
        if envelope["type"] == "delegate" and target["type"] == "agent":
            spec = config.registry.agents.get(_target_name(target))
            if spec is not None:
                found += self._secrets.of(documents, spec.input_schema, "/message/payload/input")
        return found

    async def _deliver_all(self, recipients: list[Instance], body: dict[str, Any]) -> int:
        """Post to every recipient at once; return how many answered 2xx in time."""
        if not recipients:
            return 0
        results = await asyncio.gather(
            *(self._deliver(inst, body) for inst in recipients), return_exceptions=True
        )
        return sum(1 for r in results if r is True)

    async def _deliver(self, inst: Instance, body: dict[str, Any]) -> bool:
        if inst.handle is None:
            return False
        try:
            await self.wire.post(
                inst.handle, MESSAGE_ENDPOINT, body, self.options.delivery_timeout_s
            )
        except GatewayError as e:
            log.warning(
                "delivery failed",
                extra={"to": inst.agent, "instance_id": inst.instance_id, "error": e.message},
            )
            return False
        return True


def _delivery(sender: Sender, envelope: dict[str, Any]) -> dict[str, Any]:
    """The body an agent's ``POST /message`` receives."""
    inst = sender.instance
    body: dict[str, Any] = {
        "message_id": uuid4_str(),
        "type": envelope["type"],
        "kind": envelope["kind"],
        "payload": envelope["payload"],
        "from": {
            "spiffe_id": sender.spiffe_id,
            "agent": sender.identity.agent,
            "task_id": inst.task_id if inst else None,
        },
    }
    for key in ("topic", "correlation_id"):
        if key in envelope:
            body[key] = envelope[key]
    if "task_id" in envelope:
        body["about_task"] = envelope["task_id"]
    return body


def tool_message(to: str, tool: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """``input.message`` for an agent's call of ``tool`` (no ``arguments``: a listing)."""
    message: dict[str, Any] = {"type": "tool", "to": to, "kind": TOOL_KIND, "tool": tool}
    if arguments is not None:
        message["arguments"] = arguments
    return message


def _instance_id(sender: Sender) -> str | None:
    return sender.instance.instance_id if sender.instance else None


def _instance_json(inst: Instance) -> dict[str, Any]:
    """A running instance as the policy sees it in ``input.target.instances``."""
    return {
        "instance_id": inst.instance_id,
        "agent": inst.agent,
        "task_id": inst.task_id,
        "owner": inst.subject.id,
        "lineage": [e.to_json() for e in inst.lineage],
    }


def _target_name(target: dict[str, Any]) -> str:
    return str(target["agent"]["name"] if target["type"] == "agent" else target["topic"])


def _lineage(inst: Instance) -> list[dict[str, str]]:
    return [e.to_json() for e in inst.child_lineage()]
