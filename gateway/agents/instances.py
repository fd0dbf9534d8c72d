"""Live agent instances: which containers the hub runs now, under which identity.

The task router opens an instance before it starts a container (minting the JWT-SVID the
container receives), marks it ready once the agent answers ``/health``, and closes it when
the task ends (revoking the token before the container is removed). The message router
reads the registry to find recipients, the sender's task and its lineage. Nothing here
knows about HTTP or Docker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.containers.backend import ContainerHandle
from gateway.identity.apikeys import Subject
from gateway.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LineageEntry:
    """One ancestor of a delegated task: the task and the agent that ran it."""

    task_id: str
    agent: str

    def to_json(self) -> dict[str, str]:
        return {"task_id": self.task_id, "agent": self.agent}


@dataclass(slots=True)
class Instance:
    """One agent container run by this hub (``handle`` is set once it answers /health)."""

    instance_id: str
    agent: str
    task_id: str
    subject: Subject
    spiffe_id: str
    lineage: tuple[LineageEntry, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    handle: ContainerHandle | None = None

    @property
    def depth(self) -> int:
        """How many delegations separate this task from the task a user submitted."""
        return len(self.lineage)

    def child_lineage(self) -> tuple[LineageEntry, ...]:
        """The lineage of a task this instance delegates."""
        return (*self.lineage, LineageEntry(self.task_id, self.agent))

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "agent": self.agent,
            "task_id": self.task_id,
            "spiffe_id": self.spiffe_id,
            "ready": self.handle is not None,
            "address": self.handle.base_url if self.handle else None,
            "lineage": [e.to_json() for e in self.lineage],
        }


class Minter(Protocol):
    """What the registry needs from the identity service."""

    def mint_env(self, agent: str, instance_id: str) -> tuple[str, dict[str, str]]:
        """Mint a token for the instance; return (spiffe id, env vars carrying it)."""
        ...

    def revoke(self, instance_id: str) -> None:
        """Refuse the instance's tokens from now on."""
        ...


class InstanceRegistry:
    """The instances of this hub, by id and by task; a token is valid only while listed."""

    def __init__(self, minter: Minter | None = None) -> None:
        self.minter = minter
        self._by_id: dict[str, Instance] = {}
        self._by_task: dict[str, Instance] = {}
        self._turn = 0  # round-robin position for picking among instances of one agent
        self._on_close: list[Callable[[Instance], None]] = []
        self._on_ready: list[Callable[[Instance], None]] = []
        # In a cluster: the instances other hubs run (from the store's directory), for
        # routing messages to them and accepting their tokens. Never closed from here.
        self._remote: dict[str, Instance] = {}

    def on_close(self, callback: Callable[[Instance], None]) -> None:
        """Call ``callback(instance)`` when an instance closes (e.g. to drop connections)."""
        self._on_close.append(callback)

    def on_ready(self, callback: Callable[[Instance], None]) -> None:
        """Call ``callback(instance)`` once an instance answers (e.g. to list it for peers)."""
        self._on_ready.append(callback)

    def set_remote(self, entries: list[dict[str, Any]]) -> None:
        """Replace the instances other hubs run: dicts with ``instance_id``, ``agent``,
        ``task_id``, ``owner``, ``lineage`` and ``url`` (the agent's address, reached
        directly)."""
        remote: dict[str, Instance] = {}
        for e in entries:
            if e["instance_id"] in self._by_id or not e.get("url"):
                continue  # taken over by this hub, or not answering yet
            url = urlsplit(e["url"])
            remote[e["instance_id"]] = Instance(
                instance_id=e["instance_id"],
                agent=e["agent"],
                task_id=e.get("task_id") or "",
                subject=Subject(e.get("owner") or "", (), ""),
                spiffe_id="",
                lineage=tuple(
                    LineageEntry(x["task_id"], x["agent"]) for x in e.get("lineage") or ()
                ),
                handle=ContainerHandle("", "", url.hostname or "", url.port or 80),
            )
        self._remote = remote

    # -- lifecycle (driven by the task router)

    def open(
        self,
        *,
        agent: str,
        task_id: str,
        subject: Subject,
        lineage: tuple[LineageEntry, ...] = (),
        instance_id: str | None = None,
        fresh_id: str | None = None,
    ) -> Instance:
        """Register a starting instance and mint its identity (before the container starts).

        With ``instance_id`` (a container re-attached after a restart) nothing is minted: the
        container still holds its token, which becomes valid again. ``fresh_id`` is the id a
        new instance gets (minted), when the caller chose it (default: a random one).
        """
        spiffe_id, env = "", {}
        if instance_id is None:
            instance_id = fresh_id or uuid.uuid4().hex
            if self.minter is not None:
                spiffe_id, env = self.minter.mint_env(agent, instance_id)
        inst = Instance(
            instance_id=instance_id,
            agent=agent,
            task_id=task_id,
            subject=subject,
            spiffe_id=spiffe_id,
            lineage=lineage,
            env=env,
        )
        self._by_id[instance_id] = inst
        self._by_task[task_id] = inst
        return inst

    def ready(self, instance: Instance, handle: ContainerHandle) -> None:
        """The container answers: messages may be routed to it from now on."""
        if instance.instance_id in self._by_id:
            instance.handle = handle
            for callback in self._on_ready:
                callback(instance)

    def close(self, instance: Instance) -> None:
        """Forget the instance and revoke its tokens (its container is about to go)."""
        self._by_id.pop(instance.instance_id, None)
        if self._by_task.get(instance.task_id) is instance:
            del self._by_task[instance.task_id]
        for callback in self._on_close:
            callback(instance)
        instance.handle = None
        if self.minter is not None:
            self.minter.revoke(instance.instance_id)

    # -- queries

    def is_active(self, instance_id: str) -> bool:
        """Whether tokens of ``instance_id`` may still be used (here or on a peer hub)."""
        return instance_id in self._by_id or instance_id in self._remote

    def get(self, instance_id: str | None) -> Instance | None:
        if not instance_id:
            return None
        return self._by_id.get(instance_id) or self._remote.get(instance_id)

    def is_remote(self, inst: Instance) -> bool:
        """Whether another hub of the cluster runs ``inst``."""
        return inst.instance_id in self._remote and inst.instance_id not in self._by_id

    def for_task(self, task_id: str) -> Instance | None:
        """The instance running ``task_id``, if any."""
        return self._by_task.get(task_id)

    def running(self, agent: str | None = None, *, exclude: str | None = None) -> list[Instance]:
        """Ready instances (of ``agent`` if given), without the one called ``exclude``."""
        return [
            i
            for i in [*self._by_id.values(), *self._remote.values()]
            if i.handle is not None
            and (agent is None or i.agent == agent)
            and i.instance_id != exclude
        ]

    def pick(self, agent: str, *, exclude: str | None = None) -> Instance | None:
        """One ready instance of ``agent`` (round robin), never ``exclude``; None if none."""
        found = self.running(agent, exclude=exclude)
        if not found:
            return None
        self._turn += 1
        return found[self._turn % len(found)]

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)
