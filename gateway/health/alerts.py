"""Alerts: raised by monitors and reloads, shown in /v1/status, logged, counted, and
optionally posted to a webhook in Alertmanager's JSON format (``POST /api/v2/alerts``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.clock import utcnow
from gateway.logs import get_logger
from gateway.metrics import Metrics

log = get_logger(__name__)
SEVERITIES = ("info", "warning", "critical")


@dataclass
class Alert:
    """One alert, active until resolved. ``name`` identifies it (raising again updates it)."""

    name: str
    message: str
    severity: str = "warning"
    details: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    resolved_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "message": self.message,
            "severity": self.severity,
            "details": self.details,
            "started_at": self.started_at,
            "resolved_at": self.resolved_at,
        }

    def to_alertmanager(self, hub_id: str, generator_url: str = "") -> dict[str, Any]:
        """This alert as one element of Alertmanager's ``postableAlerts``."""
        body: dict[str, Any] = {
            "labels": {"alertname": self.name, "severity": self.severity, "hub": hub_id},
            "annotations": {
                "summary": self.message,
                **{k: str(v) for k, v in self.details.items()},
            },
            "startsAt": self.started_at,
            "generatorURL": generator_url,
        }
        if self.resolved_at:
            body["endsAt"] = self.resolved_at
        return body


class Alerts:
    """The hub's active alerts, with a bounded history of resolved ones."""

    def __init__(
        self, *, hub_id: str, metrics: Metrics | None = None, webhook_url: str | None = None
    ) -> None:
        self.hub_id = hub_id
        self.metrics = metrics
        self.webhook_url = webhook_url
        self.active: dict[str, Alert] = {}
        self.resolved: list[Alert] = []
        self._pending: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Persists alerts (the hub points it at the store); failures are only logged,
        # since an alert about an unwritable store must still be raised.
        self.sink: Callable[[dict[str, Any]], Awaitable[None]] | None = None

    def raise_alert(
        self, name: str, message: str, *, severity: str = "warning", **details: Any
    ) -> Alert:
        """Raise (or update) the alert ``name``; logs, counts and notifies on first raise."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}")
        existing = self.active.get(name)
        if existing is not None and existing.message == message:
            return existing
        alert = Alert(
            name, message, severity, details, existing.started_at if existing else utcnow("seconds")
        )
        self.active[name] = alert
        log.warning("alert", extra={"alert": name, "severity": severity, "detail": message})
        if existing is None and self.metrics is not None:
            self.metrics.alerts.labels(name).inc()
        self._notify(alert)
        return alert

    def resolve(self, name: str) -> None:
        """Mark ``name`` resolved if it is active."""
        alert = self.active.pop(name, None)
        if alert is None:
            return
        alert.resolved_at = utcnow("seconds")
        self.resolved = [*self.resolved[-49:], alert]
        log.info("alert resolved", extra={"alert": name})
        self._notify(alert)

    def to_json(self) -> dict[str, Any]:
        return {
            "active": [a.to_json() for a in self.active.values()],
            "recently_resolved": [a.to_json() for a in self.resolved[-10:]],
        }

    def _notify(self, alert: Alert) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        jobs: list[Awaitable[None]] = []
        if self.webhook_url:
            jobs.append(self._post([alert.to_alertmanager(self.hub_id)]))
        if self.sink is not None:
            jobs.append(self._persist(alert.to_json()))
        for job in jobs:
            task = loop.create_task(job)  # type: ignore[arg-type]
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _persist(self, alert: dict[str, Any]) -> None:
        assert self.sink is not None
        try:
            await self.sink(alert)
        except Exception as e:
            log.warning("could not persist alert", extra={"alert": alert["name"], "error": str(e)})

    async def _post(self, payload: list[dict[str, Any]]) -> None:
        assert self.webhook_url is not None
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.post(self.webhook_url, json=payload) as resp:
                if resp.status >= 300:
                    log.warning("alert webhook refused", extra={"status": resp.status})
        except (aiohttp.ClientError, TimeoutError) as e:
            # An unreachable webhook must not take the hub down; the alert is still in
            # the log, the metric and /v1/status.
            log.warning("alert webhook unreachable", extra={"error": str(e)})

    async def close(self) -> None:
        """Deliver pending notifications (briefly) and close the client."""
        if self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*self._pending, return_exceptions=True), timeout=5
                )
        if self._session is not None:
            await self._session.close()
