"""What the API shows of tasks and routed messages: records in, JSON bodies out.

The core returns records (``Task``, ``Replied``, ``Delivered``, ``Delegated``); these
functions give each its one JSON shape, and the routes pick the status code.
"""

from __future__ import annotations

from typing import Any

from gateway.routers.messages import Delegated, Delivered, Replied
from gateway.store import Task


def task_view(task: Task) -> dict[str, Any]:
    """A stored task as the API shows it (with its history when it was read with it)."""
    view: dict[str, Any] = {
        "task_id": task.id,
        "state": task.state,
        "agent": task.agent,
        "capability": task.capability,
        "subject": task.subject,
        "decision_id": task.decision_id,
        "timeout_s": task.timeout_s,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "container": (
            {"id": task.container_id, "name": task.container_name} if task.container_id else None
        ),
        "labels": task.labels,
    }
    if task.sandbox is not None:
        view["sandbox"] = task.sandbox
    if task.dispatch is not None:
        view["dispatch"] = task.dispatch  # "warm" (pooled container) or "cold"
    if task.result is not None:
        view["result"] = task.result
    if task.error is not None:
        view["error"] = task.error
    if task.history is not None:
        view["history"] = [e.to_json() for e in task.history]
    return view


def child_view(task: Task) -> dict[str, Any]:
    """What an agent sees of a task it delegated (or of its own)."""
    view: dict[str, Any] = {
        "task_id": task.id,
        "state": task.state,
        "agent": task.agent,
        "parent_id": task.parent_id,
        "decision_id": task.decision_id,
    }
    if task.result is not None:
        view["result"] = task.result
    if task.error is not None:
        view["error"] = task.error
    return view


def delegated_view(out: Delegated) -> dict[str, Any]:
    """A delegation: the child task, and the decision that let the message through."""
    return {**child_view(out.task), "message_decision_id": out.decision_id}


def replied_view(out: Replied) -> dict[str, Any]:
    """A request: the target's reply and which instance gave it."""
    view: dict[str, Any] = {
        "reply": out.reply,
        "from": {"agent": out.agent, "spiffe_id": out.spiffe_id},
        "message_id": out.message_id,
        "decision_id": out.decision_id,
    }
    if out.correlation_id is not None:
        view["correlation_id"] = out.correlation_id
    return view


def delivered_view(out: Delivered) -> dict[str, Any]:
    """An event (its one decision) or a broadcast (a decision per agent, and who was refused)."""
    if out.kind == "event":
        return {
            "delivered": out.delivered,
            "recipients": out.recipients,
            "decision_id": out.decision_ids[0],
        }
    return {
        "delivered": out.delivered,
        "recipients": out.recipients,
        "refused": list(out.refused),
        "decision_ids": list(out.decision_ids),
    }
