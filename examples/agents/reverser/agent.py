"""reverser: an A2A agent written with the official ``a2a-sdk`` alone (not the gateway SDK).

Deterministic: it reverses the order of the words of a text and counts them. Its server is
the SDK's own (``DefaultRequestHandler`` with the Starlette routes, served by uvicorn); the
hub reads its card at ``/.well-known/agent-card.json``, checks the name and skills against
``agents.yaml``, and sends each task as one A2A message (a data part ``{"text": ...}``).
It streams two status updates before its ``result`` artifact, which the hub passes on to
the task's event streams.
"""

import asyncio
import os

import uvicorn
from a2a.helpers import get_data_parts, new_data_part, new_task, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, TaskState
from starlette.applications import Starlette

NAME = "reverser"
PORT = int(os.environ.get("PORT", "8000"))
# How long each step pauses, so a stream shows the steps apart (a demo, not work).
STEP_S = float(os.environ.get("REVERSER_STEP_S", "0.05"))

CARD = AgentCard(
    name=NAME,
    description="Reverses the order of the words of a text and counts them.",
    version="1.0.0",
    supported_interfaces=[
        AgentInterface(
            url=f"http://localhost:{PORT}/", protocol_binding="JSONRPC", protocol_version="1.0"
        )
    ],
    capabilities=AgentCapabilities(streaming=True),
    default_input_modes=["application/json", "text/plain"],
    default_output_modes=["application/json"],
    skills=[
        AgentSkill(
            id="text.reverse",
            name="Reverse words",
            description="The words of 'text' in reverse order, and how many there are.",
            tags=["text"],
        )
    ],
)


def reverse(text):
    """The deterministic work: the words in reverse order, and their count."""
    words = text.split()
    return {"reversed": " ".join(reversed(words)), "words": len(words), "agent": NAME}


class Reverser(AgentExecutor):
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
        text = data[0].get("text", "") if data and isinstance(data[0], dict) else None
        if text is None:
            text = context.get_user_input(" ")
        if not isinstance(text, str):
            await updater.failed(new_text_message("'text' must be a string"))
            return
        await updater.start_work(new_text_message(f"counting {len(text)} characters"))
        await asyncio.sleep(STEP_S)
        result = reverse(text)
        await updater.update_status(
            TaskState.TASK_STATE_WORKING, new_text_message(f"reversing {result['words']} words")
        )
        await asyncio.sleep(STEP_S)
        await updater.add_artifact([new_data_part(result)], name="result", last_chunk=True)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.cancel()


def app():
    handler = DefaultRequestHandler(
        agent_executor=Reverser(), task_store=InMemoryTaskStore(), agent_card=CARD
    )
    routes = create_agent_card_routes(CARD) + create_jsonrpc_routes(handler, "/")
    return Starlette(routes=routes)


if __name__ == "__main__":
    uvicorn.run(app(), host="0.0.0.0", port=PORT, log_level="warning")
