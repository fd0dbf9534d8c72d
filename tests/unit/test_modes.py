"""Degraded mode (``Modes``) and the monitor's round, without a hub: fakes over mocks.

The same paths run inside a whole hub in tests/unit/test_recovery.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.health import Alerts, Modes, Monitor
from gateway.health.modes import ENGINE, POLICY, STORE
from gateway.metrics import Metrics
from gateway.settings import MonitorSettings
from gateway.store import Store
from tests.conftest import FakeBackend


def make_modes() -> tuple[Modes, Alerts, Metrics]:
    metrics = Metrics()
    alerts = Alerts(hub_id="hub-test", metrics=metrics)
    return Modes(alerts=alerts, gauge=metrics.mode), alerts, metrics


def gauge(metrics: Metrics, mode: str) -> float | None:
    return metrics.registry.get_sample_value("gateway_mode", {"mode": mode})


@pytest.mark.parametrize(
    ("causes", "forced", "mode", "blocker"),
    [
        ({}, None, "normal", None),  # nothing wrong, nobody forcing
        ({STORE: "disk full"}, None, "degraded", "store: disk full"),
        # several causes: all named, in a stable order
        (
            {STORE: "disk full", ENGINE: "no docker"},
            None,
            "degraded",
            "container_engine: no docker; store: disk full",
        ),
        ({}, "degraded", "degraded", "an operator put the hub in degraded mode"),
        ({POLICY: "bad rego"}, "normal", "normal", None),  # the operator overrides a cause
    ],
)
def test_mode_and_what_blocks_dispatch(
    causes: dict[str, str], forced: str | None, mode: str, blocker: str | None
) -> None:
    modes, _, metrics = make_modes()
    for cause, message in causes.items():
        modes.set_cause(cause, message)
    modes.force(forced)
    assert modes.mode == mode
    assert modes.blocker() == blocker
    assert gauge(metrics, mode) == 1
    assert gauge(metrics, "normal" if mode == "degraded" else "degraded") == 0


def test_a_cause_keeps_its_alert_raised_until_cleared() -> None:
    modes, alerts, metrics = make_modes()
    assert gauge(metrics, "normal") == 1  # set from the start, before any probe ran
    modes.set_cause(STORE, "disk full")
    assert alerts.active["degraded_store"].severity == "critical"
    assert "disk full" in alerts.active["degraded_store"].message
    assert modes.holds(STORE) and modes.holds(ENGINE, STORE) and not modes.holds(ENGINE)
    modes.set_cause(STORE, None)
    assert "degraded_store" not in alerts.active
    assert [a.name for a in alerts.resolved] == ["degraded_store"]
    modes.set_cause(STORE, None)  # clearing a cause that does not hold resolves nothing more
    assert len(alerts.resolved) == 1
    assert modes.mode == "normal"


def test_causes_are_read_only_and_forcing_checks_its_argument() -> None:
    modes, _, _ = make_modes()
    modes.set_cause(POLICY, "bad rego")
    with pytest.raises(TypeError):
        modes.causes[POLICY] = "changed behind its back"  # type: ignore[index]
    with pytest.raises(ValueError):
        modes.force("off")
    assert modes.forced is None


async def test_a_probe_records_the_failure_and_clears_it_once_it_passes() -> None:
    modes, _, _ = make_modes()
    engine = FakeBackend(fail_start=True)
    assert await modes.probe(ENGINE, engine.ping) is False
    assert modes.causes[ENGINE] == "fake engine is down"
    engine.fail_start = False
    assert await modes.probe(ENGINE, engine.ping) is True
    assert ENGINE not in modes.causes


async def test_the_monitor_runs_what_it_was_handed_and_skips_what_a_cause_blocks(
    tmp_path: Path,
) -> None:
    modes, alerts, _ = make_modes()
    store = Store(tmp_path / "db.sqlite")
    backend = FakeBackend()
    health: dict[str, str | None] = {STORE: "disk full", ENGINE: None}
    ran: list[str] = []

    def probe(cause: str) -> Any:
        async def run() -> None:
            ran.append(cause)
            modes.set_cause(cause, health[cause])

        return run

    async def recover() -> None:
        ran.append("recover")

    async def list_managed(hub_id: str | None = None) -> list[dict[str, Any]]:
        ran.append("orphan_scan")
        return []

    backend.list_managed = list_managed  # type: ignore[method-assign]
    monitor = Monitor(
        probes=[probe(STORE), probe(ENGINE)],
        recover=recover,
        modes=modes,
        store=store,
        backend=backend,
        alerts=alerts,
        hub_id="hub-test",
        # Every round: a watchdog window of 0 s, an orphan scan due each time.
        settings=MonitorSettings(
            probe_interval_s=0, watchdog_window_s=0, orphan_scan_interval_s=0, orphan_grace_s=0
        ),
    )
    try:
        await store.write(
            lambda db: db.execute(
                "INSERT INTO tasks (id, state, agent, created_at, updated_at)"
                " VALUES ('t1', 'pending', 'echo', '2000-01-01T00:00:00.000Z', '')"
            )
        )
        await monitor.tick()
        # In order; the watchdog left the store alone while it could not be written.
        assert ran == [STORE, ENGINE, "recover", "orphan_scan"]
        assert "throughput_stalled" not in alerts.active

        health.update({STORE: None, ENGINE: "no docker"})
        ran.clear()
        await monitor.tick()
        # The store is back: the watchdog sees the task waiting; the engine is not: no scan.
        assert ran == [STORE, ENGINE, "recover"]
        assert "1 task(s) waiting" in alerts.active["throughput_stalled"].message
    finally:
        await store.close()
