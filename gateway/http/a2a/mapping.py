"""Between A2A and the hub: a message becomes a task input; a task becomes an A2A Task.

Input: the message's first data part is the input (integral numbers as integers: a data
part is a protobuf Value, whose numbers are all doubles). Without one, its text parts (joined) are
the input when they hold a JSON document, and ``{"text": "<the text>"}`` otherwise (so an
agent whose input schema has a ``text`` field takes plain text). Files are refused.

States: ``pending``/``dispatched`` are A2A ``submitted``, ``running`` is ``working``,
``succeeded`` is ``completed`` (the output is the ``result`` artifact, one data part),
``failed`` and ``timed_out`` are ``failed`` and ``cancelled`` is ``canceled``; the error is
the status message (a text part and a data part with code, message and details). A dispatch
the policy denies is ``rejected``: its status message carries the decision id and reasons.
"""

from __future__ import annotations

import json
from typing import Any

from a2a.types import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import InvalidParamsError
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.store import Task as StoredTask

STATES = {
    "pending": TaskState.TASK_STATE_SUBMITTED,
    "dispatched": TaskState.TASK_STATE_SUBMITTED,
    "running": TaskState.TASK_STATE_WORKING,
    "succeeded": TaskState.TASK_STATE_COMPLETED,
    "failed": TaskState.TASK_STATE_FAILED,
    "timed_out": TaskState.TASK_STATE_FAILED,
    "cancelled": TaskState.TASK_STATE_CANCELED,
}
# ListTasks' status filter, as the hub's state (the one each A2A state mostly is).
STATE_FILTER = {
    TaskState.TASK_STATE_SUBMITTED: "pending",
    TaskState.TASK_STATE_WORKING: "running",
    TaskState.TASK_STATE_COMPLETED: "succeeded",
    TaskState.TASK_STATE_FAILED: "failed",
    TaskState.TASK_STATE_CANCELED: "cancelled",
}
CONTEXT_LABEL = "a2a.context_id"
MESSAGE_LABEL = "a2a.message_id"


def message_input(message: Message) -> tuple[Any, str]:
    """The task input in ``message`` and the JSON pointer (in the request) it came from."""
    if not message.parts:
        raise InvalidParamsError(
            "the message has no parts",
            data={"errors": [_violation("/params/message/parts", "no parts")]},
        )
    texts: list[str] = []
    for i, part in enumerate(message.parts):
        kind = part.WhichOneof("content")
        if kind == "data":
            return _integral(MessageToDict(part.data)), f"/params/message/parts/{i}/data"
        if kind == "text":
            texts.append(part.text)
        else:
            raise InvalidParamsError(
                f"part {i} is a {kind} part; this hub takes data and text parts",
                data={"errors": [_violation(f"/params/message/parts/{i}", f"a {kind} part")]},
            )
    text = "".join(texts)
    try:
        return json.loads(text), "/params/message/parts/0/text"
    except ValueError:
        return {"text": text}, "/params/message/parts/0/text"


def _integral(value: Any) -> Any:
    """``value`` with integral numbers as ints: a data part is a protobuf Value, where every
    number is a double, and ``3.0`` is not what the client sent (nor what agents expect)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _violation(pointer: str, message: str) -> dict[str, str]:
    # "field" and "message" are what the SDK turns into google.rpc.BadRequest violations.
    return {"field": pointer, "message": message, "pointer": pointer}


def pointer_errors(details: Any, source: str) -> list[dict[str, Any]]:
    """Schema violations of the envelope's ``/input...`` as pointers into the request."""
    out = []
    for err in details if isinstance(details, list) else []:
        pointer = str(err.get("pointer", ""))
        inner = pointer[len("/input") :] if pointer.startswith("/input") else pointer
        where = source + inner
        out.append(
            {
                **err,
                "field": where,
                "message": str(err.get("message", "")),
                "pointer": where,
                "task_pointer": pointer,
            }
        )
    return out


def _timestamp(iso: str | None) -> Timestamp | None:
    if not iso:
        return None
    ts = Timestamp()
    try:
        ts.FromJsonString(iso.replace("+00:00", "Z"))
    except ValueError:
        return None
    return ts


def _data_part(value: Any) -> Part:
    v = Value()
    ParseDict(value, v)
    return Part(data=v, media_type="application/json")


def error_message(task_id: str, context_id: str, error: dict[str, Any]) -> Message:
    """An agent-role message stating ``error`` (text for people, data for programs)."""
    return Message(
        message_id=f"{task_id}-status",
        task_id=task_id,
        context_id=context_id,
        role=Role.ROLE_AGENT,
        parts=[Part(text=str(error.get("message") or error.get("code"))), _data_part(error)],
    )


def context_of(task: StoredTask) -> str:
    """The A2A context id of a stored task (the task id when the client set none)."""
    return (task.labels or {}).get(CONTEXT_LABEL) or task.id


def a2a_task(task: StoredTask, *, include_artifacts: bool = True) -> Task:
    """A stored task as an A2A Task."""
    context_id = context_of(task)
    status = TaskStatus(state=STATES.get(task.state, TaskState.TASK_STATE_UNSPECIFIED))
    ts = _timestamp(task.updated_at)
    if ts is not None:
        status.timestamp.CopyFrom(ts)
    if task.error is not None:
        status.message.CopyFrom(error_message(task.id, context_id, task.error))
    metadata = Struct()
    metadata.update(
        {
            "agent": task.agent,
            "state": task.state,
            "decision_id": task.decision_id,
            "created_at": task.created_at,
        }
    )
    out = Task(id=task.id, context_id=context_id, status=status, metadata=metadata)
    if include_artifacts and task.state == "succeeded":
        out.artifacts.append(result_artifact(task))
    return out


def result_artifact(task: StoredTask) -> Artifact:
    """The output of a succeeded task as the ``result`` artifact."""
    return Artifact(artifact_id=f"{task.id}-result", name="result", parts=[_data_part(task.result)])


def rejected_task(
    task_id: str, context_id: str, decision_id: str | None, reasons: list[str], agent: str
) -> Task:
    """The answer to a dispatch the policy denied: a ``rejected`` task (never stored)."""
    error = {
        "code": "policy_denied",
        "message": "policy denied the task: " + "; ".join(reasons),
        "decision_id": decision_id,
        "reasons": reasons,
        "agent": agent,
    }
    metadata = Struct()
    metadata.update({"agent": agent, "decision_id": decision_id, "stored": False})
    return Task(
        id=task_id,
        context_id=context_id,
        status=TaskStatus(
            state=TaskState.TASK_STATE_REJECTED,
            message=error_message(task_id, context_id, error),
        ),
        metadata=metadata,
    )
