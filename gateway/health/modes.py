"""Degraded mode in one place: its causes, an operator's override, what blocks dispatch.

The hub degrades itself while a cause holds (the store cannot be written, the container
engine is unreachable, no valid policy is loaded) and returns to normal once the probe
behind every cause passes again. Each cause keeps the critical alert ``degraded_<cause>``
raised while it holds. An operator can force either mode, or hand control back to the
probes. Degraded means no new dispatch and no new containers (503 with Retry-After);
reads, messages and health checks go on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

from prometheus_client import Gauge

from gateway.errors import GatewayError
from gateway.health.alerts import Alerts

# The causes the hub's probes report.
STORE = "store"
ENGINE = "container_engine"
POLICY = "policy"
MODES = ("normal", "degraded")


class Modes:
    """The causes of degraded mode, the forced mode, and the ``gateway_mode`` gauge."""

    def __init__(self, *, alerts: Alerts, gauge: Gauge | None = None) -> None:
        # ``gauge`` is labelled by mode (Metrics.mode): 1 for the mode in force, else 0.
        self._alerts = alerts
        self._gauge = gauge
        self._causes: dict[str, str] = {}
        self._forced: str | None = None
        self._update_gauge()

    @property
    def causes(self) -> Mapping[str, str]:
        """Each cause that holds, with its message (read-only: change it with set_cause)."""
        return MappingProxyType(self._causes)

    @property
    def forced(self) -> str | None:
        """The mode an operator forced, or None while the probes decide."""
        return self._forced

    def holds(self, *causes: str) -> bool:
        """Whether any of ``causes`` holds now."""
        return any(cause in self._causes for cause in causes)

    def blocker(self) -> str | None:
        """Why new dispatch is refused right now, or None in normal mode."""
        if self._forced == "degraded":
            return "an operator put the hub in degraded mode"
        if self._forced == "normal":
            return None
        if self._causes:
            return "; ".join(f"{k}: {v}" for k, v in sorted(self._causes.items()))
        return None

    @property
    def mode(self) -> str:
        """``normal`` or ``degraded``."""
        return "degraded" if self.blocker() else "normal"

    def force(self, mode: str | None) -> None:
        """Force ``normal`` or ``degraded``, or ``None`` to follow the probes again."""
        if mode is not None and mode not in MODES:
            raise ValueError(mode)
        self._forced = mode
        self._update_gauge()

    def set_cause(self, cause: str, message: str | None) -> None:
        """Record (message) or clear (None) a cause of degraded mode, with its alert."""
        if message is None:
            if self._causes.pop(cause, None) is not None:
                self._alerts.resolve(f"degraded_{cause}")
        else:
            self._causes[cause] = message
            self._alerts.raise_alert(
                f"degraded_{cause}", f"degraded mode: {message}", severity="critical"
            )
        self._update_gauge()

    async def probe(self, cause: str, check: Callable[[], Awaitable[object]]) -> bool:
        """Run ``check``: clear ``cause`` if it passes, record its GatewayError if not."""
        try:
            await check()
        except GatewayError as e:
            self.set_cause(cause, e.message)
            return False
        self.set_cause(cause, None)
        return True

    def _update_gauge(self) -> None:
        if self._gauge is None:
            return
        mode = self.mode
        for name in MODES:
            self._gauge.labels(name).set(1 if mode == name else 0)
