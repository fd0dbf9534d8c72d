"""Background monitors: health probes that drive degraded mode, the throughput watchdog,
and the periodic orphan scan. Each round is one call to ``Monitor.tick`` so tests can drive
it without waiting for the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from gateway.clock import iso_utc
from gateway.containers.backend import LABEL_TASK
from gateway.errors import GatewayError
from gateway.logs import get_logger

if TYPE_CHECKING:
    from gateway.hub import Hub

log = get_logger("monitor")


class Monitor:
    """Probes the store, the engine and the policy; watches throughput; removes orphans."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._last_orphan_scan = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run ``tick`` every ``probe_interval_s`` until ``stop``."""
        if self.hub.settings.probe_interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.hub.settings.probe_interval_s)
            try:
                await self.tick()
            except Exception:
                # A monitor must outlive whatever it is monitoring.
                log.exception("monitor round failed")

    async def tick(self) -> None:
        """One round of every probe and monitor."""
        await self.probe_store()
        await self.hub.probe_engine()
        self.hub.probe_policy()
        await self.hub.record_revisions()
        if self.hub.can_recover():
            await self.hub.recover()
        if "store" not in self.hub.degraded_reasons:
            await self.watchdog()
        now = time.monotonic()
        if now - self._last_orphan_scan >= self.hub.settings.orphan_scan_interval_s:
            self._last_orphan_scan = now
            await self.orphan_scan()

    async def probe_store(self) -> None:
        """Degraded while the database cannot be written (disk full, read-only file)."""
        try:
            await self.hub.store.ping_write()
            self.hub.set_cause("store", None)
        except GatewayError as e:
            self.hub.set_cause("store", e.message)

    async def watchdog(self) -> None:
        """Alert when tasks have waited a whole window and nothing was dispatched in it."""
        window = self.hub.settings.watchdog_window_s
        since = iso_utc(time.time() - window)

        def q(db: object) -> tuple[int, str | None]:
            waiting = db.execute(  # type: ignore[attr-defined]
                "SELECT count(*) FROM tasks WHERE state = 'pending' AND created_at <= ?", [since]
            ).fetchone()[0]
            last = db.execute(  # type: ignore[attr-defined]
                "SELECT max(at) FROM task_events WHERE state = 'dispatched'"
            ).fetchone()[0]
            return int(waiting), last

        waiting, last = await self.hub.store.read(q)
        stalled = waiting > 0 and (last is None or last < since)
        if stalled:
            self.hub.alerts.raise_alert(
                "throughput_stalled",
                f"{waiting} task(s) waiting and nothing dispatched for {window:g} s",
                waiting=waiting,
                last_dispatch=last or "never",
            )
        else:
            self.hub.alerts.resolve("throughput_stalled")

    async def orphan_scan(self) -> list[str]:
        """Remove containers labelled by this hub whose task is not active; return names."""
        if "container_engine" in self.hub.degraded_reasons:
            return []
        try:
            containers = await self.hub.backend.list_managed(self.hub.hub_id)
        except GatewayError:
            return []
        if not containers:
            return []
        active = {t["id"] for t in await self.hub.store.active_tasks()}
        grace = self.hub.settings.orphan_grace_s
        removed = []
        for c in containers:
            if c["labels"].get(LABEL_TASK) in active:
                continue
            # A container whose task just ended is being removed by its runner.
            if time.time() - float(c.get("created") or 0) < grace:
                continue
            self.hub.alerts.raise_alert(
                "orphan_container",
                f"removed container {c['name']} that no active task owns",
                container=c["name"],
            )
            with contextlib.suppress(GatewayError):
                await self.hub.backend.remove(c["id"])
            removed.append(c["name"])
        return removed
