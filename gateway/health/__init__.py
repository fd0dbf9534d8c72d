"""Health: modes, monitors and alerts.

Parts:

- ``modes``: degraded mode in one place: its causes, an operator's override, what blocks
  dispatch, and the mode metric (``Modes``);
- ``alerts``: raised and resolved alerts, sent to the log, a metric, the store and an
  optional Alertmanager webhook (``Alerts``);
- ``monitor``: the background round of probes, the throughput watchdog and the orphan
  scan (``Monitor``).
"""

from gateway.health.alerts import Alert, Alerts
from gateway.health.modes import Modes
from gateway.health.monitor import Monitor

__all__ = ["Alert", "Alerts", "Modes", "Monitor"]
