"""The hub: composes config, store, decision log, container backend and routers.

Nothing here knows about HTTP; ``gateway.http.app`` wraps a Hub in an aiohttp application,
and the CLI and the tests drive it directly. The hub is the wiring and nothing more: each
part gets its section of the settings and the objects and callables it needs, and none of
them imports the hub. ``start`` runs named steps; each step registers what ``stop`` must
close, and ``stop`` closes them in reverse (aiohttp's ``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from gateway import __version__
from gateway.agents.http import AgentClient
from gateway.agents.instances import InstanceRegistry
from gateway.agents.mcp_pool import McpServerPool
from gateway.bundle.config import Config, load_config
from gateway.bundle.reload import Reloader, config_revisions
from gateway.clock import iso_utc
from gateway.cluster import ClusterHooks, Membership
from gateway.containers.backend import ContainerBackend
from gateway.containers.guardrails import build_spec
from gateway.containers.pools import PoolOptions, WarmPools
from gateway.decisionlog import parse_mask_rule
from gateway.decisionlog.log import DecisionLog
from gateway.errors import ConfigError, Degraded, StoreUnavailable
from gateway.health.alerts import Alerts
from gateway.health.modes import ENGINE, POLICY, STORE, Modes
from gateway.health.monitor import Monitor
from gateway.identity.apikeys import KeyStore, Subject
from gateway.identity.service import AgentIdentities
from gateway.limits import NO_LIMITS, Limiter
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.routers.access import ApiAuthorizer
from gateway.routers.events import PROGRESS, STATE, TaskEvents
from gateway.routers.messages import MessageRouter
from gateway.routers.recovery import RecoveryReport, cluster_strays, recover, take_over
from gateway.routers.tasks import RouterOptions, TaskRouter
from gateway.routers.tools import ToolRouter
from gateway.settings import Settings
from gateway.store import TaskStore, open_store

log = get_logger(__name__)
# Expired Idempotency-Keys are pruned at most this often (s), or every half TTL if shorter.
KEY_PRUNE_EVERY_S = 60.0


class Hub:
    """One running gateway: its state, its configuration generation and its routers."""

    def __init__(self, settings: Settings, *, backend: ContainerBackend | None = None) -> None:
        self.settings = settings
        self.hub_id = settings.hub_id
        self.metrics = Metrics()
        self.alerts = Alerts(
            hub_id=settings.hub_id, metrics=self.metrics, webhook_url=settings.alert_webhook_url
        )
        self.modes = Modes(alerts=self.alerts, gauge=self.metrics.mode)
        self.keys = KeyStore.load(settings.effective_keys_file)
        self.agents = AgentClient()
        # Containers running now and their identities (JWT-SVIDs).
        self.instances = InstanceRegistry()
        # State changes and agent progress, fanned out to the task event streams.
        self.events = TaskEvents()
        # Quotas and rate limits (limits.yaml), checked by the doors before any policy.
        self.limiter = Limiter(
            limits=lambda: self._config.limits if self._config is not None else NO_LIMITS,
            pending_of=lambda subject: self.router.quotas.pending_of(subject),
            observe=self.metrics.observe_rate_limited,
            # In a cluster each hub enforces its share of every rate and quota.
            share=lambda: self.cluster.live_hubs() if self.cluster is not None else 1,
        )
        self._last_key_prune = -float("inf")
        self.facts: dict[str, str] = {}  # what the engine told us (internal_gateway...)
        self.recovered = False
        self.last_recovery: RecoveryReport | None = None
        self._backend = backend
        self._config: Config | None = None
        self._recorded_revisions: tuple[str, str] | None = None
        self._cleanup = contextlib.AsyncExitStack()
        # Made by start():
        self.store: TaskStore
        self.decisions: DecisionLog
        self.identities: AgentIdentities
        self.router: TaskRouter
        self.messages: MessageRouter
        self.tools: ToolRouter
        self.pools: WarmPools
        self.access: ApiAuthorizer
        self.monitor: Monitor
        self.reloader: Reloader
        # On a PostgreSQL store: this hub's part in the cluster of hubs sharing it.
        self.cluster: Membership | None = None
        self._directory_jobs: set[asyncio.Task[None]] = set()
        # Unfinished tasks of this hub that no runner drove at the last round (resume_lost_runs).
        self._unrun: set[str] = set()

    @property
    def backend(self) -> ContainerBackend:
        assert self._backend is not None
        return self._backend

    @property
    def config(self) -> Config:
        """The configuration in force; Degraded (503) while no valid one was ever loaded."""
        if self._config is None:
            raise Degraded(
                "no valid configuration is loaded: " + self.modes.causes.get(POLICY, "not started"),
                headers={"Retry-After": "5"},
            )
        return self._config

    @property
    def has_config(self) -> bool:
        """Whether a valid configuration is in force."""
        return self._config is not None

    @property
    def mode(self) -> str:
        """``normal`` or ``degraded`` (``hub.modes`` has the causes and the override)."""
        return self.modes.mode

    @property
    def degraded_reasons(self) -> Mapping[str, str]:
        """Each cause of degraded mode that holds, with its message."""
        return self.modes.causes

    # -- lifecycle

    async def start(self) -> None:
        """Open the store, load the policy, reach the engine, recover, start the monitors.

        A store, engine or policy that is not there leaves the hub degraded, not down.
        """
        self._cleanup.callback(self._release_config)
        try:
            await self._open_store()
            await self._load_policy()
            await self._open_decision_log()
            await self._connect_engine()
            self._make_identities()
            self._make_routers()
            await self._join_cluster()
            await self.recover()
            await self._start_monitors()
        except BaseException:
            await self._cleanup.aclose()
            raise
        log.info("hub started", extra={"hub_id": self.hub_id, "mode": self.modes.mode})

    async def stop(self) -> None:
        """Stop monitors and runners (containers stay for the next start), close the rest."""
        await self._cleanup.aclose()

    async def _open_store(self) -> None:
        self.store = open_store(self.settings.store_target)
        self._cleanup.push_async_callback(self.store.close)
        self.alerts.sink = self.store.record_alert
        # Closed before the store: alerts still being delivered are written to it.
        self._cleanup.push_async_callback(self.alerts.close)
        # Unwritable, the hub starts degraded (reads, health, status) rather than not at all:
        # the store probe lifts it once the database can be written; recovery waits for it.
        await self.probe_store()

    async def _load_policy(self) -> None:
        await self.probe_policy()
        await self.record_revisions()

    async def _open_decision_log(self) -> None:
        s = self.settings
        self.decisions = DecisionLog(
            self.store,
            hub_id=s.hub_id,
            metrics=self.metrics,
            masking=[parse_mask_rule(rule) for rule in s.mask],
        )
        await self.decisions.start()
        # Before the store closes: records written without waiting (allowed reads) land.
        self._cleanup.push_async_callback(self.decisions.flush)

    async def _connect_engine(self) -> None:
        s = self.settings
        if self._backend is None and s.containers.backend == "swarm":
            from gateway.containers.swarm import SwarmBackend

            c = s.containers
            self._backend = SwarmBackend(
                internal_network=c.internal_network,
                egress_network=c.egress_network,
                agent_port=s.port,
                agent_address=s.agent_listen_host,
                workers=c.docker_workers,
                secrets_file=c.secrets_file,
            )
        if self._backend is None:
            from gateway.containers.docker import DockerBackend

            c = s.containers
            self._backend = DockerBackend(
                internal_network=c.internal_network,
                egress_network=c.egress_network,
                agent_port=s.port,
                agent_address=s.agent_listen_host,
                workers=c.docker_workers,
                secrets_file=c.secrets_file,
            )
        # Looked up when stopping, not now: whoever owns the backend may have replaced close.
        self._cleanup.push_async_callback(lambda: self.backend.close())
        await self.probe_engine()

    def _make_identities(self) -> None:
        i = self.settings.identity
        self.identities = AgentIdentities.create(
            self.settings.state_dir,
            trust_domain=i.trust_domain,
            audience=i.audience,
            ttl_s=i.ttl_s,
            bundles=i.bundles,
            is_active=self.instances.is_active,
            recovering=lambda: not self.recovered,
        )
        self.instances.minter = self.identities

    def _make_routers(self) -> None:
        s = self.settings
        gateway_host = s.agent_listen_host or self.facts.get("internal_gateway") or s.host
        self.router = TaskRouter(
            config=lambda: self.config,
            store=self.store,
            backend=self.backend,
            agents=self.agents,
            decisions=self.decisions,
            options=RouterOptions(
                hub_id=s.hub_id,
                networks=s.containers.networks,
                gateway_url=f"http://{gateway_host}:{s.port}",
                ttl_grace_s=s.containers.ttl_grace_s,
                max_running=s.containers.max_running,
                idempotency_ttl_s=s.idempotency_ttl_s,
                backend=s.containers.backend,
                shared_store=getattr(self.store, "cluster", None) is not None,
            ),
            can_dispatch=self.modes.blocker,
            instances=self.instances,
            subjects=self.keys.subject_of,
        )
        self.router.quotas.running_limit = self._running_limit
        self.router.state_observer = lambda task_id, state, final: self.events.publish(
            task_id, STATE, {"state": state}, final=final
        )
        self.router.progress_observer = lambda task_id, data: self.events.publish(
            task_id, PROGRESS, data
        )
        # Warm containers, asked by the router after the decision (gateway.containers.pools);
        # refilled only once recovery has run (it removes the last run's pooled containers).
        self.pools = WarmPools(
            backend=self.backend,
            agents=lambda: self._config.registry.agents if self._config is not None else {},
            wait_ready=self.agents.wait_ready,
            options=PoolOptions(
                hub_id=s.hub_id,
                networks=s.containers.networks,
                gateway_url=self.router.options.gateway_url,
                ttl_grace_s=s.containers.ttl_grace_s,
                ready_timeout_s=self.router.options.ready_timeout_s,
            ),
            can_refill=lambda: self.recovered and self.modes.blocker() is None,
            alert=self.alerts.raise_alert,
            resolve=self.alerts.resolve,
            metrics=self.metrics,
        )
        self.router.pool = self.pools
        self.router.dispatch_observer = lambda agent, secs: self.metrics.dispatch_seconds.labels(
            agent
        ).observe(secs)
        self.messages = MessageRouter(
            config=lambda: self.config,
            instances=self.instances,
            decisions=self.decisions,
            tasks=self.router,
            trust_domain=self.identities.trust_domain,
            options=s.messages,
        )
        self.access = ApiAuthorizer(
            config=lambda: self.config, decisions=self.decisions, log_reads=s.log_api_reads
        )
        # MCP servers behind the hub (protocol: mcp): hardened like any agent container.
        self.tools = ToolRouter(
            config=lambda: self.config,
            decisions=self.decisions,
            pool=McpServerPool(
                backend=lambda: self.backend,
                spec_for=lambda agent, sandbox, call_id, lifetime_s: build_spec(
                    agent=agent,
                    sandbox=sandbox,
                    task_id=call_id,
                    hub_id=s.hub_id,
                    networks=s.containers.networks,
                    timeout_s=lifetime_s,
                    ttl_grace_s=s.containers.ttl_grace_s,
                    gateway_url=self.router.options.gateway_url,
                ),
            ),
        )
        self._cleanup.push_async_callback(self.tools.pool.close)
        self._cleanup.push_async_callback(self.agents.close)
        self._cleanup.push_async_callback(self.messages.close)
        self._cleanup.push_async_callback(self._shutdown_router)

    def _running_limit(self, subject: Subject) -> int | None:
        if self._config is None:
            return None
        running = self._config.limits.for_subject(subject.id, subject.roles).running
        return self.limiter.per_hub(running) if running is not None else None

    async def _join_cluster(self) -> None:
        """On a store several hubs share: lease the tasks this hub creates, beat, hold the
        singletons, take over dead hubs' tasks, trust the peers' keys, share the instances."""
        tables = getattr(self.store, "cluster", None)
        if tables is None:
            return  # SQLite: one hub
        s = self.settings
        self.store.lease = (self.hub_id, s.lease_s)  # type: ignore[attr-defined]
        ids = self.identities
        self.cluster = Membership(
            tables,
            self.hub_id,
            f"http://{s.host}:{s.port}",
            ClusterHooks(
                info=lambda: {"mode": self.modes.mode, "revisions": self._revisions_or_none()},
                take_over=self._take_over,
                own_jwks=ids.issuer.jwks,
                trust_keys=ids.trust_peer_keys,
                remote_instances=self.instances.set_remote,
                trust_domain=ids.trust_domain,
                ready=lambda: self.recovered and not self.modes.holds(STORE, ENGINE),
            ),
            lease_s=s.lease_s,
            beat_s=s.lease_s / 5,
        )
        ids.issuer.on_rotate(lambda: self._in_background(self.cluster.publish_keys()))  # type: ignore[union-attr]
        self.instances.on_ready(
            lambda i: self._in_background(
                tables.open_instance(
                    self.hub_id,
                    {
                        "instance_id": i.instance_id,
                        "task_id": i.task_id,
                        "agent": i.agent,
                        "owner": i.subject.id,
                        "url": i.handle.base_url if i.handle else None,
                        "lineage": [e.to_json() for e in i.lineage],
                    },
                )
            )
        )
        self.instances.on_close(lambda i: self._in_background(tables.close_instance(i.instance_id)))
        await self.cluster.start()
        self._cleanup.push_async_callback(self.cluster.stop)

    def _in_background(self, job: Awaitable[Any]) -> None:
        """A directory or key write that must not hold up the task that caused it; a
        failure is logged (peers learn within a beat what they missed)."""

        async def run() -> None:
            try:
                await job
            except Exception as e:
                log.warning("cluster write failed", extra={"error": str(e)})

        task = asyncio.create_task(run())
        self._directory_jobs.add(task)
        task.add_done_callback(self._directory_jobs.discard)

    async def _take_over(self, claims: list[tuple[str, str]]) -> None:
        if self._config is None:
            return
        report = await take_over(
            claims,
            router=self.router,
            backend=self.backend,
            store=self.store,
            registry=self._config.registry,
            settings=self.settings.recovery,
        )
        self.alerts.raise_alert(
            "hub_takeover",
            f"took over {len(claims)} task(s) of hub(s) whose lease expired",
            hubs=",".join(sorted({h for _, h in claims})),
            **{k: str(v) for k, v in report.to_json().items()},
        )

    def _revisions_or_none(self) -> dict[str, str] | None:
        return config_revisions(self._config) if self._config is not None else None

    async def _start_monitors(self) -> None:
        s = self.settings
        self.monitor = Monitor(
            probes=[
                self.probe_store,
                self.probe_engine,
                self.probe_policy,
                self.record_revisions,
                self.prune_idempotency_keys,
                self.resume_lost_runs,
            ],
            recover=self.recover,
            modes=self.modes,
            store=self.store,
            backend=self.backend,
            alerts=self.alerts,
            hub_id=self.hub_id,
            settings=s.monitor,
            owned=lambda: {*self.tools.pool.container_ids(), *self.pools.owned()},
            leads=self.cluster.leads if self.cluster is not None else (lambda name: True),
            peers=self._peers,
        )
        self.reloader = Reloader(
            files=s.bundle,
            current=lambda: self._config,
            install=self.install_config,
            recent_inputs=self._recent_inputs,
            alerts=self.alerts,
        )
        self._cleanup.push_async_callback(self.reloader.stop)
        self._cleanup.push_async_callback(self.monitor.stop)
        self.monitor.start()
        self._cleanup.push_async_callback(self.pools.stop)
        self.pools.start()
        await self.reloader.start()

    def _peers(self) -> dict[str, bool]:
        # The elected orphan scan judges every hub's containers against the shared store.
        if self.cluster is None:
            return {}
        hubs = self.cluster.status()["hubs"]
        return {h["id"]: h["alive"] for h in hubs if h["id"] != self.hub_id}

    async def _shutdown_router(self) -> None:
        # Runners detach and their containers stay for the next start; a runner that fails
        # to must not keep the rest from closing.
        with contextlib.suppress(Exception):
            await self.router.shutdown()

    def _release_config(self) -> None:
        # Release the regorus engine here, on its own thread: left to the garbage collector
        # (the hub is full of reference cycles) it may be freed on another one, and leak.
        self._config = None

    # -- probes (run at start and by the monitor every round)

    async def probe_store(self) -> None:
        """Degraded while the database cannot be written (disk full, read-only file)."""
        await self.modes.probe(STORE, self.store.ping_write)

    async def probe_engine(self) -> None:
        """Re-check the container engine and leave or enter degraded mode accordingly."""
        await self.modes.probe(ENGINE, self._reach_engine)

    async def _reach_engine(self) -> None:
        await self.backend.ping()
        if not self.facts:  # not prepared yet (networks, the address agents call back on)
            self.facts = await self.backend.prepare()

    async def probe_policy(self) -> None:
        """Load the files if no valid configuration is in force yet (degraded until then)."""
        if self._config is not None:
            return
        b = self.settings.bundle
        try:
            self._config = load_config(
                agents_file=b.agents_file,
                schemas_dir=b.schemas_dir,
                policies_dir=b.policies_dir,
                limits_file=b.limits_file,
            )
        except ConfigError as e:
            self.modes.set_cause(POLICY, f"{e.location}: {e.message}" if e.location else e.message)
            return
        self.modes.set_cause(POLICY, None)

    async def prune_idempotency_keys(self) -> int:
        """Delete expired Idempotency-Keys (a monitor probe, at most once a minute); how many.

        Expired keys stop replaying at once (the router ignores them); this only frees rows.
        """
        ttl = self.settings.idempotency_ttl_s
        now = time.monotonic()
        if self.modes.holds(STORE) or now - self._last_key_prune < min(KEY_PRUNE_EVERY_S, ttl / 2):
            return 0
        self._last_key_prune = now
        try:
            return await self.store.prune_idempotency(iso_utc(time.time() - ttl))
        except StoreUnavailable as e:
            self.modes.set_cause(STORE, e.message)  # the store probe lifts it
            return 0

    async def resume_lost_runs(self) -> list[str]:
        """Reconcile again (re-attach or re-dispatch) this hub's unfinished tasks that no
        runner drives, seen so at two rounds in a row; their ids.

        A runner that cannot record a step or the end (the store went away under it) stops,
        and its task would wait forever: in a cluster this hub keeps renewing its lease.
        Two rounds, so that a task just created, or just claimed, has its runner by then.
        """
        if not self.recovered or self._config is None or self.modes.holds(STORE, ENGINE):
            return []
        if self.cluster is not None and self.cluster.taking_over():
            return []
        tables = getattr(self.store, "cluster", None)
        try:
            mine = await (
                tables.owned_active(self.hub_id)
                if tables is not None
                else self.store.active_task_ids()
            )
            unrun = {task_id for task_id in mine if not self.router.drives(task_id)}
            lost, self._unrun = sorted(unrun & self._unrun), unrun - self._unrun
            if lost:
                log.warning("resuming tasks no runner drives", extra={"tasks": len(lost)})
                await take_over(
                    [(task_id, self.hub_id) for task_id in lost],
                    router=self.router,
                    backend=self.backend,
                    store=self.store,
                    registry=self._config.registry,
                    settings=self.settings.recovery,
                    keep={*self.tools.pool.container_ids(), *self.pools.owned()},
                )
        except StoreUnavailable as e:
            # Gone again: the tasks not resumed yet are still without a runner next time.
            self.modes.set_cause(STORE, e.message)
            return []
        return lost

    async def record_revisions(self) -> None:
        """Record the revisions in force in the store (once each; later if it is read-only)."""
        if self._config is None or self.modes.holds(STORE):
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
            self.modes.set_cause(STORE, e.message)  # recorded by a later monitor round
            return
        self._recorded_revisions = key

    async def recover(self) -> RecoveryReport | None:
        """Reconcile unfinished tasks with the engine's containers, once per start, as soon
        as a config, the store and the engine are there; None until then."""
        if self.recovered or self._config is None or self.modes.holds(STORE, ENGINE):
            return None
        self.last_recovery = await recover(
            router=self.router,
            backend=self.backend,
            store=self.store,
            registry=self._config.registry,
            hub_id=self.hub_id,
            alerts=self.alerts,
            settings=self.settings.recovery,
            pools=self.pools,
            owned=(
                (lambda: tables.owned_active(self.hub_id))
                if (tables := getattr(self.store, "cluster", None)) is not None
                else None
            ),
            strays=(
                (lambda: cluster_strays(self.backend, tables, self.hub_id))
                if tables is not None
                else None
            ),
        )
        self.recovered = True
        return self.last_recovery

    # -- reload and status

    async def reload(self) -> dict[str, str]:
        """Load, validate and test the files again (gateway.bundle.reload); on any error keep the
        current config, alert, and raise ConfigError."""
        return await self.reloader.reload(trigger="api")

    async def install_config(self, new: Config) -> None:
        """Put a loaded, validated and tested config in force (one swap on the loop)."""
        self._config = new
        self.modes.set_cause(POLICY, None)
        await self.record_revisions()

    async def _recent_inputs(self, kind: str, limit: int) -> list[dict[str, Any]]:
        page, _ = await self.decisions.list(kind=kind, limit=limit)
        return page

    def revisions(self) -> dict[str, str]:
        """The revisions in force (Degraded while no config is)."""
        return config_revisions(self.config)

    async def status(self) -> dict[str, Any]:
        """What an operator wants at a glance (without the task counts while the store is
        down: why the hub is degraded is what matters then)."""
        counts: dict[str, int] | None
        try:
            counts = await self.store.count_tasks_by_state()
        except StoreUnavailable as e:
            self.modes.set_cause(STORE, e.message)
            counts = None
        for state, n in (counts or {}).items():
            self.metrics.tasks.labels(state).set(n)
        self.metrics.containers_running.set(self.router.running)
        return {
            "hub_id": self.hub_id,
            "version": __version__,
            "mode": self.modes.mode,
            "forced_mode": self.modes.forced,
            "degraded_reasons": dict(self.modes.causes),
            "revisions": self.revisions() if self._config else None,
            "tasks": counts,
            "running_tasks": self.router.running,
            "agents": sorted(self.config.registry.agents) if self._config else [],
            "last_recovery": self.last_recovery.to_json() if self.last_recovery else None,
            "last_reload_error": self.reloader.last_error,
            "reload": self.reloader.to_json(),
            "alerts": self.alerts.to_json(),
            "pools": self.pools.to_json(),
            "cluster": self.cluster.status() if self.cluster is not None else None,
        }
