"""Per-subject task counts and the ``running`` quota, kept by the task router in memory.

Every task the router runs is counted here from the moment its runner starts until it
ends: *pending* while it waits (for its subject's ``running`` quota, then for one of the
hub's container slots), *running* once it holds a slot. The counts follow the runners, not
the store's state column, so they cannot drift from what runs: restart recovery starts a
runner for every unfinished task it finds in the store, which rebuilds them.

Measured (bench/bench_limits.py): reading the count here takes 0.05 µs; the same count
from SQLite (``SELECT count(*) ... WHERE subject = ? AND state = 'pending'``, 100,000
tasks, no index on subject) took 1.7 to 2.1 ms median (two runs, a loaded machine), on the
path of every submission.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from gateway.identity.apikeys import Subject

# How often (s) a task waiting for its subject's quota looks again without being woken: a
# reload may have raised the quota.
RECHECK_S = 1.0


class SubjectQuotas:
    """Counts of each subject's pending and running tasks; the ``running`` gate."""

    def __init__(self) -> None:
        # The subject's running quota (None: unlimited); the hub points this at the limits
        # in force.
        self.running_limit: Callable[[Subject], int | None] = lambda subject: None
        self._tasks: dict[str, list[object]] = {}  # task id -> [owner, phase]
        self._pending: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._freed = asyncio.Event()
        # Tasks placed at submission (a warm container): task id -> (owner, the hub's slots).
        self._reserved: dict[str, tuple[str, asyncio.Semaphore]] = {}

    def pending_of(self, owner: str) -> int:
        """The subject's tasks waiting for a container."""
        return self._pending.get(owner, 0)

    def running_of(self, owner: str) -> int:
        """The subject's tasks holding (or about to take) a container slot."""
        return self._running.get(owner, 0)

    def enter(self, task_id: str, owner: str) -> None:
        """A runner started for ``task_id`` (pending until it holds a slot)."""
        if task_id in self._tasks:
            return
        self._tasks[task_id] = [owner, 0]
        self._pending[owner] = self._pending.get(owner, 0) + 1

    def leave(self, task_id: str) -> None:
        """The runner of ``task_id`` ended (a reservation it never took up is given back)."""
        entry = self._tasks.pop(task_id, None)
        if entry is not None and entry[1] != 2:
            _dec(self._pending, str(entry[0]))
        self.unreserve(task_id)

    async def reserve(self, task_id: str, subject: Subject, slots: asyncio.Semaphore) -> bool:
        """Take the subject's ``running`` quota and one of the hub's ``slots`` for
        ``task_id`` now, if both are free (never waits); whether it did. ``slot`` takes the
        reservation up; ``unreserve`` (or ``leave``) gives it back."""
        owner = subject.id or ""
        limit = self.running_limit(subject)
        if slots.locked() or (limit is not None and self.running_of(owner) >= limit):
            return False
        await slots.acquire()  # not locked: returns without yielding to the loop
        self._running[owner] = self._running.get(owner, 0) + 1
        self._reserved[task_id] = (owner, slots)
        return True

    def unreserve(self, task_id: str) -> None:
        """Give back a reservation that no runner took up (the task was not created)."""
        held = self._reserved.pop(task_id, None)
        if held is not None:
            held[1].release()
            self._free(held[0])

    def _free(self, owner: str) -> None:
        _dec(self._running, owner)
        self._freed.set()
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(
        self, task_id: str, subject: Subject, slots: asyncio.Semaphore, *, bypass: bool = False
    ) -> AsyncIterator[None]:
        """Hold one of the subject's ``running`` slots, then one of the hub's ``slots``.

        ``bypass`` (a re-attached task, whose container runs already, or a delegated child,
        which its parent waits for) skips the subject's quota but is counted all the same;
        a reservation (``reserve``) is taken up without waiting.
        """
        entry = self._tasks.get(task_id)
        owner = str(entry[0]) if entry is not None else (subject.id or "")
        reserved = self._reserved.pop(task_id, None) is not None
        if not bypass and not reserved:
            while (limit := self.running_limit(subject)) is not None and self.running_of(
                owner
            ) >= limit:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), RECHECK_S)
        if not reserved:
            self._running[owner] = self._running.get(owner, 0) + 1
        try:
            if not reserved:
                await slots.acquire()
            try:
                if entry is not None and entry[1] != 2:
                    entry[1] = 2
                    _dec(self._pending, owner)
                yield
            finally:
                slots.release()
        finally:
            self._free(owner)

    def to_json(self) -> dict[str, dict[str, int]]:
        """Pending and running tasks by subject."""
        return {"pending": dict(self._pending), "running": dict(self._running)}


def _dec(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
