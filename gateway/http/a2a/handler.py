"""The governed A2A request handler: the SDK's ``RequestHandler`` over the hub's task path.

Every method is an API call decided by ``policies/api.rego`` (``input.request.protocol`` is
``a2a``, ``params.method`` the A2A 1.0 method, also for a 0.3 client), after the caller's rate
limits. ``SendMessage`` submits a task exactly as ``POST /v1/tasks`` does (envelope and input
schemas, dispatch policy, decision log, container); the A2A message id is its
Idempotency-Key, so a retried message is the same task. The SDK's ``RequestHandler03`` wraps
this handler for 0.3 clients (type conversion only). The door (``jsonrpc``) maps the hub's
errors onto A2A's.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import (
    ExtendedAgentCardNotConfiguredError,
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from gateway.errors import (
    Forbidden,
    IdempotencyConflict,
    PolicyDenied,
    SchemaViolation,
    UnknownTask,
)
from gateway.http.a2a.mapping import (
    CONTEXT_LABEL,
    MESSAGE_LABEL,
    STATE_FILTER,
    STATES,
    a2a_task,
    context_of,
    message_input,
    pointer_errors,
    rejected_task,
    result_artifact,
)
from gateway.http.a2a.push import PushNotifier, push_target
from gateway.hub import Hub
from gateway.identity.apikeys import Subject
from gateway.logs import get_logger
from gateway.routers.access import Access, ApiCall, task_resource
from gateway.routers.events import PROGRESS, Subscription
from gateway.routers.messages import Delegated, Sender
from gateway.store import Task as StoredTask

log = get_logger(__name__)
ROUTE = "/a2a/{agent}"
# What an agent calling with its SVID may do: delegate, and follow or cancel what it delegated.
AGENT_METHODS = ("SendMessage", "SendStreamingMessage", "GetTask", "SubscribeToTask", "CancelTask")
Event = Task | Message | TaskStatusUpdateEvent | TaskArtifactUpdateEvent
# A stream with no event for this long re-reads the task (the hub may have restarted).
STREAM_RECHECK_S = 5.0


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls which agent, as the door found it (kept in the call context's state)."""

    subject: Subject | None
    agent: str
    remote_addr: str | None
    version: str
    wire_method: str
    traceparent: str
    # An agent in a container calling with its JWT-SVID: its calls are delegations.
    sender: Sender | None = None


def caller_of(context: ServerCallContext) -> Caller:
    caller = context.state.get("caller")
    assert isinstance(caller, Caller)
    return caller


class GovernedHandler(RequestHandler):
    """A2A methods as governed hub calls for the agent named in the request path."""

    def __init__(self, hub: Hub, push: PushNotifier) -> None:
        self.hub = hub
        self.push = push

    # -- authorization

    async def _authorize(
        self,
        context: ServerCallContext,
        method: str,
        resource: dict[str, Any] | None = None,
        **params: Any,
    ) -> tuple[Caller, Access]:
        caller = caller_of(context)
        if caller.sender is not None:
            return caller, self._agent_call(caller, method)
        # Limits before the policy, as for every call of the hub.
        self.hub.limiter.api_call(caller.subject, caller.remote_addr)
        call = ApiCall(
            method="POST",
            route=ROUTE,
            params={
                "agent": caller.agent,
                "method": method,
                "wire_method": caller.wire_method,
                "version": caller.version,
                **params,
            },
            protocol="a2a",
            remote_addr=caller.remote_addr,
        )
        access = await self.hub.access.authorize(caller.subject, call, resource)
        return caller, access

    def _agent_call(self, caller: Caller, method: str) -> Access:
        """An agent's call: counted like its messages; a send is a delegation (decided by
        the message policy), the rest only on the tasks it delegated (``_task``)."""
        sender = caller.sender
        assert sender is not None
        self.hub.limiter.message(
            sender.identity.instance_id or sender.spiffe_id, sender.identity.agent
        )
        if method not in AGENT_METHODS:
            raise Forbidden(
                f"an agent may call {', '.join(AGENT_METHODS)} through the hub, not {method}",
                details={"method": method},
            )
        return Access(decision_id=None, scope="own")

    def _subject(self, caller: Caller) -> Subject:
        if caller.subject is None:  # only a policy that lets anonymous callers in gets here
            from gateway.errors import Unauthorized

            raise Unauthorized("missing API key (send 'Authorization: Bearer <key>')")
        return caller.subject

    async def _task(self, context: ServerCallContext, method: str, task_id: str) -> StoredTask:
        """The task ``task_id`` of this agent, once the policy lets the caller touch it."""
        caller = caller_of(context)
        if not task_id:
            raise InvalidParamsError(
                "a task id is required",
                data={"errors": [{"field": "id", "message": "required", "pointer": "/params/id"}]},
            )
        try:
            task = await self.hub.router.get(task_id)
        except UnknownTask:
            raise TaskNotFoundError(f"no task {task_id!r}") from None
        try:
            await self._authorize(context, method, task_resource(task))
        except UnknownTask:
            raise TaskNotFoundError(f"no task {task_id!r}") from None
        sender = caller.sender
        if sender is not None and (
            sender.instance is None or task.parent_id != sender.instance.task_id
        ):
            # An agent sees the tasks it delegated, nothing else (the same answer as absent).
            raise TaskNotFoundError(f"no task {task_id!r}")
        if task.agent != caller.agent:
            raise TaskNotFoundError(f"no task {task_id!r} of agent {caller.agent!r}")
        return task

    # -- sending

    async def _submit(
        self, params: SendMessageRequest, context: ServerCallContext, method: str
    ) -> StoredTask | Task:
        """Submit the message as a task; the stored task, or a ``rejected`` Task."""
        message = params.message
        push_url = params.configuration.task_push_notification_config.url
        if push_url and caller_of(context).sender is not None:
            raise Forbidden("an agent's call through the hub sets no push notifications")
        push = await push_target(push_url) if push_url else None
        extra = {"push": push} if push is not None else {}
        agent = caller_of(context).agent
        caller, _ = await self._authorize(
            context, method, {"kind": "agent", "name": agent}, **extra
        )
        if message.task_id:
            raise UnsupportedOperationError(
                "each message starts a task here; a task takes no further messages"
            )
        task_input, source = message_input(message)
        metadata = {**MessageToDict(params.metadata), **MessageToDict(message.metadata)}
        context_id = message.context_id or str(uuid.uuid4())
        envelope: dict[str, Any] = {
            "agent": caller.agent,
            "input": task_input,
            "labels": {CONTEXT_LABEL: context_id, MESSAGE_LABEL: message.message_id},
        }
        if "timeout_s" in metadata:
            envelope["timeout_s"] = metadata["timeout_s"]
        request = {
            "method": "POST",
            "path": f"/a2a/{caller.agent}",
            "protocol": "a2a",
            "rpc_method": method,
            "version": caller.version,
            "remote_addr": caller.remote_addr,
            "time": dt.datetime.now(dt.UTC).isoformat(),
            "traceparent": caller.traceparent,
        }
        key = f"a2a:{message.message_id}" if message.message_id else None
        if key is not None and len(key) > 255:
            raise InvalidParamsError("messageId is longer than 251 characters")
        try:
            if caller.sender is not None:
                task, created = await self._delegate(caller, caller.sender, envelope, request, key)
            else:
                subject = self._subject(caller)
                with self.hub.limiter.submission(subject, caller.remote_addr):
                    task, created = await self.hub.router.submit(
                        subject, envelope, request=request, idempotency_key=key
                    )
        except SchemaViolation as e:
            errors = pointer_errors(e.details, source)
            raise InvalidParamsError(
                e.message,
                data={"code": e.code, "errors": errors},
            ) from None
        except IdempotencyConflict as e:
            raise InvalidParamsError(
                f"messageId {message.message_id!r} was used for another message: {e.message}"
            ) from None
        except PolicyDenied as e:
            details = e.details if isinstance(e.details, dict) else {}
            return rejected_task(
                str(uuid.uuid4()),
                context_id,
                e.decision_id,
                list(details.get("reasons", [])),
                caller.agent,
            )
        if created and push_url:
            self.push.add(task.id, params.configuration.task_push_notification_config)
        return task

    async def _delegate(
        self,
        caller: Caller,
        sender: Sender,
        envelope: dict[str, Any],
        request: dict[str, Any],
        key: str | None,
    ) -> tuple[StoredTask, bool]:
        """An agent's message to another agent, as the delegation it is: decided by the
        message policy with the sender's lineage, the child run for the parent's owner."""
        payload: dict[str, Any] = {"input": envelope["input"]}
        if "timeout_s" in envelope:
            payload["timeout_s"] = envelope["timeout_s"]
        message = {
            "type": "delegate",
            "to": caller.agent,
            "kind": "task.delegate",
            "payload": payload,
        }
        try:
            routed = await self.hub.messages.send(
                sender, message, request=request, idempotency_key=key
            )
        except SchemaViolation as e:
            # The message's pointers (/payload/input...) as the task's (/input...).
            details = [
                {**d, "pointer": str(d.get("pointer", "")).removeprefix("/payload")}
                for d in (e.details if isinstance(e.details, list) else [])
                if isinstance(d, dict)
            ]
            raise SchemaViolation(e.message, details=details) from None
        assert isinstance(routed, Delegated)
        log.info(
            "a2a delegation",
            extra={"child_task_id": routed.task.id, "message_decision_id": routed.decision_id},
        )
        return routed.task, True

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        """SendMessage: a new task; blocking unless ``returnImmediately`` (then ``submitted``)."""
        result = await self._submit(params, context, "SendMessage")
        if isinstance(result, Task):
            return result
        if not params.configuration.return_immediately:
            wait = min(result.timeout_s + 1, max(result.deadline - time.time() + 1, 0))
            with self.hub.limiter.long_poll(None):
                result = await self.hub.router.wait_for(result.id, wait)
        else:
            result = await self.hub.router.get(result.id)
        return _trim(a2a_task(result), params.configuration.history_length)

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        """SendStreamingMessage: the new task, its states and progress, its result."""
        result = await self._submit(params, context, "SendStreamingMessage")
        if isinstance(result, Task):
            yield result
            return
        async for event in self._follow(result):
            yield event

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        """SubscribeToTask: the task now, then what happens to it until it ends."""
        task = await self._task(context, "SubscribeToTask", params.id)
        async for event in self._follow(task):
            yield event

    async def _follow(self, task: StoredTask) -> AsyncGenerator[Event]:
        # Subscribed before the task is read: nothing between the two is missed.
        sub: Subscription = self.hub.events.subscribe(task.id, after=None)
        try:
            current = await self.hub.router.get(task.id)
            yield a2a_task(current, include_artifacts=False)
            last = current.state
            context_id = context_of(current)
            if current.terminal:
                if current.state == "succeeded":
                    yield TaskArtifactUpdateEvent(
                        task_id=task.id,
                        context_id=context_id,
                        artifact=result_artifact(current),
                        last_chunk=True,
                    )
                yield _status_event(a2a_task(current))
                return
            while True:
                event = await sub.next(STREAM_RECHECK_S)
                if event is None:
                    stored = await self.hub.router.get(task.id)
                    if not stored.terminal:
                        continue
                    final = True
                elif event.kind == PROGRESS:
                    yield _progress_event(task.id, context_id, event.data)
                    continue
                else:
                    final = event.final
                    if not final:
                        state = str(event.data.get("state"))
                        if STATES.get(state) != STATES.get(last):
                            yield TaskStatusUpdateEvent(
                                task_id=task.id,
                                context_id=context_id,
                                status=TaskStatus(state=STATES[state]),
                            )
                        last = state
                        continue
                    stored = await self.hub.router.get(task.id)
                if final:
                    if stored.state == "succeeded":
                        yield TaskArtifactUpdateEvent(
                            task_id=task.id,
                            context_id=context_id,
                            artifact=result_artifact(stored),
                            last_chunk=True,
                        )
                    yield _status_event(a2a_task(stored))
                    return
        finally:
            sub.close()

    # -- reading and cancelling

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        """GetTask: one task of this agent that the caller may see."""
        task = await self._task(context, "GetTask", params.id)
        return _trim(
            a2a_task(task), params.history_length if params.HasField("history_length") else None
        )

    async def on_list_tasks(
        self, params: ListTasksRequest, context: ServerCallContext
    ) -> ListTasksResponse:
        """ListTasks: this agent's tasks, the caller's own unless the policy grants all."""
        caller, access = await self._authorize(context, "ListTasks", {"kind": "tasks"})
        subject = self._subject(caller)
        size = params.page_size or 50
        if not 1 <= size <= 100:
            raise InvalidParamsError(
                "pageSize must be within [1, 100]",
                data={"errors": [{"field": "pageSize", "message": "1 to 100"}]},
            )
        before: int | None = None
        if params.page_token:
            if not (params.page_token.isascii() and params.page_token.isdigit()):
                raise InvalidParamsError(
                    "pageToken is not valid",
                    data={"errors": [{"field": "pageToken", "message": "not a page token"}]},
                )
            before = int(params.page_token[:18])
        state = STATE_FILTER.get(params.status) if params.status else None
        tasks, next_cursor = await self.hub.router.list(
            subject=None if access.sees_all else subject.id,
            state=state,
            agent=caller.agent,
            limit=size,
            before=before,
        )
        out = ListTasksResponse(
            tasks=[a2a_task(t, include_artifacts=params.include_artifacts) for t in tasks],
            next_page_token=str(next_cursor) if next_cursor is not None else "",
            page_size=size,
            total_size=len(tasks),
        )
        if params.context_id:
            kept = [t for t in out.tasks if t.context_id == params.context_id]
            del out.tasks[:]
            out.tasks.extend(kept)
        return out

    async def on_cancel_task(
        self, params: CancelTaskRequest, context: ServerCallContext
    ) -> Task | None:
        """CancelTask: stop an active task and its container; an ended one is not cancelable."""
        task = await self._task(context, "CancelTask", params.id)
        if task.terminal:
            raise TaskNotCancelableError(f"task {task.id} already ended ({task.state})")
        caller = caller_of(context)
        from gateway.errors import InvalidState

        try:
            by = caller.sender.spiffe_id if caller.sender else self._subject(caller).id
            task = await self.hub.router.cancel(task.id, by=by)
        except InvalidState as e:
            raise TaskNotCancelableError(e.message) from None
        return a2a_task(task)

    # -- push notifications

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        """CreateTaskPushNotificationConfig: a webhook for the task, if policy allows its URL."""
        if not params.url:
            raise InvalidParamsError(
                "url is required", data={"errors": [{"field": "url", "message": "required"}]}
            )
        try:
            task = await self.hub.router.get(params.task_id)
        except UnknownTask:
            raise TaskNotFoundError(f"no task {params.task_id!r}") from None
        caller = caller_of(context)
        try:
            await self._authorize(
                context,
                "CreateTaskPushNotificationConfig",
                task_resource(task),
                push=await push_target(params.url),
            )
        except UnknownTask:
            raise TaskNotFoundError(f"no task {params.task_id!r}") from None
        if task.agent != caller.agent:
            raise TaskNotFoundError(f"no task {params.task_id!r} of agent {caller.agent!r}")
        return self.push.add(task.id, params)

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        """GetTaskPushNotificationConfig."""
        task = await self._task(context, "GetTaskPushNotificationConfig", params.task_id)
        config = self.push.get(task.id, params.id)
        if config is None:
            raise TaskNotFoundError(f"no push notification config {params.id!r} on task {task.id}")
        return config

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        """ListTaskPushNotificationConfigs."""
        task = await self._task(context, "ListTaskPushNotificationConfigs", params.task_id)
        return ListTaskPushNotificationConfigsResponse(configs=self.push.list(task.id))

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        """DeleteTaskPushNotificationConfig."""
        task = await self._task(context, "DeleteTaskPushNotificationConfig", params.task_id)
        self.push.delete(task.id, params.id)

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        """No extended card: the public card says everything."""
        raise ExtendedAgentCardNotConfiguredError


def _trim(task: Task, history_length: int | None) -> Task:
    if history_length is not None and history_length >= 0:
        del task.history[: max(0, len(task.history) - history_length)]
    return task


def _status_event(task: Task) -> TaskStatusUpdateEvent:
    return TaskStatusUpdateEvent(
        task_id=task.id, context_id=task.context_id, status=task.status, metadata=task.metadata
    )


def _progress_event(task_id: str, context_id: str, data: dict[str, Any]) -> TaskStatusUpdateEvent:
    metadata = Struct()
    metadata.update({"progress": {k: v for k, v in data.items() if v is not None}})
    return TaskStatusUpdateEvent(
        task_id=task_id,
        context_id=context_id,
        status=TaskStatus(
            state=TaskState.TASK_STATE_WORKING,
            message=Message(
                message_id=f"{task_id}-progress-{uuid.uuid4().hex[:8]}",
                task_id=task_id,
                context_id=context_id,
                role=Role.ROLE_AGENT,
                parts=[Part(text=str(data.get("message", "")))],
                metadata=metadata,
            ),
        ),
        metadata=metadata,
    )


__all__ = ["Caller", "GovernedHandler"]
