"""Background monitors: a round of health probes, then restart recovery once it can run,
the throughput watchdog and the periodic orphan scan. Each round is one call to
``Monitor.tick`` so tests can drive it without waiting for the loop.

The monitor runs the probes it is handed and knows nothing of what they check (as aiohttp
runs its ``on_startup`` callbacks); the watchdog and the orphan scan are its own, over the
store, the container engine and the alerts it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from gateway.clock import iso_utc
from gateway.containers.backend import LABEL_HUB, LABEL_POOL, LABEL_TASK, ContainerBackend
from gateway.errors import GatewayError
from gateway.health.alerts import Alerts
from gateway.health.modes import ENGINE, STORE, Modes
from gateway.logs import get_logger
from gateway.settings import MonitorSettings
from gateway.store import Store

log = get_logger(__name__)
Probe = Callable[[], Awaitable[object]]


class Monitor:
    """Runs the probes, recovery, the throughput watchdog and the orphan scan."""

    def __init__(
        self,
        *,
        probes: Sequence[Probe],
        recover: Probe,
        modes: Modes,
        store: Store,
        backend: ContainerBackend,
        alerts: Alerts,
        hub_id: str,
        settings: MonitorSettings,
        owned: Callable[[], Collection[str]] = frozenset,
        leads: Callable[[str], bool] = lambda name: True,
        peers: Callable[[], Mapping[str, bool]] = dict,
    ) -> None:
        # ``probes`` run in order every round and drive ``modes``; ``recover`` follows them
        # (it runs restart recovery once, when the probes let it).
        self._probes = tuple(probes)
        self._recover = recover
        self.modes = modes
        self.store = store
        self.backend = backend
        self.alerts = alerts
        self.hub_id = hub_id
        self.settings = settings
        # Containers no task owns that are not orphans (MCP servers, warm pools).
        self._owned = owned
        # In a cluster one elected hub runs the watchdog and the orphan scan, which then
        # sweeps the containers of every hub of the cluster (the store is shared).
        self._leads = leads
        self._peers = peers  # the other hubs of the cluster: id -> alive
        self._last_orphan_scan = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run ``tick`` every ``probe_interval_s`` until ``stop``."""
        if self.settings.probe_interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="monitor")

    async def stop(self) -> None:
        """Stop the background rounds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                await self.tick()
            except Exception:
                # A monitor must outlive whatever it is monitoring.
                log.exception("monitor round failed")

    async def tick(self) -> None:
        """One round of every probe and monitor."""
        for probe in self._probes:
            await probe()
        await self._recover()
        if not self.modes.holds(STORE) and self._leads("watchdog"):
            await self.watchdog()
        now = time.monotonic()
        due = now - self._last_orphan_scan >= self.settings.orphan_scan_interval_s
        if due and self._leads("orphan_scan"):
            self._last_orphan_scan = now
            await self.orphan_scan()

    async def watchdog(self) -> None:
        """Alert when tasks have waited a whole window and nothing was dispatched in it."""
        window = self.settings.watchdog_window_s
        since = iso_utc(time.time() - window)
        waiting, last = await self.store.dispatch_watch(since)
        stalled = waiting > 0 and (last is None or last < since)
        if stalled:
            self.alerts.raise_alert(
                "throughput_stalled",
                f"{waiting} task(s) waiting and nothing dispatched for {window:g} s",
                waiting=waiting,
                last_dispatch=last or "never",
            )
        else:
            self.alerts.resolve("throughput_stalled")

    async def orphan_scan(self) -> list[str]:
        """Remove containers labelled by this hub (or by another hub of its cluster) whose
        task is not active; return their names."""
        if self.modes.holds(ENGINE):
            return []
        try:
            containers = await self.backend.list_managed(self.hub_id)
            peers = self._peers()
            for hub in peers:
                containers += await self.backend.list_managed(hub)
        except GatewayError:
            return []
        if not containers:
            return []
        tasks = await self.store.active_tasks()
        active = {t.id for t in tasks}
        # A warm container carries no task label: an active task recorded its id.
        owned = {*self._owned(), *(t.container_id for t in tasks if t.container_id)}
        grace = self.settings.orphan_grace_s
        removed = []
        for c in containers:
            if c["labels"].get(LABEL_TASK) in active or c["id"] in owned:
                continue
            # A container whose task just ended is being removed by its runner.
            if time.time() - float(c.get("created") or 0) < grace:
                continue
            hub = str(c["labels"].get(LABEL_HUB))
            peer_pool = LABEL_POOL in c["labels"] and hub != self.hub_id
            if peer_pool and peers.get(hub):
                continue  # a live peer's warm container: that hub holds it
            # A dead peer's idle warm container goes quietly; anything else is an orphan.
            if not peer_pool:
                self.alerts.raise_alert(
                    "orphan_container",
                    f"removed container {c['name']} that no active task owns",
                    container=c["name"],
                )
            with contextlib.suppress(GatewayError):
                await self.backend.remove(c["id"])
            removed.append(c["name"])
        return removed
