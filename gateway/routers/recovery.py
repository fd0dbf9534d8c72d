"""Restart recovery: reconcile every unfinished task with the containers that still exist.

Runs once when the hub starts, after config is loaded and before new work is accepted:

- deadline passed                          -> ``timed_out``; its container is removed
- its container still runs                 -> re-attached: the task is handed over again and
                                              the agent answers with its one result
- no container, or one that exited          -> re-dispatched from ``pending`` within the retry
                                              budget (the reason is in the task's history),
                                              else ``failed``
- its agent is no longer in the registry    -> ``failed``

Containers labelled with this hub's id that no unfinished task owns (or a second one of a
task) are orphans: alerted, then removed. The same scan runs periodically
(``gateway.health.monitor``).

In a cluster a hub may have re-attached another hub's container after a takeover: when it
dies after that task ended but before removing the container, no label names it, so at its
restart it also removes the peers' containers of tasks that ended under its lease
(``strays``), as orphans.

Pooled containers (``io.agent-gateway.pool``, no task label) of the previous run: one that
an unfinished task recorded as its container is that task's (re-attached like any); the
others are removed without an alert, not adopted: they were warmed under the registry of
the last run, and the pool refills with the current one within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.bundle.registry import Registry
from gateway.containers.backend import LABEL_INSTANCE, LABEL_POOL, LABEL_TASK, ContainerBackend
from gateway.containers.pools import WarmPools
from gateway.errors import GatewayError
from gateway.health.alerts import Alerts
from gateway.logs import get_logger
from gateway.routers.tasks import TaskRouter
from gateway.settings import RecoverySettings
from gateway.store import Store, Task

log = get_logger(__name__)


@dataclass
class RecoveryReport:
    """What recovery did, by outcome (task ids), plus the orphans it removed."""

    reattached: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    pooled_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "reattached": len(self.reattached),
            "redispatched": len(self.redispatched),
            "timed_out": len(self.timed_out),
            "failed": len(self.failed),
            "orphans_removed": len(self.orphans),
            "pooled_removed": len(self.pooled_removed),
            "seconds": round(self.seconds, 3),
        }


async def recover(
    *,
    router: TaskRouter,
    backend: ContainerBackend,
    store: Store,
    registry: Registry,
    hub_id: str,
    alerts: Alerts,
    settings: RecoverySettings,
    pools: WarmPools | None = None,
    owned: Callable[[], Awaitable[set[str]]] | None = None,
    strays: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
) -> RecoveryReport:
    """Reconcile the store with the container engine; see the module docstring.

    ``registry`` is the one in force; ``hub_id`` picks this hub's containers. In a cluster
    ``owned()`` names the unfinished tasks this hub holds the lease of: only those are
    reconciled, and a container of a task another hub holds is not an orphan; ``strays()``
    lists the peers' containers this hub was the last to drive (``cluster_strays``).
    """
    started = time.perf_counter()
    report = RecoveryReport()
    containers = await backend.list_managed(hub_id)
    by_task, pooled = _group(containers, pools.owned() if pools is not None else set())
    now = time.time()
    spares: list[dict[str, Any]] = []
    tasks = await store.active_tasks()
    if owned is not None:
        mine = await owned()
        for task in tasks:
            if task.id in mine:
                continue
            # Another hub holds the task now: the container it re-attached (the task's
            # current instance) is its own; one of ours from an earlier attempt is a stray.
            for c in by_task.pop(task.id, []):
                if c["labels"].get(LABEL_INSTANCE, task.instance_id) != task.instance_id:
                    spares.append(c)
        tasks = [t for t in tasks if t.id in mine]
    for task in tasks:
        # A warm container carries no task label: the task recorded its id.
        if task.container_id in pooled:
            by_task.setdefault(task.id, []).append(pooled.pop(task.container_id))
    for task in tasks:
        container = _pick(task, by_task.pop(task.id, []), spares)
        await _reconcile(task, container, router, backend, registry, settings, now, report)
    leftovers = [c for group in by_task.values() for c in group] + spares
    if strays is not None:
        leftovers += await strays()
    for orphan in leftovers:
        report.orphans.append(orphan["name"])
        alerts.raise_alert(
            "orphan_container",
            f"removed container {orphan['name']} that no task owns",
            container=orphan["name"],
        )
        await _remove(backend, orphan)
    for stale in pooled.values():
        report.pooled_removed.append(stale["name"])
        await _remove(backend, stale)
    report.seconds = time.perf_counter() - started
    log.info("recovery done", extra=report.to_json())
    return report


async def take_over(
    claims: list[tuple[str, str]],
    *,
    router: TaskRouter,
    backend: ContainerBackend,
    store: Store,
    registry: Registry,
    settings: RecoverySettings,
    keep: Collection[str] = (),
) -> RecoveryReport:
    """Reconcile the tasks this hub just claimed from hubs whose leases expired, against
    those hubs' containers: re-attach where one still runs, else re-dispatch (or end them),
    as a restart would. Their warm containers are removed, except those in ``keep`` (the
    live pools' own, when the tasks are this hub's: ``Hub.resume_lost_runs``)."""
    started = time.perf_counter()
    report = RecoveryReport()
    now = time.time()
    by_hub: dict[str, list[str]] = {}
    for task_id, previous in claims:
        by_hub.setdefault(previous, []).append(task_id)
    for previous, task_ids in by_hub.items():
        containers = await backend.list_managed(previous)
        by_task, pooled = _group(containers, set(keep))
        spares: list[dict[str, Any]] = []
        for task_id in task_ids:
            task = await store.get_task(task_id)
            if task.terminal:
                continue
            if task.container_id in pooled:
                by_task.setdefault(task.id, []).append(pooled.pop(task.container_id))
            container = _pick(task, by_task.pop(task.id, []), spares)
            await _reconcile(task, container, router, backend, registry, settings, now, report)
        for stale in [*pooled.values(), *spares]:
            report.pooled_removed.append(stale["name"])
            await _remove(backend, stale)
    report.seconds = time.perf_counter() - started
    log.info("takeover done", extra=report.to_json())
    return report


class LeaseTables(Protocol):
    """What ``cluster_strays`` reads of the cluster's tables (``gateway.store.pg_cluster``)."""

    async def hubs(self, lease_s: float) -> list[dict[str, Any]]: ...

    async def ended_held(self, hub_id: str, task_ids: list[str]) -> set[str]: ...


async def cluster_strays(
    backend: ContainerBackend, tables: LeaseTables, hub_id: str
) -> list[dict[str, Any]]:
    """The other hubs' containers of tasks that ended while this hub held their lease.

    Such a container was re-attached by this hub after a takeover (it carries the first
    hub's label); this hub died after the task ended and before removing it. Its lease
    says it was this hub's to remove, and no other hub drives an ended task.
    """
    peers = [h["id"] for h in await tables.hubs(0.0) if h["id"] != hub_id]
    containers = [
        c for peer in peers for c in await backend.list_managed(peer) if c["labels"].get(LABEL_TASK)
    ]
    ended = await tables.ended_held(hub_id, sorted({c["labels"][LABEL_TASK] for c in containers}))
    return [c for c in containers if c["labels"][LABEL_TASK] in ended]


def _group(
    containers: list[dict[str, Any]], owned: set[str]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """This hub's containers by task label, and the warm ones of an earlier run by id."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    pooled: dict[str, dict[str, Any]] = {}
    for c in containers:
        if LABEL_POOL in c["labels"] and LABEL_TASK not in c["labels"]:
            if c["id"] not in owned:  # the pool of this run holds its own
                pooled[c["id"]] = c
            continue
        by_task.setdefault(c["labels"].get(LABEL_TASK, ""), []).append(c)
    return by_task, pooled


async def _reconcile(
    task: Task,
    container: dict[str, Any] | None,
    router: TaskRouter,
    backend: ContainerBackend,
    registry: Registry,
    settings: RecoverySettings,
    now: float,
    report: RecoveryReport,
) -> None:
    """One unfinished task: time it out, fail it, re-attach it or re-dispatch it."""
    agent = registry.agents.get(task.agent)
    ending: tuple[str, dict[str, str], list[str]] | None = None
    if task.deadline <= now:
        error = {"code": "agent_timeout", "message": "deadline passed while the hub was down"}
        ending = ("timed_out", error, report.timed_out)
    elif agent is None:
        error = {"code": "unknown_agent", "message": f"agent {task.agent!r} left the registry"}
        ending = ("failed", error, report.failed)
    if ending is not None:
        state, error, outcome = ending
        await router.end(task.id, state, error)
        outcome.append(task.id)
        if container is not None:
            await _remove(backend, container)
        return
    assert agent is not None
    if container is not None and container.get("state") == "running":
        await router.reattach(task, agent, container["id"])
        report.reattached.append(task.id)
        return
    if container is not None:
        await _remove(backend, container)
    attempts = int(task.attempts or 0)
    if attempts >= settings.max_attempts:
        await router.end(
            task.id,
            "failed",
            {
                "code": "retry_budget_exhausted",
                "message": f"not finished after {attempts + 1} attempts",
            },
        )
        report.failed.append(task.id)
        return
    reason = (
        "re-dispatched after a hub restart: "
        + ("its container had exited" if container is not None else "no container ran it")
        + f" (attempt {attempts + 2})"
    )
    await router.redispatch(task, agent, reason)
    report.redispatched.append(task.id)


def _pick(
    task: Task, found: list[dict[str, Any]], spares: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The task's container among those labelled with it; the others go to ``spares``.

    A hub killed while the engine was creating a container can leave one for an attempt it
    then re-dispatched: only a container of the task's current instance (its token is the
    one that verifies) may be re-attached; of those the recorded one wins, then a running
    one, then the newest.
    """
    current = [
        c for c in found if c["labels"].get(LABEL_INSTANCE, task.instance_id) == task.instance_id
    ]
    spares.extend(c for c in found if c not in current)
    if not current:
        return None
    current.sort(
        key=lambda c: (
            c["id"] == task.container_id,
            c.get("state") == "running",
            c.get("created") or 0,
        )
    )
    spares.extend(current[:-1])
    return current[-1]


async def _remove(backend: ContainerBackend, container: dict[str, Any]) -> None:
    try:
        await backend.remove(container["id"])
    except GatewayError as e:
        log.warning(
            "could not remove container", extra={"container": container["name"], "error": e.message}
        )
