"""Health: modes, monitors and alerts.

Parts:

- ``alerts``: raised and resolved alerts, sent to the log, a metric, the store and an
  optional Alertmanager webhook (``Alerts``);
- ``monitor``: the background round of probes, the throughput watchdog and the orphan
  scan (``Monitor``).
"""

from gateway.health.alerts import Alert, Alerts
from gateway.health.monitor import Monitor

__all__ = ["Alert", "Alerts", "Monitor"]
