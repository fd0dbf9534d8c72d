"""The core of the hub, with no HTTP: what happens to a task and to a message.

Parts:

- ``tasks``: ``TaskRouter``: submit (schemas, policy, decision log, store), run the task's
  container, hand it over, record the result, cancel;
- ``messages``: ``MessageRouter``: request, event, broadcast and delegate between agent
  instances, each decided by policy and logged;
- ``recovery``: reconcile unfinished tasks with the containers that still exist after a
  restart (``recover``).
"""

from gateway.routers.messages import MessageRouter, Sender
from gateway.routers.recovery import RecoveryReport, recover
from gateway.routers.tasks import RouterOptions, TaskRouter

__all__ = [
    "MessageRouter",
    "RecoveryReport",
    "RouterOptions",
    "Sender",
    "TaskRouter",
    "recover",
]
