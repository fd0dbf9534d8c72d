"""One hub's part in a cluster of hubs that share a PostgreSQL store.

Every ``beat_s`` the hub, in this order: records its heartbeat (which renews the leases of
all its unfinished tasks), takes or renews the singletons it may hold, claims the tasks of
hubs whose leases have expired and hands them to ``take_over``, and refreshes what it learns
from the others (their SVID signing keys, the instances they run). A beat that fails (the
store is down) changes nothing: the hub keeps its work, and a hub that cannot beat for a
whole lease loses its tasks to another, which is the point of the lease.

A hub claims only after it has beaten without a failure for a whole lease: after an outage
of the store longer than the lease every lease has expired, and the first hub back must
not take the tasks of a peer that is alive and running them. A peer that is alive renews
its leases within that lease; a dead one does not, and is taken over a lease later.

Nothing here imports the hub: it gets the store's cluster tables and callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import StoreUnavailable
from gateway.logs import get_logger

log = get_logger(__name__)

# The work one hub does for all: the orphan scan and the watchdog (gateway.health.monitor).
# Revisions are not among them: each hub records those it loaded (an idempotent write keyed
# by the revision), so a revision one hub runs ahead of the others is recorded too.
SINGLETONS = ("orphan_scan", "watchdog")


class ClusterTables(Protocol):
    """The store's cluster tables (``gateway.store.pg_cluster.ClusterState``)."""

    async def heartbeat(self, hub_id: str, url: str, info: dict[str, Any], lease_s: float) -> float:
        """Beat and renew this hub's task leases; the server's clock."""
        ...

    async def restarted(self, hub_id: str) -> None:
        """Mark this hub's row as a new run."""
        ...

    async def hubs(self, lease_s: float) -> list[dict[str, Any]]:
        """Every hub, alive or not."""
        ...

    async def claim_expired(
        self, hub_id: str, lease_s: float, *, limit: int = 100
    ) -> list[tuple[str, str]]:
        """Claim expired tasks: (task id, previous hub)."""
        ...

    async def hold(self, name: str, hub_id: str, lease_s: float) -> bool:
        """Take or renew a singleton."""
        ...

    async def release(self, hub_id: str) -> None:
        """Give up this hub's singletons."""
        ...

    async def publish_keys(self, hub_id: str, trust_domain: str, jwks: dict[str, Any]) -> None:
        """Publish this hub's public keys."""
        ...

    async def trusted_keys(self, trust_domain: str) -> list[dict[str, Any]]:
        """Every hub's public keys."""
        ...

    async def instances(self, *, except_hub: str) -> list[dict[str, Any]]:
        """Instances of unfinished tasks other hubs run."""
        ...


@dataclass
class ClusterHooks:
    """What the hub hands the membership loop."""

    info: Callable[[], dict[str, Any]]
    take_over: Callable[[list[tuple[str, str]]], Awaitable[None]]
    own_jwks: Callable[[], dict[str, Any]]
    trust_keys: Callable[[list[dict[str, Any]]], None]
    remote_instances: Callable[[list[dict[str, Any]]], None]
    trust_domain: str
    # Whether this hub can run tasks it would claim (recovered, not degraded): a hub that
    # cannot must leave them to one that can.
    ready: Callable[[], bool] = lambda: True


@dataclass
class Membership:
    """Heartbeat, leases, singletons and takeover for one hub (see the module docstring)."""

    tables: ClusterTables
    hub_id: str
    url: str
    hooks: ClusterHooks
    lease_s: float = 10.0
    beat_s: float = 2.0
    _held: set[str] = field(default_factory=set)
    _hubs: list[dict[str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _taking_over: asyncio.Task[None] | None = None
    last_beat: float = 0.0
    takeovers: int = 0
    # Since when (monotonic) every beat succeeded; None until one has, or after a failure.
    _up_since: float | None = None

    async def start(self) -> None:
        """Join: publish this hub's keys and beat once, then beat in the background."""
        with contextlib.suppress(StoreUnavailable):
            await self.tables.restarted(self.hub_id)
            await self.publish_keys()
            await self.beat()
        self._task = asyncio.create_task(self._loop(), name="cluster-membership")

    async def publish_keys(self) -> None:
        """Publish this hub's signing keys (again after a rotation)."""
        await self.tables.publish_keys(self.hub_id, self.hooks.trust_domain, self.hooks.own_jwks())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.beat_s)
            try:
                await self.beat()
            except StoreUnavailable as e:
                self._up_since = None
                # Keep what is held until the lease says otherwise: another hub may take the
                # singletons over once this hub has missed a whole lease.
                if time.monotonic() - self.last_beat > self.lease_s:
                    self._held.clear()
                log.warning("cluster heartbeat failed", extra={"error": e.message})
            except Exception:
                log.exception("cluster heartbeat crashed")

    async def beat(self) -> None:
        """One round: heartbeat, singletons, takeover, what the others publish."""
        await self.tables.heartbeat(self.hub_id, self.url, self.hooks.info(), self.lease_s)
        self.last_beat = time.monotonic()
        if self._up_since is None:
            self._up_since = self.last_beat
        held = set()
        for name in SINGLETONS:
            if await self.tables.hold(name, self.hub_id, self.lease_s):
                held.add(name)
        if held != self._held:
            log.info("cluster singletons", extra={"held": sorted(held)})
        self._held = held
        self._hubs = await self.tables.hubs(self.lease_s)
        self.hooks.trust_keys(await self.tables.trusted_keys(self.hooks.trust_domain))
        self.hooks.remote_instances(await self.tables.instances(except_hub=self.hub_id))
        # Every peer alive has had a whole lease, with the store up, to renew its leases.
        settled = self.last_beat - (self._up_since or self.last_beat) >= self.lease_s
        if settled and not self.taking_over() and self.hooks.ready():
            claims = await self.tables.claim_expired(self.hub_id, self.lease_s)
            if claims:
                self.takeovers += len(claims)
                log.warning(
                    "taking over tasks of hubs whose lease expired",
                    extra={"tasks": len(claims), "from": sorted({h for _, h in claims})},
                )
                # In the background: re-attaching waits for agents, and the heartbeat must
                # go on meanwhile (or this hub's own leases would expire too).
                self._taking_over = asyncio.create_task(self.hooks.take_over(claims))

    def taking_over(self) -> bool:
        """Whether tasks claimed from another hub are being re-attached or re-dispatched."""
        return self._taking_over is not None and not self._taking_over.done()

    def leads(self, name: str) -> bool:
        """Whether this hub holds the singleton ``name`` (as of its last beat)."""
        return name in self._held

    def live_hubs(self) -> int:
        """How many hubs beat within a lease (at least this one)."""
        return max(1, sum(1 for h in self._hubs if h["alive"]))

    def status(self) -> dict[str, Any]:
        """For ``/v1/status``: this hub, every hub seen, the singletons this hub holds."""
        return {
            "hub_id": self.hub_id,
            "lease_s": self.lease_s,
            "singletons": sorted(self._held),
            "takeovers": self.takeovers,
            "hubs": self._hubs,
        }

    async def stop(self) -> None:
        """Leave: stop beating and give up the singletons (tasks keep their leases, so a
        quick restart of this hub finds them still its own)."""
        for job in (self._task, self._taking_over):
            if job is not None:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job
        with contextlib.suppress(StoreUnavailable):
            await self.tables.release(self.hub_id)
