"""The hub: composes config, store, decision log, container backend and routers.

Nothing here knows about HTTP; ``gateway.http.app`` wraps a Hub in an aiohttp application,
and the CLI and the tests drive it directly.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gateway import __version__
from gateway.agent_client import AgentClient
from gateway.alerts import Alerts
from gateway.config import Config, load_config
from gateway.containers.backend import ContainerBackend
from gateway.decisions import DecisionLog
from gateway.errors import ConfigError, GatewayError
from gateway.keys import KeyStore
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.routers.tasks import RouterOptions, TaskRouter
from gateway.settings import Settings
from gateway.store import Store

log = get_logger("hub")


class Hub:
    """One running gateway: its state, its configuration generation and its routers."""

    def __init__(self, settings: Settings, *, backend: ContainerBackend | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.alerts = Alerts(
            hub_id=settings.hub_id, metrics=self.metrics, webhook_url=settings.alert_webhook_url
        )
        self._backend = backend
        self._config: Config | None = None
        self.keys = KeyStore.load(settings.effective_keys_file)
        self.store: Store
        self.router: TaskRouter
        self.decisions: DecisionLog
        self.agents = AgentClient()
        self.facts: dict[str, str] = {}
        self.forced_mode: str | None = None
        self.degraded_reasons: dict[str, str] = {}
        self.last_reload_error: dict[str, Any] | None = None

    # -- lifecycle

    @property
    def backend(self) -> ContainerBackend:
        assert self._backend is not None
        return self._backend

    @property
    def config(self) -> Config:
        assert self._config is not None, "hub not started"
        return self._config

    async def start(self) -> None:
        """Load files, open the store, reach the container engine, clear leftovers."""
        s = self.settings
        self._config = self._load()
        self.store = Store(s.db_path)
        await self.store.record_registry(
            self.config.registry_revision,
            self.config.registry.source,
            self.config.registry.to_json(),
        )
        self.decisions = DecisionLog(self.store, hub_id=s.hub_id, metrics=self.metrics)
        await self.decisions.start()
        if self._backend is None:
            from gateway.containers.docker import DockerBackend

            self._backend = DockerBackend(
                internal_network=s.network,
                egress_network=s.egress_network,
                workers=s.docker_workers,
            )
        try:
            self.facts = await self.backend.prepare()
        except GatewayError as e:
            self._set_cause("container_engine", e.message)
        gateway_host = s.agent_listen_host or self.facts.get("internal_gateway") or s.host
        self.router = TaskRouter(
            config=lambda: self.config,
            store=self.store,
            backend=self.backend,
            agents=self.agents,
            decisions=self.decisions,
            options=RouterOptions(
                hub_id=s.hub_id,
                networks={"internal": s.network, "egress": s.egress_network},
                gateway_url=f"http://{gateway_host}:{s.port}",
                ttl_grace_s=s.container_ttl_grace_s,
                max_running=s.max_running_containers,
            ),
            can_dispatch=self.dispatch_blocker,
        )
        self.router.dispatch_observer = lambda agent, secs: self.metrics.dispatch_seconds.labels(
            agent
        ).observe(secs)
        await self._reconcile()
        self._update_mode_metric()
        log.info(
            "hub started",
            extra={"hub_id": s.hub_id, "policy_revision": self.config.policy_revision},
        )

    async def stop(self) -> None:
        """Stop runners (removing their containers), then close clients and the store."""
        with contextlib.suppress(Exception):
            await self.router.shutdown()
        await self.agents.close()
        await self.alerts.close()
        if self._backend is not None:
            await self._backend.close()
        await self.store.close()

    def _load(self) -> Config:
        s = self.settings
        return load_config(
            agents_file=s.agents_file, schemas_dir=s.schemas_dir, policies_dir=s.policies_dir
        )

    async def _reconcile(self) -> None:
        # Tasks left active by a previous run of this state directory cannot be resumed
        # yet; they end as failed with the reason, and their containers are removed.
        for task in await self.store.active_tasks():
            with contextlib.suppress(GatewayError):
                await self.store.transition(
                    task["id"],
                    "failed",
                    allowed_from=("pending", "dispatched", "running"),
                    error={"code": "hub_restarted", "message": "the hub restarted during the task"},
                )
            if task.get("container_id") and "container_engine" not in self.degraded_reasons:
                with contextlib.suppress(GatewayError):
                    await self.backend.remove(task["container_id"])

    # -- modes

    def dispatch_blocker(self) -> str | None:
        """Why new dispatch is refused right now, or None in normal mode."""
        if self.forced_mode == "degraded":
            return "an operator put the hub in degraded mode"
        if self.forced_mode == "normal":
            return None
        if self.degraded_reasons:
            return "; ".join(f"{k}: {v}" for k, v in sorted(self.degraded_reasons.items()))
        return None

    @property
    def mode(self) -> str:
        return "degraded" if self.dispatch_blocker() else "normal"

    def set_mode(self, mode: str | None) -> None:
        """Force ``normal`` or ``degraded``, or ``None`` to follow the probes again."""
        if mode not in (None, "normal", "degraded"):
            raise ValueError(mode)
        self.forced_mode = mode
        self._update_mode_metric()

    def _update_mode_metric(self) -> None:
        for name in ("normal", "degraded"):
            self.metrics.mode.labels(name).set(1 if self.mode == name else 0)

    def _set_cause(self, cause: str, message: str | None) -> None:
        """Record (message) or clear (None) a cause of degraded mode, with its alert."""
        if message is None:
            if self.degraded_reasons.pop(cause, None) is not None:
                self.alerts.resolve(f"degraded_{cause}")
        else:
            self.degraded_reasons[cause] = message
            self.alerts.raise_alert(
                f"degraded_{cause}", f"degraded mode: {message}", severity="critical"
            )
        self._update_mode_metric()

    async def probe_engine(self) -> None:
        """Re-check the container engine and leave or enter degraded mode accordingly."""
        try:
            await self.backend.ping()
            if not self.facts:
                self.facts = await self.backend.prepare()
            self._set_cause("container_engine", None)
        except GatewayError as e:
            self._set_cause("container_engine", e.message)

    # -- reload and status

    async def reload(self) -> dict[str, Any]:
        """Load the files again; on any error keep the current config and report it."""
        try:
            new = self._load()
        except ConfigError as e:
            self.last_reload_error = {"message": e.message, "location": e.location}
            self.alerts.raise_alert(
                "reload_failed", f"reload refused: {e}", location=e.location or ""
            )
            raise
        self._config = new
        self.last_reload_error = None
        self.alerts.resolve("reload_failed")
        await self.store.record_registry(
            new.registry_revision, new.registry.source, new.registry.to_json()
        )
        log.info("config reloaded", extra={"policy_revision": new.policy_revision})
        return self.revisions()

    def revisions(self) -> dict[str, str]:
        c = self.config
        return {
            "policies": c.policy_revision,
            "schemas": c.schemas_revision,
            "registry": c.registry_revision,
        }

    async def status(self) -> dict[str, Any]:
        """What an operator wants at a glance."""
        counts = await self.store.count_tasks_by_state()
        for state, n in counts.items():
            self.metrics.tasks.labels(state).set(n)
        self.metrics.containers_running.set(self.router.running)
        return {
            "hub_id": self.settings.hub_id,
            "version": __version__,
            "mode": self.mode,
            "forced_mode": self.forced_mode,
            "degraded_reasons": self.degraded_reasons,
            "revisions": self.revisions(),
            "tasks": counts,
            "running_tasks": self.router.running,
            "agents": sorted(self.config.registry.agents),
            "last_reload_error": self.last_reload_error,
            "alerts": self.alerts.to_json(),
        }
