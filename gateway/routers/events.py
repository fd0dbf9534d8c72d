"""Task events fan-out: state changes and agent progress, to every open stream of a task.

The task router publishes each state a task enters; the agent route publishes the progress
an agent reports (``ctx.progress``). Streams (A2A ``SendStreamingMessage`` and
``SubscribeToTask``, ``GET /v1/tasks/{id}/events``) subscribe per task.

Publishing never waits: each subscriber has a bounded queue, and a subscriber that falls
behind loses its oldest undelivered events (counted in ``dropped``), never the newest, so the
final state always reaches it and a slow or vanished consumer costs the hub one bounded
queue, not time. Each task keeps its last ``buffer`` events (ids count up from 1 per task),
so a consumer that reconnects with ``Last-Event-ID`` gets what it missed; the buffers of
ended tasks are kept for the last ``retain`` tasks only. Ids restart after a hub restart:
a stream then starts from the task's stored state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

STATE = "state"
PROGRESS = "progress"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a task: ``kind`` is ``state`` or ``progress``; ``final`` on its end."""

    id: int
    task_id: str
    kind: str
    data: dict[str, Any]
    final: bool = False
    at: float = field(default_factory=time.time)

    def sse(self) -> bytes:
        """The event as one Server-Sent Events frame."""
        body = json.dumps({"task_id": self.task_id, **self.data, "final": self.final})
        return f"id: {self.id}\nevent: {self.kind}\ndata: {body}\n\n".encode()


class Subscription:
    """The events of one task for one consumer, as an async iterator (ends after ``final``)."""

    def __init__(self, owner: TaskEvents, task_id: str, queue_size: int) -> None:
        self._owner = owner
        self.task_id = task_id
        self._queue: collections.deque[StreamEvent] = collections.deque()
        self._size = queue_size
        self._wake = asyncio.Event()
        self.dropped = 0
        self.finished = False
        self.closed = False

    def _offer(self, event: StreamEvent) -> None:
        if len(self._queue) >= self._size:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._wake.set()

    async def next(self, timeout_s: float | None = None) -> StreamEvent | None:
        """The next event; None after ``timeout_s`` without one (or once ended and drained)."""
        while not self._queue:
            if self.finished or self.closed:
                return None
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            except TimeoutError:
                return None
        event = self._queue.popleft()
        if event.final:
            self.finished = True
        return event

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self.next()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Stop receiving (idempotent); the consumer went away."""
        if not self.closed:
            self.closed = True
            self._wake.set()
            self._owner._unsubscribe(self)


class TaskEvents:
    """Per-task event buffers and their subscribers."""

    def __init__(self, *, buffer: int = 256, queue: int = 128, retain: int = 1024) -> None:
        if min(buffer, queue, retain) < 1:
            raise ValueError("buffer, queue and retain must be at least 1")
        self._buffer = buffer
        self._queue = queue
        self._retain = retain
        self._events: collections.OrderedDict[str, collections.deque[StreamEvent]] = (
            collections.OrderedDict()
        )
        self._next_id: dict[str, int] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._subscribers: dict[str, set[Subscription]] = {}
        self.listeners: list[Callable[[StreamEvent], None]] = []
        self.published = 0

    def publish(
        self, task_id: str, kind: str, data: dict[str, Any], *, final: bool = False
    ) -> StreamEvent:
        """Record an event and offer it to every subscriber of the task; never waits."""
        seq = self._next_id.get(task_id, 1)
        self._next_id[task_id] = seq + 1
        event = StreamEvent(seq, task_id, kind, data, final)
        ring = self._events.get(task_id)
        if ring is None:
            ring = self._events[task_id] = collections.deque(maxlen=self._buffer)
        ring.append(event)
        self.published += 1
        for sub in list(self._subscribers.get(task_id, ())):
            sub._offer(event)
        for listener in self.listeners:
            with contextlib.suppress(Exception):  # a listener's bug must not stop the router
                listener(event)
        if final:
            self._ended[task_id] = None
            while len(self._ended) > self._retain:
                old, _ = self._ended.popitem(last=False)
                self._events.pop(old, None)
                self._next_id.pop(old, None)
        return event

    def subscribe(self, task_id: str, after: int | None = 0) -> Subscription:
        """A subscription that first replays the buffered events with an id above ``after``
        (None: none of them), then receives new ones."""
        sub = Subscription(self, task_id, self._queue)
        if after is not None:
            for event in self._events.get(task_id, ()):
                if event.id > after:
                    sub._offer(event)
        self._subscribers.setdefault(task_id, set()).add(sub)
        return sub

    def ended(self, task_id: str) -> bool:
        """Whether the task's final event is buffered."""
        ring = self._events.get(task_id)
        return bool(ring) and ring[-1].final  # type: ignore[index]

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.task_id]

    @property
    def open_streams(self) -> int:
        """Subscriptions open now."""
        return sum(len(s) for s in self._subscribers.values())
