"""The hub: composes config, store, decision log, container backend and routers.

Nothing here knows about HTTP; ``gateway.http.app`` wraps a Hub in an aiohttp application,
and the CLI and the tests drive it directly.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gateway import __version__
from gateway.agents.http import AgentClient
from gateway.agents.instances import InstanceRegistry
from gateway.bundle.config import Config, load_config
from gateway.bundle.reload import Reloader
from gateway.containers.backend import ContainerBackend
from gateway.decisionlog import parse_mask_rule
from gateway.decisionlog.log import DecisionLog
from gateway.errors import ConfigError, Degraded, GatewayError, StoreUnavailable
from gateway.health.alerts import Alerts
from gateway.health.monitor import Monitor
from gateway.identity.apikeys import KeyStore
from gateway.identity.service import AgentIdentities
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.routers.messages import MessageOptions, MessageRouter
from gateway.routers.recovery import RecoveryReport, recover
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
        self.hub_id = settings.hub_id
        self.monitor = Monitor(self)
        self.reloader = Reloader(self)
        self.recovered = False
        self._recorded_revisions: tuple[str, str] | None = None
        self.last_recovery: RecoveryReport | None = None
        # Containers running now, their identities (JWT-SVIDs) and the messages between them.
        self.instances = InstanceRegistry()
        self.identities: AgentIdentities
        self.messages: MessageRouter

    # -- lifecycle

    @property
    def backend(self) -> ContainerBackend:
        assert self._backend is not None
        return self._backend

    @property
    def config(self) -> Config:
        """The configuration in force; Degraded (503) while no valid one was ever loaded."""
        if self._config is None:
            raise Degraded(
                "no valid configuration is loaded: "
                + self.degraded_reasons.get("policy", "not started"),
                headers={"Retry-After": "5"},
            )
        return self._config

    async def start(self) -> None:
        """Load files, open the store, reach the container engine, clear leftovers."""
        s = self.settings
        self.store = Store(s.db_path)
        self.alerts.sink = self.store.record_alert
        self.probe_policy()
        try:
            await self.store.ping_write()
        except GatewayError as e:
            # Start degraded (reads, health, status) rather than not at all: the store probe
            # lifts it once the database can be written, and recovery waits until then.
            self.set_cause("store", e.message)
        await self.record_revisions()
        self.decisions = DecisionLog(
            self.store,
            hub_id=s.hub_id,
            metrics=self.metrics,
            masking=[parse_mask_rule(rule) for rule in s.mask],
        )
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
            self.set_cause("container_engine", e.message)
        gateway_host = s.agent_listen_host or self.facts.get("internal_gateway") or s.host
        self.identities = AgentIdentities.create(
            s.state_dir,
            trust_domain=s.trust_domain,
            audience=s.svid_audience,
            ttl_s=s.svid_ttl_s,
            bundles=s.trust_bundles,
            is_active=self.instances.is_active,
        )
        self.instances.minter = self.identities
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
            instances=self.instances,
            subjects=self.keys.subject_of,
        )
        self.messages = MessageRouter(
            config=lambda: self.config,
            instances=self.instances,
            decisions=self.decisions,
            tasks=self.router,
            trust_domain=self.identities.trust_domain,
            options=MessageOptions(
                timeout_s=s.message_timeout_s,
                max_timeout_s=s.max_message_timeout_s,
                max_delegation_depth=s.max_delegation_depth,
            ),
        )
        self.router.dispatch_observer = lambda agent, secs: self.metrics.dispatch_seconds.labels(
            agent
        ).observe(secs)
        if self.can_recover():
            await self.recover()
        self.monitor.start()
        await self.reloader.start()
        self._update_mode_metric()
        log.info("hub started", extra={"hub_id": s.hub_id, "mode": self.mode})

    async def stop(self) -> None:
        """Stop monitors and runners (containers stay for the next start), close the rest."""
        await self.monitor.stop()
        await self.reloader.stop()
        with contextlib.suppress(Exception):
            await self.router.shutdown()
        if hasattr(self, "messages"):
            await self.messages.close()
        await self.agents.close()
        await self.alerts.close()
        if self._backend is not None:
            await self._backend.close()
        await self.store.close()
        # Release the regorus engine here, on its own thread: left to the garbage collector
        # (the hub is full of reference cycles) it may be freed on another one, and leak.
        self._config = None

    def _load(self) -> Config:
        s = self.settings
        return load_config(
            agents_file=s.agents_file, schemas_dir=s.schemas_dir, policies_dir=s.policies_dir
        )

    def can_recover(self) -> bool:
        """Whether restart recovery can run now (once): it needs the engine and the store."""
        return not self.recovered and not {"container_engine", "store"} & set(self.degraded_reasons)

    async def record_revisions(self) -> None:
        """Record the revisions in force in the store (once each; later if it is read-only)."""
        if self._config is None or "store" in self.degraded_reasons:
            return
        key = (self._config.policy_revision, self._config.registry_revision)
        if key == self._recorded_revisions:
            return
        try:
            await self.store.record_policy_revision(key[0], list(self._config.policy.modules))
            await self.store.record_registry(
                key[1], self._config.registry.source, self._config.registry.to_json()
            )
        except StoreUnavailable as e:
            self.set_cause("store", e.message)  # recorded by a later monitor round
            return
        self._recorded_revisions = key

    async def recover(self) -> RecoveryReport | None:
        """Reconcile unfinished tasks with the engine's containers (once per start)."""
        if self._config is None:
            return None
        self.last_recovery = await recover(self)
        self.recovered = True
        return self.last_recovery

    def probe_policy(self) -> None:
        """Load the files if no valid configuration is in force yet (degraded until then)."""
        if self._config is not None:
            return
        try:
            self._config = self._load()
        except ConfigError as e:
            self.set_cause("policy", f"{e.location}: {e.message}" if e.location else e.message)
            return
        self.set_cause("policy", None)

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

    def set_cause(self, cause: str, message: str | None) -> None:
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
            self.set_cause("container_engine", None)
        except GatewayError as e:
            self.set_cause("container_engine", e.message)

    # -- reload and status

    async def reload(self) -> dict[str, Any]:
        """Load, validate and test the files again (gateway.bundle.reload); on any error keep the
        current config, alert, and raise ConfigError."""
        return await self.reloader.reload(trigger="api")

    @property
    def has_config(self) -> bool:
        """Whether a valid configuration is in force."""
        return self._config is not None

    async def install_config(self, new: Config) -> None:
        """Put a loaded, validated and tested config in force (one swap on the loop)."""
        self._config = new
        self.last_reload_error = None
        self.alerts.resolve("reload_failed")
        self.set_cause("policy", None)
        await self.record_revisions()

    def revisions(self) -> dict[str, str]:
        c = self.config
        return {
            "policies": c.policy_revision,
            "schemas": c.schemas_revision,
            "registry": c.registry_revision,
            "combined": c.revision,
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
            "revisions": self.revisions() if self._config else None,
            "tasks": counts,
            "running_tasks": self.router.running,
            "agents": sorted(self.config.registry.agents) if self._config else [],
            "last_recovery": self.last_recovery.to_json() if self.last_recovery else None,
            "last_reload_error": self.last_reload_error,
            "reload": self.reloader.to_json(),
            "alerts": self.alerts.to_json(),
        }
