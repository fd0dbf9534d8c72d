"""relay: an A2A agent on ``a2a-sdk`` alone that delegates part of its work through the hub.

It counts the characters of a text itself and has the ``reverser`` agent reverse its words.
That call goes to the hub, never to the other container (the network lets it reach only the
hub): ``GATEWAY_URL/a2a/reverser`` with the SDK's client, authenticated with this
container's JWT-SVID (``AGENT_SVID``). The hub treats it as a delegation: the message policy
decides it with this task's lineage, and the child task runs for the user who started this
one. The W3C ``traceparent`` the hub sent with this task goes along, so both hops share
one trace.
"""

import os

import httpx
import uvicorn
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.helpers import get_data_parts, new_data_part, new_message, new_task, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Role,
    SendMessageRequest,
    TaskState,
)
from starlette.applications import Starlette

NAME = "relay"
TARGET = os.environ.get("RELAY_TARGET", "reverser")
PORT = int(os.environ.get("PORT", "8000"))

CARD = AgentCard(
    name=NAME,
    description="Counts the characters of a text and has another agent reverse its words.",
    version="1.0.0",
    supported_interfaces=[
        AgentInterface(
            url=f"http://localhost:{PORT}/", protocol_binding="JSONRPC", protocol_version="1.0"
        )
    ],
    capabilities=AgentCapabilities(streaming=True),
    default_input_modes=["application/json"],
    default_output_modes=["application/json"],
    skills=[
        AgentSkill(
            id="text.relay",
            name="Relay",
            description="Characters of 'text', and its words reversed by another agent.",
            tags=["text"],
        )
    ],
)


async def delegate(text, traceparent):
    """Send ``text`` to the target agent through the hub; its task (a child of ours)."""
    headers = {"Authorization": f"Bearer {os.environ['AGENT_SVID']}"}
    base = f"{os.environ['GATEWAY_URL']}/a2a/{TARGET}"
    async with httpx.AsyncClient(headers=headers, timeout=60, trust_env=False) as http:
        card = await A2ACardResolver(http, base).get_agent_card()
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
        message = new_message([new_data_part({"text": text})], role=Role.ROLE_USER)
        call = ClientCallContext(
            service_parameters={"traceparent": traceparent} if traceparent else None
        )
        async for event in client.send_message(SendMessageRequest(message=message), context=call):
            if event.HasField("task"):
                return event.task
    raise RuntimeError(f"{TARGET} answered with no task")


class Relay(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task or new_task(
            context.task_id,
            context.context_id,
            TaskState.TASK_STATE_SUBMITTED,
            history=[context.message],
        )
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        data = get_data_parts(context.message.parts)
        text = data[0].get("text") if data and isinstance(data[0], dict) else None
        if not isinstance(text, str):
            await updater.failed(new_text_message("'text' must be a string"))
            return
        await updater.start_work(new_text_message(f"asking {TARGET} through the hub"))
        headers = context.call_context.state.get("headers", {}) if context.call_context else {}
        child = await delegate(text, headers.get("traceparent"))
        if child.status.state != TaskState.TASK_STATE_COMPLETED:
            reason = " ".join(p.text for p in child.status.message.parts if p.text)
            await updater.failed(
                new_text_message(
                    f"{TARGET} task {child.id} ended {TaskState.Name(child.status.state)}: {reason}"
                )
            )
            return
        [part] = get_data_parts(child.artifacts[0].parts)
        result = {
            "characters": len(text),
            "reversed": part["reversed"],
            "words": int(part["words"]),
            "delegated_task": child.id,
            "agent": NAME,
        }
        await updater.add_artifact([new_data_part(result)], name="result", last_chunk=True)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def app():
    handler = DefaultRequestHandler(
        agent_executor=Relay(), task_store=InMemoryTaskStore(), agent_card=CARD
    )
    return Starlette(routes=create_agent_card_routes(CARD) + create_jsonrpc_routes(handler, "/"))


if __name__ == "__main__":
    uvicorn.run(app(), host="0.0.0.0", port=PORT, log_level="warning")
