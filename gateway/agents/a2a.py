"""The hub as an A2A client of one A2A server in a container (``protocol: a2a``).

The hand-off of a task to such an agent, with the SDK's client (``a2a.client``):

1. read the agent's card from inside its container (``GET /.well-known/agent-card.json`` on
   the container's address; until it answers, the container is not ready: an A2A server
   has no ``/health``);
2. check the card against the registry entry: the same name, and a skill (by id or tag) for
   each of the entry's capabilities. A mismatch fails the task (``CardMismatch``): what runs
   is not what the registry and the policy were told;
3. send the task's input as one A2A message (a data part), streaming when the card says the
   agent streams; each status message and artifact chunk the agent sends is handed to
   ``progress`` on the way (the task's event streams); the ``result`` artifact (else the
   last one) is the output: its data part, or ``{"text": ...}`` for text.

The card's own interface URL is never followed, only its path, joined to the container's
address: a card cannot point the hub anywhere else. The W3C ``traceparent`` goes with the
message as a header. Every failure leaves as the gateway's own error (AgentTimeout,
AgentUnavailable, AgentError), so the task router treats it like any other agent's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from a2a.client import (
    A2AClientError,
    A2AClientTimeoutError,
    AgentCardResolutionError,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
)
from a2a.client.card_resolver import A2ACardResolver
from a2a.types import (
    AgentCard,
    Artifact,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Value

from gateway.bundle.registry import AgentSpec
from gateway.containers.backend import ContainerHandle
from gateway.errors import AgentError, AgentTimeout, AgentUnavailable
from gateway.logs import get_logger

log = get_logger(__name__)
Progress = Callable[[dict[str, Any]], None]
ENDED = {
    TaskState.TASK_STATE_COMPLETED,
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_CANCELED,
    TaskState.TASK_STATE_REJECTED,
}
# States in which an agent waits for the caller: a hub task cannot answer, so they fail.
WAITING = {TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED}


class CardMismatch(AgentError):
    """The card the agent serves does not match its registry entry (the task fails)."""


def card_problems(card: AgentCard, agent: AgentSpec) -> list[str]:
    """What in ``card`` contradicts the registry entry ``agent`` (empty: it matches)."""
    problems = []
    if card.name != agent.name:
        problems.append(f"the card names agent {card.name!r}, the registry entry {agent.name!r}")
    offered = {s.id for s in card.skills} | {t for s in card.skills for t in s.tags}
    missing = [c for c in agent.capabilities if c not in offered]
    if missing:
        problems.append(
            f"no skill of the card covers capabilities {missing} (skills: "
            f"{sorted(s.id for s in card.skills)})"
        )
    if not any(i.protocol_binding.upper() == "JSONRPC" for i in card.supported_interfaces):
        problems.append("the card has no JSONRPC interface")
    return problems


def output_of(artifacts: list[Artifact]) -> Any:
    """The task output in the agent's artifacts: the ``result`` one (else the last), its
    first data part, else its text as ``{"text": ...}``; None without artifacts."""
    if not artifacts:
        return None
    chosen = next((a for a in artifacts if a.name == "result"), artifacts[-1])
    texts = []
    for part in chosen.parts:
        kind = part.WhichOneof("content")
        if kind == "data":
            return _integral(MessageToDict(part.data))
        if kind == "text":
            texts.append(part.text)
    return {"text": "".join(texts)}


def _integral(value: Any) -> Any:
    # A data part is a protobuf Value, where every number is a double.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _text(message: Message) -> str:
    return "".join(p.text for p in message.parts if p.WhichOneof("content") == "text")


class A2AAgents:
    """One pooled httpx client for every A2A agent container."""

    def __init__(self, *, probe_interval_s: float = 0.05) -> None:
        self._http: httpx.AsyncClient | None = None
        self.probe_interval_s = probe_interval_s

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=2.0),
                limits=httpx.Limits(max_connections=256),
                trust_env=False,  # the container's address, never through a proxy
            )
        return self._http

    async def close(self) -> None:
        """Close idle connections."""
        if self._http is not None:
            await self._http.aclose()

    async def ready_card(
        self, handle: ContainerHandle, agent: AgentSpec, timeout_s: float
    ) -> AgentCard:
        """Poll the agent's card until it answers (its readiness), then check it against the
        registry entry; CardMismatch when it does not match, AgentUnavailable when absent."""
        deadline = time.monotonic() + timeout_s
        resolver = A2ACardResolver(self.http, handle.base_url, AGENT_CARD_WELL_KNOWN_PATH)
        last = "no answer"
        while True:
            try:
                card = await resolver.get_agent_card(http_kwargs={"timeout": 1.0})
                break
            except AgentCardResolutionError as e:
                last = str(e)[:300]
                status = e.status_code
                unreachable = isinstance(e.__cause__, httpx.RequestError)
                if not unreachable and (status is None or 400 <= status < 500):
                    # It answered, with something that is not a card: waiting will not help.
                    raise CardMismatch(
                        f"agent {agent.name} serves no valid agent card: {last}"
                    ) from e
            except (httpx.HTTPError, A2AClientError) as e:
                last = type(e).__name__
            if time.monotonic() >= deadline:
                raise AgentUnavailable(
                    f"agent {handle.name} served no agent card within {timeout_s:.1f} s ({last})"
                )
            await asyncio.sleep(self.probe_interval_s)
        problems = card_problems(card, agent)
        if problems:
            log.warning(
                "agent card does not match the registry",
                extra={"agent": agent.name, "problems": problems, "container": handle.name},
            )
            raise CardMismatch(
                f"agent card of {agent.name} does not match its registry entry: "
                + "; ".join(problems),
                details={"problems": problems, "card_name": card.name},
            )
        return card

    async def run(
        self,
        handle: ContainerHandle,
        card: AgentCard,
        *,
        task_id: str,
        task_input: Any,
        timeout_s: float,
        traceparent: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Send the task as one A2A message and follow it to its end: ``{"output": ...}``,
        or AgentError (failed, canceled, rejected, waiting for input), AgentTimeout."""
        bound_card = AgentCard()
        bound_card.CopyFrom(card)
        # Only the path of each interface: the address is the container's, not the card's.
        for interface in bound_card.supported_interfaces:
            path = urlsplit(interface.url).path or "/"
            interface.url = handle.base_url.rstrip("/") + path
        streaming = bound_card.capabilities.streaming
        client = ClientFactory(
            ClientConfig(httpx_client=self.http, streaming=streaming, polling=False)
        ).create(bound_card)
        value = Value()
        ParseDict(task_input, value)
        request = SendMessageRequest(
            message=Message(
                message_id=f"{task_id}-input",
                context_id=task_id,
                role=Role.ROLE_USER,
                parts=[Part(data=value, media_type="application/json")],
            ),
            configuration=SendMessageConfiguration(return_immediately=False),
        )
        context = ClientCallContext(
            timeout=timeout_s,
            service_parameters={"traceparent": traceparent} if traceparent else None,
        )
        artifacts: dict[str, Artifact] = {}
        state = TaskState.TASK_STATE_UNSPECIFIED
        status_text = ""
        try:
            async with asyncio.timeout(timeout_s):
                async for event in client.send_message(request, context=context):
                    state, status_text = self._take(event, artifacts, state, status_text, progress)
                    if state in ENDED or state in WAITING:
                        break
        except TimeoutError as e:
            raise AgentTimeout(f"agent {handle.name} did not end within {timeout_s:.1f} s") from e
        except A2AClientTimeoutError as e:
            raise AgentTimeout(f"agent {handle.name} did not end within {timeout_s:.1f} s") from e
        except (A2AClientError, httpx.HTTPError) as e:
            raise AgentUnavailable(f"agent {handle.name} unreachable over A2A: {e}") from e
        if state != TaskState.TASK_STATE_COMPLETED:
            name = TaskState.Name(state).removeprefix("TASK_STATE_").lower()
            raise AgentError(
                f"A2A agent ended the task {name}" + (f": {status_text}" if status_text else ""),
                details={"a2a_state": name, "message": status_text},
            )
        output = output_of(list(artifacts.values()))
        if output is None:
            output = {"text": status_text} if status_text else None
        return {"output": output} if output is not None else {}

    @staticmethod
    def _take(
        event: StreamResponse,
        artifacts: dict[str, Artifact],
        state: TaskState.ValueType,
        status_text: str,
        progress: Progress | None,
    ) -> tuple[TaskState.ValueType, str]:
        """Fold one event into (state, status text) and the artifacts; report progress."""
        kind = event.WhichOneof("payload")
        if kind == "task":
            for artifact in event.task.artifacts:
                artifacts[artifact.artifact_id] = artifact
            return event.task.status.state, _text(event.task.status.message) or status_text
        if kind == "message":
            # A direct answer (no task): its parts are the result.
            artifacts["message"] = Artifact(artifact_id="message", parts=event.message.parts)
            return TaskState.TASK_STATE_COMPLETED, _text(event.message)
        if kind == "status_update":
            status = event.status_update.status
            text = _text(status.message)
            if text and progress is not None and status.state not in ENDED:
                progress({"message": text[:1000], "source": "a2a"})
            return status.state, text or status_text
        if kind == "artifact_update":
            update = event.artifact_update
            known = artifacts.get(update.artifact.artifact_id)
            if known is not None and update.append:
                known.parts.extend(update.artifact.parts)
            else:
                artifacts[update.artifact.artifact_id] = update.artifact
            if progress is not None:
                name = update.artifact.name or update.artifact.artifact_id
                progress({"message": f"artifact {name}", "artifact": name, "source": "a2a"})
        return state, status_text


def new_message_id() -> str:
    """An A2A message id."""
    return str(uuid.uuid4())
