"""Warm pools: agent containers started, healthy and unassigned before a task needs one.

A cold dispatch waits 300 to 450 ms for a container to be created and started; a warm one
takes a container that answers ``/health`` already. The task router decides a dispatch
exactly as without a pool, then asks ``WarmPools.acquire`` for a container that can run
with *exactly* the sandbox the decision granted:

- same network, no mounts (the guardrails refuse mounts anyway), read-only root;
- memory, CPUs and pids equal to the grant, or larger and tightened on the running
  container (``docker update``, visible in ``docker inspect``) before it is handed out;
- enough TTL left for the task's timeout.

Anything else is a miss and the task starts cold: never a looser sandbox. A warm container
is built by the same guardrails as a task container, under the agent's requested resources,
but carries no identity and no task: its environment has no ``AGENT_SVID`` nor task id
(the token is minted for the task's instance and sent in the ``POST /task`` body), its
labels name the pool (``io.agent-gateway.pool``) instead of a task, and its TTL (the pool's
``idle_s`` plus the agent's timeout and the grace) stops it even if the hub is gone.

Isolation by default: a container runs one task and is removed. With ``reuse: true`` in the
registry *and* ``reuse`` in the dispatch decision, a container that ran a task successfully
goes back to the pool bound to that task's owner, and only that owner's tasks take it again
(up to ``max_tasks``, removed after ``idle_s`` unused).

A container may die or stop answering while it waits (killed, out of memory, the engine
restarted under it): ``acquire`` probes ``/health`` of the container it picked before handing
it out, and on no answer removes it and takes the next one (or starts the task cold), so no
task is given a dead container; ``tick`` re-probes every idle container each ``check_s`` so
the pool replaces the dead ones before a task asks. A removal the engine refused (it is down)
is retried once the hub may refill again, the container still counted as the pool's (not an
orphan) meanwhile.

Refill runs in the background (``tick``): at most ``starts_per_tick`` starts per agent per
round, none while the hub is degraded, and after a failed warm-up (engine error, image not
answering ``/health``) the agent backs off exponentially (1 s doubling to 60 s) with a
``pool_warmup_failed`` alert. An agent entry changed by a reload drains: idle containers of
the old entry go at once, assigned ones when their task ends, and the pool refills with the
new entry. After a hub restart, pooled containers of the previous run are removed by
recovery (unless a task was running in one: it is re-attached like a cold container), since
they were warmed under a registry that may have changed; the pool refills within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.bundle.registry import AgentSpec
from gateway.containers.backend import (
    LABEL_POOL,
    LABEL_TASK,
    ContainerBackend,
    ContainerHandle,
)
from gateway.containers.guardrails import build_spec
from gateway.errors import GatewayError
from gateway.logs import get_logger

log = get_logger(__name__)
# A warm container must outlive the task it gets by this much (s) beyond its timeout.
TTL_MARGIN_S = 5.0
# A live container answers /health at once; a few refused probes this long apart mean dead.
CHECK_RETRY_S = 0.05
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
ALERT = "pool_warmup_failed"


@dataclass(frozen=True)
class PoolSpec:
    """An agent's ``pool:`` entry, validated (``max`` at least ``min``)."""

    min: int = 0
    max: int = 1
    idle_s: float = 300.0
    max_tasks: int = 100

    @classmethod
    def of(cls, agent: AgentSpec) -> PoolSpec:
        raw = dict(agent.pool)
        low = int(raw.get("min", 0))
        return cls(
            min=low,
            max=max(low, int(raw.get("max", max(low, 1)))),
            idle_s=float(raw.get("idle_s", 300.0)),
            max_tasks=int(raw.get("max_tasks", 100)),
        )


@dataclass(frozen=True)
class PoolOptions:
    """What warm containers are built with (the task router's own values)."""

    hub_id: str
    networks: dict[str, str]
    gateway_url: str
    ttl_grace_s: int = 60
    ready_timeout_s: float = 20.0
    starts_per_tick: int = 2
    interval_s: float = 0.5
    # How often an idle container's /health is probed again, and how long a probe may take.
    check_s: float = 1.0
    check_timeout_s: float = 0.5
    # An assigned container that answered its probe this recently is handed the task unprobed.
    fresh_s: float = 1.0


@dataclass
class Warm:
    """One pooled container; ``owner`` is set once it ran a task and may be reused."""

    handle: ContainerHandle
    agent: str
    fingerprint: str
    network: str
    memory_bytes: int
    nano_cpus: int
    pids: int
    expires: float
    state: str = "idle"  # idle | assigned
    owner: str | None = None
    tasks: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    checked: float = field(default_factory=time.monotonic)  # last /health that answered
    checking: bool = False


# Per spec object (a registry's specs are frozen and live until the next reload): the repr
# and hash of a whole spec cost tens of µs, twice on every warm dispatch.
_FINGERPRINTS: dict[int, tuple[AgentSpec, str]] = {}


def fingerprint(agent: AgentSpec) -> str:
    """What a warm container was built from: a changed entry (image, env, limits) drains."""
    cached = _FINGERPRINTS.get(id(agent))
    if cached is not None and cached[0] is agent:
        return cached[1]
    same = dataclasses.replace(agent, line=0, description="", pool=agent.pool)
    value = hashlib.sha256(repr(same).encode()).hexdigest()[:16]
    if len(_FINGERPRINTS) >= 1024:  # specs of registries long replaced
        _FINGERPRINTS.clear()
    _FINGERPRINTS[id(agent)] = (agent, value)
    return value


def warm_sandbox(agent: AgentSpec) -> dict[str, Any]:
    """The sandbox a warm container starts with: what the agent asks for, which a decision
    can only narrow (narrower is applied at assignment, wider is a cold start)."""
    r = agent.resources
    return {
        "network": agent.network,
        "memory_bytes": r.memory_bytes,
        "cpus": r.cpus,
        "pids": r.pids,
        "read_only_root": True,
        "mounts": [],
    }


class WarmPools:
    """The warm pools of one hub, one per agent with ``pool.min`` > 0 (or reusable ones)."""

    def __init__(
        self,
        *,
        backend: ContainerBackend,
        agents: Callable[[], Mapping[str, AgentSpec]],
        wait_ready: Callable[[ContainerHandle, float], Awaitable[None]],
        options: PoolOptions,
        can_refill: Callable[[], bool] = lambda: True,
        alert: Callable[..., None] | None = None,
        resolve: Callable[[str], None] | None = None,
        metrics: Any = None,
    ) -> None:
        if options.starts_per_tick < 1:
            raise ValueError("starts_per_tick must be at least 1")
        self.backend = backend
        self._agents = agents
        self._wait_ready = wait_ready
        self.options = options
        self._can_refill = can_refill
        self._alert = alert
        self._resolve = resolve
        self._metrics = metrics
        self._warm: dict[str, Warm] = {}  # container id -> entry (idle and assigned)
        self._doomed: set[str] = set()  # dropped, but the engine refused the removal
        self._doomed_at = 0.0  # when their removal was last retried
        self._warming: dict[str, int] = {}  # agent -> starts in flight
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.last_warmup_s: dict[str, float] = {}

    # -- the router's side

    async def acquire(
        self,
        agent: AgentSpec,
        sandbox: Mapping[str, Any],
        *,
        owner: str,
        reuse: bool,
        timeout_s: float,
        probe: bool = True,
    ) -> Warm | None:
        """A warm container set to exactly ``sandbox`` and assigned, or None (start cold).

        ``reuse`` (the decision allows it) lets a container that ``owner`` used before be
        taken; without it only a container that never ran a task is. With ``probe`` false
        the caller probes it with ``check`` (overlapping the probe with its own writes).
        """
        if not agent.pool and not agent.reuse:
            return None
        while True:
            picked = self._pick(agent, sandbox, owner=owner, reuse=reuse, timeout_s=timeout_s)
            if picked is None:
                self._count(agent.name, hit=False)
                return None
            if not probe or await self._alive(picked):
                break
        try:
            await self._fit(picked, sandbox)
        except BaseException as e:
            # Could not be tightened (or cancelled meanwhile): never run with more.
            await self._drop(picked)
            if isinstance(e, GatewayError):
                log.warning("warm container not tightened", extra={"error": e.message})
                self._count(agent.name, hit=False)
                return None
            raise
        if probe:
            self._count(agent.name, hit=True)
        self._gauge(agent.name)
        return picked

    async def check(self, w: Warm) -> bool:
        """Probe an assigned container before its hand-off: True (a hit) if it answers;
        else it is removed, never handed out, and the caller places the task again. One that
        answered within ``fresh_s`` is not probed again: a hand-off that then cannot connect
        places the task again all the same (nothing reached the container)."""
        if time.monotonic() - w.checked < self.options.fresh_s:
            self._count(w.agent, hit=True)
            return True
        alive = await self._alive(w)
        if alive:
            self._count(w.agent, hit=True)
        return alive

    def _pick(
        self,
        agent: AgentSpec,
        sandbox: Mapping[str, Any],
        *,
        owner: str,
        reuse: bool,
        timeout_s: float,
    ) -> Warm | None:
        """Mark and return the best candidate (no await: no other dispatch can take it)."""
        network = self.options.networks.get(str(sandbox.get("network")))
        if network is None or sandbox.get("mounts") or sandbox.get("read_only_root") is not True:
            return None
        want = _limits(sandbox)
        if want is None:
            return None
        current = fingerprint(agent)
        now = time.time()
        best: Warm | None = None
        for w in self._warm.values():
            if w.state != "idle" or w.agent != agent.name or w.fingerprint != current:
                continue
            if w.owner is not None and not (reuse and w.owner == owner):
                continue
            if w.network != network or w.expires - now < timeout_s + TTL_MARGIN_S:
                continue
            if want[0] > w.memory_bytes or want[1] > w.nano_cpus or want[2] > w.pids:
                continue  # the grant is wider than the container: cold, with the grant
            # The owner's own container first (it exists to be reused), then the oldest.
            if best is None or (w.owner is not None and best.owner is None):
                best = w
        if best is not None:
            best.state = "assigned"
        return best

    async def _alive(self, w: Warm) -> bool:
        """Probe a picked (assigned) container; a dead one is removed, never handed out."""
        try:
            healthy = await self._healthy(w)
        except BaseException:
            await asyncio.shield(self._drop(w))  # cancelled mid-probe: it served nobody
            raise
        if not healthy:
            log.warning(
                "warm container did not answer at assignment; removed",
                extra={"agent": w.agent, "container": w.handle.name},
            )
            await asyncio.shield(self._drop(w))
        return healthy

    async def _healthy(self, w: Warm) -> bool:
        """A ``/health`` probe: refused or not 200 for ``CHECK_RETRY_S``, or no answer in
        ``check_timeout_s`` (a container gone from the network), is dead."""
        try:
            async with asyncio.timeout(self.options.check_timeout_s):
                await self._wait_ready(w.handle, CHECK_RETRY_S)
        except (GatewayError, TimeoutError):
            return False
        w.checked = time.monotonic()
        return True

    async def _recheck(self, w: Warm) -> None:
        """The periodic probe of an idle container: a dead one is replaced by the refill."""
        w.checking = True
        try:
            healthy = await self._healthy(w)
        finally:
            w.checking = False
        # Taken meanwhile: the assignment probes it itself.
        if not healthy and w.state == "idle" and self._warm.get(w.handle.id) is w:
            log.warning(
                "idle warm container stopped answering; replaced",
                extra={"agent": w.agent, "container": w.handle.name},
            )
            await self._drop(w)

    async def _fit(self, w: Warm, sandbox: Mapping[str, Any]) -> None:
        want = _limits(sandbox)
        assert want is not None
        if want == (w.memory_bytes, w.nano_cpus, w.pids):
            return
        await self.backend.update_limits(
            w.handle.id, memory_bytes=want[0], nano_cpus=want[1], pids_limit=want[2]
        )
        w.memory_bytes, w.nano_cpus, w.pids = want

    async def release(self, w: Warm, *, owner: str | None) -> None:
        """The task in ``w`` ended: keep it for ``owner`` (reuse allowed and the task
        succeeded), else remove it. Never interrupted halfway by a cancellation."""
        agent = self._agents().get(w.agent)
        keep = (
            owner is not None
            and agent is not None
            and agent.reuse
            and w.fingerprint == fingerprint(agent)
            and w.tasks + 1 < PoolSpec.of(agent).max_tasks
            and w.handle.id in self._warm
        )
        if keep:
            w.tasks += 1
            w.owner = owner
            w.state = "idle"
            # It has just answered its task: as good as a /health probe.
            w.idle_since = w.checked = time.monotonic()
            self._gauge(w.agent)
            return
        await asyncio.shield(self._drop(w))

    def forget(self, container_id: str) -> None:
        """Stop tracking a container someone else removes (e.g. recovery)."""
        w = self._warm.pop(container_id, None)
        if w is not None:
            self._gauge(w.agent)

    def owned(self) -> set[str]:
        """Ids of the containers the pools hold (idle, assigned, or still to be removed):
        not orphans."""
        return set(self._warm) | self._doomed

    # -- the background side

    def start(self) -> None:
        """Refill every ``interval_s`` until ``stop``."""
        if self._loop is None and self.options.interval_s > 0:
            self._loop = asyncio.create_task(self._run(), name="warm-pools")

    async def stop(self, *, remove_idle: bool = True) -> None:
        """Stop refilling and wait for warm-ups in flight; remove the idle containers
        (assigned ones stay with their tasks, for the next start to re-attach)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        if self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
        if remove_idle:
            idle = [w for w in self._warm.values() if w.state == "idle"]
            doomed, self._doomed = list(self._doomed), set()
            await asyncio.gather(
                *(self._drop(w) for w in idle),
                *(self._remove(cid, agent=None) for cid in doomed),
                return_exceptions=True,
            )

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("warm pool round failed")
            await asyncio.sleep(self.options.interval_s)

    async def tick(self) -> None:
        """One round: drain stale entries, re-probe idle ones, start what is missing."""
        agents = self._agents()
        self._sweep(agents)
        if not self._can_refill():
            return
        if self._doomed and time.monotonic() - self._doomed_at >= self.options.check_s:
            self._doomed_at = time.monotonic()
            for cid in list(self._doomed):
                self._doomed.discard(cid)
                self._spawn(self._remove(cid, agent=None))
        for agent in agents.values():
            spec = PoolSpec.of(agent)
            if spec.min <= 0 or agent.protocol != "gateway":
                continue
            if time.monotonic() < self._retry_at.get(agent.name, 0.0):
                continue
            current = fingerprint(agent)
            fresh = sum(
                1
                for w in self._warm.values()
                if w.agent == agent.name
                and w.state == "idle"
                and w.owner is None
                and w.fingerprint == current
            )
            total = sum(1 for w in self._warm.values() if w.agent == agent.name)
            warming = self._warming.get(agent.name, 0)
            need = min(
                spec.min - fresh - warming,
                spec.max - total - warming,
                self.options.starts_per_tick - warming,
            )
            for _ in range(max(0, need)):
                self._warming[agent.name] = self._warming.get(agent.name, 0) + 1
                self._spawn(self._warm_one(agent, spec))

    def _sweep(self, agents: Mapping[str, AgentSpec]) -> None:
        """Drop idle entries that are stale, and re-probe those not checked for ``check_s``."""
        now_m, now = time.monotonic(), time.time()
        for w in list(self._warm.values()):
            if w.state != "idle":
                continue
            agent = agents.get(w.agent)
            spec = PoolSpec.of(agent) if agent is not None else None
            stale = (
                agent is None
                or w.fingerprint != fingerprint(agent)
                or now_m - w.idle_since > spec.idle_s  # type: ignore[union-attr]
                or w.expires - now < agent.timeout_s + TTL_MARGIN_S
            )
            if stale:
                self._spawn(self._drop(w))
            elif not w.checking and now_m - w.checked >= self.options.check_s:
                self._spawn(self._recheck(w))

    def _spawn(self, coro: Awaitable[None]) -> None:
        job = asyncio.ensure_future(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _warm_one(self, agent: AgentSpec, spec: PoolSpec) -> None:
        started = time.monotonic()
        handle: ContainerHandle | None = None
        try:
            cspec = self._spec(agent, spec)
            handle = await self.backend.start(cspec)
            await self._wait_ready(handle, self.options.ready_timeout_s)
        except (GatewayError, asyncio.CancelledError) as e:
            if handle is not None:
                with contextlib.suppress(GatewayError):
                    await asyncio.shield(self.backend.remove(handle.id))
            if isinstance(e, asyncio.CancelledError):
                raise
            self._failed(agent.name, e.message)
            return
        finally:
            self._warming[agent.name] = self._warming.get(agent.name, 1) - 1
        elapsed = time.monotonic() - started
        self.last_warmup_s[agent.name] = elapsed
        if self._metrics is not None:
            self._metrics.pool_warmup_seconds.labels(agent.name).observe(elapsed)
        if self._failures.pop(agent.name, None) and self._resolve is not None:
            self._resolve(ALERT)
        self._retry_at.pop(agent.name, None)
        self._warm[handle.id] = Warm(
            handle=handle,
            agent=agent.name,
            fingerprint=fingerprint(agent),
            network=cspec.network,
            memory_bytes=cspec.memory_bytes,
            nano_cpus=cspec.nano_cpus,
            pids=cspec.pids_limit,
            expires=time.time() + cspec.ttl_s,
        )
        self._gauge(agent.name)

    def _failed(self, agent: str, message: str) -> None:
        n = self._failures[agent] = self._failures.get(agent, 0) + 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (n - 1))
        self._retry_at[agent] = time.monotonic() + delay
        log.warning("warm-up failed", extra={"agent": agent, "error": message, "retry_in_s": delay})
        if self._alert is not None:
            self._alert(
                ALERT,
                f"agent {agent}: warm container failed to start ({message}); retry in {delay:g} s",
                agent=agent,
            )

    def _spec(self, agent: AgentSpec, spec: PoolSpec) -> Any:
        o = self.options
        built = build_spec(
            agent=agent,
            sandbox=warm_sandbox(agent),
            task_id="pool",
            hub_id=o.hub_id,
            networks=o.networks,
            timeout_s=spec.idle_s + agent.timeout_s,
            ttl_grace_s=o.ttl_grace_s,
            gateway_url=o.gateway_url,
        )
        # No task, so no task id in its env or labels: those come with the task.
        env = {k: v for k, v in built.env.items() if k != "AGENT_TASK_ID"}
        labels = {k: v for k, v in built.labels.items() if k != LABEL_TASK}
        return dataclasses.replace(
            built,
            name=f"agw-{agent.name}-pool-{secrets.token_hex(4)}",
            env=env,
            labels={**labels, LABEL_POOL: agent.name},
        )

    async def _drop(self, w: Warm) -> None:
        self._warm.pop(w.handle.id, None)
        self._gauge(w.agent)
        await self._remove(w.handle.id, agent=w.agent)

    async def _remove(self, cid: str, *, agent: str | None) -> None:
        try:
            await self.backend.remove(cid)
        except GatewayError as e:
            # The engine is down or busy: retried by a later round, not left to the orphan scan.
            self._doomed.add(cid)
            log.warning(
                "could not remove warm container; will retry",
                extra={"agent": agent, "container": cid[:12], "error": e.message},
            )

    # -- visibility

    def _count(self, agent: str, *, hit: bool) -> None:
        counts = self.hits if hit else self.misses
        counts[agent] = counts.get(agent, 0) + 1
        if self._metrics is not None:
            self._metrics.pool_dispatches.labels(agent, "hit" if hit else "miss").inc()

    def _gauge(self, agent: str) -> None:
        if self._metrics is None:
            return
        for state, n in self._sizes(agent).items():
            self._metrics.pool_containers.labels(agent, state).set(n)

    def _sizes(self, agent: str) -> dict[str, int]:
        entries = [w for w in self._warm.values() if w.agent == agent]
        return {
            "idle": sum(1 for w in entries if w.state == "idle" and w.owner is None),
            "reusable": sum(1 for w in entries if w.state == "idle" and w.owner is not None),
            "assigned": sum(1 for w in entries if w.state == "assigned"),
            "warming": self._warming.get(agent, 0),
        }

    def to_json(self) -> dict[str, Any]:
        """Each pool: its spec, its containers by state, hits, misses, last warm-up."""
        agents = self._agents()
        names = sorted(
            {n for n, a in agents.items() if a.pool or a.reuse}
            | {w.agent for w in self._warm.values()}
        )
        out: dict[str, Any] = {}
        for name in names:
            agent = agents.get(name)
            out[name] = {
                "spec": dataclasses.asdict(PoolSpec.of(agent)) if agent else None,
                "containers": self._sizes(name),
                "hits": self.hits.get(name, 0),
                "misses": self.misses.get(name, 0),
                "last_warmup_s": round(self.last_warmup_s[name], 3)
                if name in self.last_warmup_s
                else None,
                "failures": self._failures.get(name, 0),
            }
        return out


def _limits(sandbox: Mapping[str, Any]) -> tuple[int, int, int] | None:
    try:
        return (
            int(sandbox["memory_bytes"]),
            int(float(sandbox["cpus"]) * 1e9),
            int(sandbox["pids"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
