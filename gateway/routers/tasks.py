"""The task router: validate, decide, start a container, hand over the task, record the end.

No HTTP here: the web layer calls ``submit``, ``get``, ``list``, ``cancel`` and
``wait_for``, and tests drive the same methods directly. Each task's life after acceptance
runs in one asyncio task owned by this router; the store's guarded transitions make sure a
task reaches exactly one terminal state even when timeout, cancel and completion race.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.agents import Accepted, AgentClient, AgentReplyError
from gateway.agents.a2a import A2AAgents
from gateway.agents.instances import Instance, InstanceRegistry, LineageEntry
from gateway.bundle.config import TASK_SCHEMA, Config
from gateway.bundle.registry import AgentSpec
from gateway.clock import iso_utc
from gateway.containers.backend import LABEL_INSTANCE, ContainerBackend, ContainerHandle
from gateway.containers.guardrails import build_spec
from gateway.containers.pools import Warm, WarmPools
from gateway.decisionlog.masking import SecretPointers
from gateway.decisionlog.sink import DecisionSink
from gateway.errors import (
    AgentTimeout,
    AgentUnreachable,
    BadRequest,
    Degraded,
    GatewayError,
    GuardrailUnenforceable,
    GuardrailViolation,
    IdempotencyConflict,
    InvalidState,
    PolicyDenied,
    SchemaViolation,
    StoreUnavailable,
)
from gateway.identity.apikeys import Subject
from gateway.identity.service import SVID_ENV
from gateway.ids import traceparent, uuid4_hex, uuid4_str
from gateway.limits.quotas import SubjectQuotas
from gateway.logs import bound, get_logger
from gateway.policy.engine import DISPATCH_QUERY, Decision
from gateway.store import ACTIVE_STATES, SealedDecision, Store, Task

log = get_logger(__name__)
DISPATCH_PATH = "gateway/dispatch/decision"
# The history a task placed in a warm container at submission is created with.
PLACED_STATES = ("pending", "dispatched", "running")


@dataclass(frozen=True)
class RouterOptions:
    hub_id: str
    networks: dict[str, str]
    gateway_url: str
    ttl_grace_s: int = 60
    max_running: int = 16
    ready_timeout_s: float = 20.0
    idempotency_ttl_s: float | None = None  # None: Idempotency-Keys never expire
    # Which container backend runs tasks (``input.backend`` of the dispatch policy: on
    # "swarm" the sandbox says which guardrail equivalents it accepts).
    backend: str = "docker"
    # Several hubs share the store (PostgreSQL): a task's end may be recorded by another.
    shared_store: bool = False


def request_hash(envelope: Any) -> str:
    """Stable hash of a request body, for Idempotency-Key matching."""
    return hashlib.sha256(
        json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclass
class _Run:
    """What one run of a task holds, for whichever way it ends."""

    instance: Instance | None = None
    handle: ContainerHandle | None = None
    warm: Warm | None = None
    keep_for: str | None = None  # the owner a reusable warm container goes back to
    # Placed at submission: the probe of its warm container, still to be awaited.
    probe: asyncio.Future[bool] | None = None
    # The pool had no container for it at submission (counted as a miss): start cold.
    missed: bool = False


class _PlaceAgain(Exception):
    """The run's warm container could not be reached before the hand-off: place it again."""


class _EndedElsewhere(Exception):
    """The task's end was recorded by another hub (its agent reported there)."""


@dataclass
class _Done:
    """Set when a task ends; ``task`` is the terminal task when its runner recorded it."""

    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: Task | None = None


class TaskRouter:
    """Owns task dispatch from submission to terminal state."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: Store,
        backend: ContainerBackend,
        agents: AgentClient,
        decisions: DecisionSink,
        options: RouterOptions,
        can_dispatch: Callable[[], str | None] = lambda: None,
        instances: InstanceRegistry | None = None,
        subjects: Callable[[str | None, str], Subject] | None = None,
    ) -> None:
        self._config = config
        # (key id, subject id) -> the subject with its key's current roles: how a task
        # resumed after a restart gets its submitter back (KeyStore.subject_of).
        self._subjects = subjects or (lambda key_id, sid: Subject(sid, (), key_id or ""))
        self.store = store
        self.backend = backend
        self.agents = agents
        self.decisions = decisions
        self.options = options
        self._can_dispatch = can_dispatch
        self._slots = asyncio.Semaphore(options.max_running)
        # Each subject's pending and running tasks, and its ``running`` quota (limits.yaml).
        self.quotas = SubjectQuotas()
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, _Done] = {}
        self._removals: set[asyncio.Task[None]] = set()
        self._detaching = False
        # Live containers and their identities; results reported later by agents (202).
        self.instances = instances if instances is not None else InstanceRegistry()
        self._reports: dict[str, asyncio.Future[Any]] = {}
        # The config each running task was accepted under: a reload must not change the
        # contract (e.g. the output schema) of a task already in flight.
        self._accepted_under: dict[str, Config] = {}
        self.dispatch_observer: Callable[[str, float], None] | None = None
        # Warm containers (gateway.containers.pools), asked after the decision; None: cold.
        self.pool: WarmPools | None = None
        # Whether each accepted task's decision lets its container serve its owner again.
        self._reuse: dict[str, bool] = {}
        # Told (task id, state, terminal) after each state a task enters (events fan-out).
        self.state_observer: Callable[[str, str, bool], None] | None = None
        # Told (task id, data) for each update an A2A agent streams (events fan-out).
        self.progress_observer: Callable[[str, dict[str, Any]], None] | None = None
        # protocol: a2a agents (gateway.agents.a2a), and each running task's traceparent.
        self.a2a = A2AAgents()
        self._traces: dict[str, str] = {}

    # -- submission

    async def submit(
        self,
        subject: Subject,
        envelope: Any,
        *,
        request: dict[str, Any],
        idempotency_key: str | None = None,
        parent: Instance | None = None,
        records: list[SealedDecision] | None = None,
    ) -> tuple[Task, bool]:
        """Accept a task or raise; returns (task, created). Nothing starts unless allowed.

        ``parent`` is the instance delegating this task (its child runs in its lineage).
        ``records`` (e.g. the API decision that allowed the call) are appended with the task
        in its one write; the list is emptied once they are written, and left as it was if
        no task was written (the caller then writes them itself).
        """
        config = self._config()
        config.schemas.validate(TASK_SCHEMA, envelope, what="task")
        # One trace across hops: the caller's, or one started here (W3C trace context).
        request = {**request, "traceparent": traceparent(request.get("traceparent"))}
        req_hash = request_hash(envelope)
        keys_since = self._keys_since()
        if idempotency_key is not None:
            existing = await self.store.task_for_key(
                subject.id, idempotency_key, req_hash, since=keys_since
            )
            if existing is not None:
                return existing, False
        reason = self._can_dispatch()
        if reason is not None:
            raise Degraded(f"not accepting new tasks: {reason}", headers={"Retry-After": "5"})

        if "agent" in envelope:
            candidates = [config.registry.get(envelope["agent"])]
            if candidates[0].protocol == "mcp":
                raise BadRequest(
                    f"agent {candidates[0].name!r} is an MCP server: call its tools at /mcp",
                    details={"tools": [f"{candidates[0].name}.{t}" for t in candidates[0].tools]},
                )
        else:
            candidates = config.registry.with_capability(envelope["capability"])

        task_id = uuid4_str()
        first_error: GatewayError | None = None
        for agent in candidates:
            try:
                sealed, sandbox = await self._decide(
                    config, subject, envelope, agent, task_id, request
                )
            except (SchemaViolation, PolicyDenied) as e:
                first_error = first_error or e
                continue
            timeout_s = float(envelope.get("timeout_s") or agent.timeout_s)
            row = {
                "id": task_id,
                "agent": agent.name,
                "capability": envelope.get("capability"),
                "subject": subject.id,
                "key_id": subject.key_id,
                "input": envelope["input"],
                "timeout_s": timeout_s,
                "deadline": time.time() + timeout_s,
                "decision_id": sealed.decision_id,
                "sandbox": sandbox,
                "labels": envelope.get("labels"),
                "attempts": 0,
                "idempotency_key": idempotency_key,
                "parent_id": parent.task_id if parent else None,
            }
            idem = (subject.id, idempotency_key, req_hash) if idempotency_key else None
            lineage = parent.child_lineage() if parent else ()
            placed = await self._place_at_submit(row, agent, sandbox, subject, parent is None)
            warm = placed is not None and placed.warm is not None
            creating = asyncio.ensure_future(
                self.store.create_task(
                    row,
                    idem,
                    keys_since=keys_since,
                    decisions=[*(records or ()), sealed],
                    states=PLACED_STATES if warm else ("pending",),
                )
            )
            try:
                if placed is not None and placed.warm is not None:
                    await asyncio.sleep(0)  # the write is queued: it commits while this mints
                    placed.instance = self.instances.open(
                        agent=agent.name,
                        task_id=task_id,
                        subject=subject,
                        lineage=lineage,
                        fresh_id=row["instance_id"],
                    )
                task, created = await creating
            except IdempotencyConflict:
                await self._unplace(placed, task_id)
                # Nothing was written (the transaction rolled back): the decision was made
                # all the same, and the log has every decision.
                await self.decisions.append(sealed)
                raise
            except BaseException:
                # The write may still commit (the writer thread finishes it): such a task,
                # running without a runner, is resumed by ``Hub.resume_lost_runs``.
                await self._unplace(placed, task_id)
                raise
            if records:
                records.clear()
            if created:
                with bound(task_id=task_id, decision_id=sealed.decision_id, agent=agent.name):
                    log.info("dispatch allowed", extra={"dispatch": row.get("dispatch")})
                self._accepted_under[task_id] = config
                self._traces[task_id] = request["traceparent"]
                self._start_runner(
                    task, agent, sandbox, subject=subject, lineage=lineage, placed=placed
                )
                for state in PLACED_STATES if warm else ("pending",):
                    self._observe(task_id, state)
            else:
                await self._unplace(placed, task_id)
            return task, created
        assert first_error is not None
        raise first_error

    async def _place_at_submit(
        self,
        row: dict[str, Any],
        agent: AgentSpec,
        sandbox: dict[str, Any],
        subject: Subject,
        top_level: bool,
    ) -> _Run | None:
        """Place a task in a warm container before it is created, so that it is created
        running: one write instead of a create and a move, with the container's probe
        under it. Only when a quota slot is free now (it is reserved for the runner) and a
        warm container takes exactly the granted sandbox; None: the runner places it (a run
        with ``missed`` set: the pool had none, so the runner starts it cold).

        ``row`` gets the placement (instance, container, ``dispatch``). A delegated child
        (not ``top_level``) is placed by its runner: it waits on its parent's slot.
        """
        task_id = row["id"]
        if self.pool is None or not top_level or not (agent.pool or agent.reuse):
            return None
        if not await self.quotas.reserve(task_id, subject, self._slots):
            return None
        try:
            warm = await self.pool.acquire(
                agent,
                sandbox,
                owner=subject.id,
                reuse=self._reuse.get(task_id, False),
                timeout_s=float(row["timeout_s"]),
                probe=False,
            )
        except BaseException:
            self.quotas.unreserve(task_id)
            raise
        if warm is None:
            self.quotas.unreserve(task_id)
            return _Run(missed=True)  # counted: the runner does not ask again
        row.update(
            instance_id=uuid4_hex(),
            container_id=warm.handle.id,
            container_name=warm.handle.name,
            dispatch="warm",
        )
        # Probed while the task is written; the runner acts on the answer.
        probe = asyncio.ensure_future(self.pool.check(warm))
        return _Run(handle=warm.handle, warm=warm, probe=probe)

    async def _unplace(self, placed: _Run | None, task_id: str) -> None:
        """A placement whose task was not created: its slot, identity and container go."""
        if placed is None or placed.warm is None:
            return
        self.quotas.unreserve(task_id)
        if placed.instance is not None:
            self.instances.close(placed.instance)
        assert placed.probe is not None
        alive = False
        with contextlib.suppress(Exception):
            alive = await asyncio.shield(placed.probe)
        if alive:  # assigned, never handed anything: it goes (a dead one went already)
            await self._release(placed.warm, None)

    def _keys_since(self) -> str | None:
        """When the oldest Idempotency-Key still in force was recorded (RFC 3339)."""
        ttl = self.options.idempotency_ttl_s
        return iso_utc(time.time() - ttl) if ttl is not None else None

    async def _decide(
        self,
        config: Config,
        subject: Subject,
        envelope: dict[str, Any],
        agent: AgentSpec,
        task_id: str,
        request: dict[str, Any],
    ) -> tuple[SealedDecision, dict[str, Any]]:
        """Validate the input and decide; a denial is logged and raised, an allowed
        decision comes back sealed, for ``create_task`` to append."""
        config.schemas.validate(
            agent.input_schema, envelope["input"], prefix="/input", what=f"input for {agent.name}"
        )
        policy_input = {
            "subject": subject.to_json(),
            "task": {**envelope, "id": task_id},
            "agent": agent.to_json(),
            "request": request,
            "backend": self.options.backend,
        }
        decision = config.policy.evaluate(DISPATCH_QUERY, policy_input)
        sandbox: dict[str, Any] | None = None
        if decision.allow:
            try:
                # Build (and so check) the spec now so an unenforceable grant is a deny.
                sandbox = decision.sandbox
                spec = self._spec(agent, sandbox, task_id, float(envelope.get("timeout_s") or 1))
                # A backend that cannot enforce every guardrail (Swarm) says so now: the
                # dispatch is denied with the reason, not failed after acceptance.
                enforceable = getattr(self.backend, "enforceable", None)
                if enforceable is not None:
                    enforceable(spec)
            except (GuardrailViolation, GuardrailUnenforceable) as e:
                decision = Decision(
                    allow=False,
                    reasons=(f"guardrails refused the sandbox: {e}",),
                    sandbox=decision.sandbox,
                    error="guardrails",
                    eval_ns=decision.eval_ns,
                    raw=decision.raw,
                )
        record = {
            "kind": "dispatch",
            "path": DISPATCH_PATH,
            "input": policy_input,
            "decision": decision,
            "revision": config.revision,
            "subject": subject.id,
            "agent": agent.name,
            "task_id": task_id,
            "secret_pointers": _secret_pointers(config, agent),
        }
        if not decision.allow:
            decision_id = await self.decisions.record(**record)
            with bound(task_id=task_id, decision_id=decision_id, agent=agent.name):
                log.info("dispatch denied", extra={"reasons": list(decision.reasons)})
            raise PolicyDenied(
                f"policy denied the task: {'; '.join(decision.reasons)}",
                details={"reasons": list(decision.reasons), "agent": agent.name},
                decision_id=decision_id,
            )
        # An allowed decision is appended by the write that creates its task: one commit,
        # and no task without its record (nor a record of a task that was never accepted).
        sealed = self.decisions.prepare(**record)
        assert sandbox is not None
        self._reuse[task_id] = decision.extra.get("reuse") is True
        return sealed, sandbox

    def _spec(
        self,
        agent: AgentSpec,
        sandbox: Any,
        task_id: str,
        timeout_s: float,
        env: dict[str, str] | None = None,
    ) -> Any:
        return build_spec(
            agent=agent,
            sandbox=sandbox,
            task_id=task_id,
            hub_id=self.options.hub_id,
            networks=self.options.networks,
            timeout_s=timeout_s,
            ttl_grace_s=self.options.ttl_grace_s,
            gateway_url=self.options.gateway_url,
            extra_env=env,
        )

    # -- the life of one task

    def _start_runner(
        self,
        task: Task,
        agent: AgentSpec,
        sandbox: dict[str, Any],
        attach_to: str | None = None,
        *,
        subject: Subject | None = None,
        lineage: tuple[LineageEntry, ...] | None = None,
        instance: Instance | None = None,
        placed: _Run | None = None,
    ) -> None:
        self._done[task.id] = _Done()
        if placed is not None:
            # Made before the hand-off, as ``_place`` does: a report waits for the runner.
            self._expect_report(task.id)
            instance = placed.instance
        runner = asyncio.create_task(
            self._run(
                task,
                agent,
                sandbox,
                attach_to,
                subject=subject,
                lineage=lineage,
                instance=instance,
                placed=placed,
            ),
            name=f"task-{task.id}",
        )
        self._runners[task.id] = runner
        self.quotas.enter(task.id, task.subject or "")
        runner.add_done_callback(lambda _: self._forget(task.id, instance))

    def _forget(self, task_id: str, opened: Instance | None = None) -> None:
        self._runners.pop(task_id, None)
        self._accepted_under.pop(task_id, None)
        self._reuse.pop(task_id, None)
        self._traces.pop(task_id, None)
        self.quotas.leave(task_id)
        if (
            opened is not None
            and not self._detaching
            and self.instances.get(opened.instance_id) is opened
        ):
            # A runner cancelled before its first step never reached its ``finally``: the
            # instance opened for it (by reattach) must not outlive it.
            self._reports.pop(task_id, None)
            self.instances.close(opened)

    def _expect_report(self, task_id: str) -> asyncio.Future[Any]:
        """The future a reported result of ``task_id`` goes to, made once per run.

        Made before the container starts (or is re-attached), so a report that arrives
        before the task is handed over (again) waits for the runner instead of being refused.
        """
        report = self._reports.get(task_id)
        if report is None:
            report = self._reports[task_id] = asyncio.get_running_loop().create_future()
        return report

    async def _run(
        self,
        task: Task,
        agent: AgentSpec,
        sandbox: dict[str, Any],
        attach_to: str | None = None,
        *,
        subject: Subject | None = None,
        lineage: tuple[LineageEntry, ...] | None = None,
        instance: Instance | None = None,
        placed: _Run | None = None,
    ) -> None:
        """Drive one task to a terminal state; ``attach_to`` resumes in a running container.

        Without ``subject`` and ``lineage`` (a task resumed after a restart) both are
        restored: the submitter's current roles from the keys file, the lineage from the store.
        ``instance`` is one ``reattach`` opened already (its container holds the token);
        ``placed``, the warm placement made at submission (``_place_at_submit``).
        The phases: restore, place (attach, warm or cold), execute (ready, hand over,
        result); every exit winds the run up (revoke, release or remove, signal).
        """
        task_id = task.id
        run = placed if placed is not None else _Run(instance=instance)
        start = time.monotonic()
        timeout_s = float(task.timeout_s)
        with bound(task_id=task_id, decision_id=task.decision_id, agent=agent.name):
            try:
                subject, lineage = await self._restore(task, subject, lineage)
                async with asyncio.timeout(max(0.0, task.deadline - time.time())):
                    # A re-attached container runs already; a delegated child's parent
                    # holds a slot and waits for it: neither waits for the subject's quota.
                    bypass = attach_to is not None or task.parent_id is not None
                    async with self.quotas.slot(task_id, subject, self._slots, bypass=bypass):
                        await self._probed(run, task_id)
                        while True:
                            if run.handle is None:
                                await self._place(
                                    run, task, agent, sandbox, attach_to, subject, lineage
                                )
                            if await self._executed(run, task, agent, attach_to, subject, start):
                                break  # else its warm container was gone: another, or cold
            except (TimeoutError, AgentTimeout):
                # Either clock may fire first (the task's deadline, or the HTTP read timeout
                # set to the same deadline); both mean the agent ran out of time.
                await self._finish(
                    task_id,
                    "timed_out",
                    error={"code": "agent_timeout", "message": f"no result within {timeout_s:g} s"},
                )
            except asyncio.CancelledError:
                await self._abandon(run, task_id)
                raise
            except _EndedElsewhere:
                self._signal(task_id)  # another hub recorded the reported result
            except StoreUnavailable as e:
                # A step (or the end) could not be recorded: failing the task for it would
                # lose an accepted task to an outage. It stays as it is, without a runner,
                # and the hub reconciles it once the store answers (Hub.resume_lost_runs).
                log.warning("task runner stopped: store unavailable", extra={"error": e.message})
            except GatewayError as e:
                await self._finish(task_id, "failed", error=e.to_json()["error"])
            except Exception as e:
                log.exception("task runner crashed")
                await self._finish(
                    task_id, "failed", error={"code": "internal_error", "message": type(e).__name__}
                )
            finally:
                await self._wind_up(run, task_id)

    async def _probed(self, run: _Run, task_id: str) -> None:
        """A run placed at submission: its container's probe answered, or (the pool removed
        the container) the task goes back to pending, to be placed again."""
        if run.probe is None:
            return
        probe, run.probe = run.probe, None
        if await probe:
            return
        assert run.warm is not None
        gone, run.warm, run.handle = run.warm, None, None
        await self._move(
            task_id,
            "pending",
            ("running",),
            detail=f"warm container {gone.handle.name} did not answer: placed again",
        )

    async def _restore(
        self,
        task: Task,
        subject: Subject | None,
        lineage: tuple[LineageEntry, ...] | None,
    ) -> tuple[Subject, tuple[LineageEntry, ...]]:
        """The task's subject and lineage; restored from the keys and the store when unknown."""
        if subject is None:
            subject = self._subjects(task.key_id, task.subject or "")
        if lineage is None:
            # Restored so the depth limit and lineage rules hold across a restart.
            lineage = tuple(
                LineageEntry(tid, name) for tid, name in await self.store.ancestors(task.id)
            )
        return subject, lineage

    async def _place(
        self,
        run: _Run,
        task: Task,
        agent: AgentSpec,
        sandbox: dict[str, Any],
        attach_to: str | None,
        subject: Subject,
        lineage: tuple[LineageEntry, ...],
    ) -> None:
        """Give the run its identity and its container: re-attached, warm or cold."""
        task_id = task.id
        self._expect_report(task_id)
        if attach_to is not None:
            # A re-attached container keeps its own token: the instance it names comes back.
            if run.instance is None:
                run.instance = self.instances.open(
                    agent=agent.name,
                    task_id=task_id,
                    subject=subject,
                    lineage=lineage,
                    instance_id=task.instance_id,
                )
            run.handle = await self.backend.attach(attach_to, agent.port)
            # The crash may have come before the id was recorded.
            await self.store.update_task(
                task_id, container_id=run.handle.id, container_name=run.handle.name
            )
            return
        if (
            self.pool is not None
            and not run.missed
            and await self._place_warm(run, task, agent, sandbox, subject, lineage)
        ):
            return
        # The identity exists before the container, so the container starts with its token;
        # closing the instance revokes it.
        if run.instance is None:
            run.instance = self.instances.open(
                agent=agent.name, task_id=task_id, subject=subject, lineage=lineage
            )
        run.handle = await self._start_cold(task, agent, sandbox, run.instance)

    async def _place_warm(
        self,
        run: _Run,
        task: Task,
        agent: AgentSpec,
        sandbox: dict[str, Any],
        subject: Subject,
        lineage: tuple[LineageEntry, ...],
    ) -> bool:
        """Take a warm container for the run, if one fits; whether it did. The run's
        identity is minted at assignment (a warm container has none before)."""
        assert self.pool is not None
        while True:
            # Policy first (decided at submit), then the pool: a warm container only with
            # exactly the sandbox granted.
            warm = await self.pool.acquire(
                agent,
                sandbox,
                owner=subject.id,
                reuse=self._reuse.get(task.id, False),
                timeout_s=max(0.0, task.deadline - time.time()),
                probe=False,
            )
            if warm is None:
                return False
            instance_id = run.instance.instance_id if run.instance else uuid4_hex()
            # One write takes the task through dispatched to running, the instance and
            # container with it, while the token is minted and the container probed: all
            # before the hand-off.
            moving = asyncio.ensure_future(
                self._move(
                    task.id,
                    "running",
                    ("pending",),
                    via="dispatched",
                    instance_id=instance_id,
                    container_id=warm.handle.id,
                    container_name=warm.handle.name,
                    dispatch="warm",
                    # Nobody is answered on this write alone: it is committed without an
                    # fsync of its own, and the result's commit makes it durable. A crash
                    # before leaves the task pending, to run again (at least once, as a
                    # crash between any hand-off and its result does).
                    durable=False,
                )
            )
            try:
                await asyncio.sleep(0)  # the write is queued: it commits while this mints
                if run.instance is None:
                    run.instance = self.instances.open(
                        agent=agent.name,
                        task_id=task.id,
                        subject=subject,
                        lineage=lineage,
                        fresh_id=instance_id,
                    )
                alive = await self.pool.check(warm)
            finally:
                # Whatever the probe did, the write is not left running on its own.
                await asyncio.wait({moving})
            if moving.cancelled() or moving.exception() is not None:
                if alive:  # assigned, never handed anything: it goes
                    await self._release(warm, None)
                moving.result()  # a cancel that ended the task meanwhile stops the run
            if alive:
                run.warm, run.handle = warm, warm.handle
                return True
            # Dead before its hand-off (the pool removed it): the task never reached it.
            await self._move(
                task.id,
                "pending",
                ("running",),
                detail=f"warm container {warm.handle.name} did not answer: placed again",
            )

    async def _execute(
        self,
        run: _Run,
        task: Task,
        agent: AgentSpec,
        attach_to: str | None,
        subject: Subject,
        start: float,
    ) -> None:
        """Wait for the agent, hand the task over, record the result."""
        task_id = task.id
        handle, instance = run.handle, run.instance
        assert handle is not None and instance is not None
        card = None
        if agent.protocol == "a2a":
            # An A2A server has no /health: its card, checked, is the probe.
            card = await self.a2a.ready_card(handle, agent, self.options.ready_timeout_s)
        elif run.warm is None:
            # A warm container answered /health before it was pooled.
            await self.agents.wait_ready(handle, self.options.ready_timeout_s)
        self.instances.ready(instance, handle)
        if run.warm is None and (task.state != "running" or attach_to is None):
            await self._move(task_id, "running", ("dispatched",))
        if self.dispatch_observer:
            self.dispatch_observer(agent.name, time.monotonic() - start)
        if card is not None:
            reply = await self.a2a.run(
                handle,
                card,
                task_id=task_id,
                task_input=task.input,
                timeout_s=max(0.001, task.deadline - time.time()),
                traceparent=self.trace_of(task_id),
                progress=lambda data: self._progress(task_id, data),
            )
        else:
            # A warm container had no identity: its token comes with the task.
            svid = instance.env.get(SVID_ENV) if run.warm is not None else None
            try:
                reply = await self._hand_over(task, agent, handle, svid=svid)
            except AgentUnreachable:
                if run.warm is None:
                    raise
                await self._replace_warm(run, task)
                raise _PlaceAgain from None
        succeeded = await self._complete(task_id, agent, reply)
        if run.warm is not None and succeeded and self._reuse.get(task_id):
            run.keep_for = subject.id
        # Let a caller waiting for the end answer before the clean-up, which is not theirs
        # (here, not in the clean-up: a cancel during this yield still winds the run up).
        await asyncio.sleep(0)

    async def _executed(
        self,
        run: _Run,
        task: Task,
        agent: AgentSpec,
        attach_to: str | None,
        subject: Subject,
        start: float,
    ) -> bool:
        """``_execute``; False when the run must be placed again (see ``_replace_warm``)."""
        try:
            await self._execute(run, task, agent, attach_to, subject, start)
        except _PlaceAgain:
            return False
        return True

    async def _replace_warm(self, run: _Run, task: Task) -> None:
        """A warm container unprobed (fresh) turned out gone: the task never reached it.
        It is removed and the task goes back to pending, to be placed again."""
        assert run.warm is not None
        gone, run.warm, run.handle = run.warm, None, None
        self._reports.pop(task.id, None)
        await self._release(gone, None)
        await self._move(
            task.id,
            "pending",
            ("running",),
            detail=f"warm container {gone.handle.name} did not answer: placed again",
        )

    async def _abandon(self, run: _Run, task_id: str) -> None:
        """A cancelled run. By cancel() (which recorded the state) its container goes; by
        shutdown it stays, to be re-attached by the next start (or end at its TTL)."""
        if run.instance is not None and not self._detaching:
            self.instances.close(run.instance)
        if run.warm is not None and not self._detaching:
            await self._release(run.warm, None)
        elif run.handle is not None and (not self._detaching or await self._ended(task_id)):
            await self._remove_soon(run.handle)
        run.handle = run.warm = None

    async def _wind_up(self, run: _Run, task_id: str) -> None:
        """Whatever ended the run: revoke its identity, release or remove its container."""
        report = self._reports.pop(task_id, None)
        if report is not None and report.done() and not report.cancelled():
            report.exception()  # a result that lost the race: retrieved, not logged
        if run.instance is not None and not self._detaching:
            # Revoked before removal: the token dies with the task, not after.
            self.instances.close(run.instance)
        if run.warm is not None:
            await self._release(run.warm, run.keep_for)
        elif run.handle is not None:
            await self._remove_soon(run.handle)
        self._signal(task_id)

    async def _start_cold(
        self, task: Task, agent: AgentSpec, sandbox: dict[str, Any], instance: Instance
    ) -> ContainerHandle:
        """Start a container for the task, its instance id stored before it exists."""
        spec = self._spec(agent, sandbox, task.id, float(task.timeout_s), instance.env)
        # Recovery tells this attempt's container from one a killed hub left half-created
        # for an earlier attempt by this label.
        spec = dataclasses.replace(
            spec, labels={**spec.labels, LABEL_INSTANCE: instance.instance_id}
        )
        # The instance id (bound into the token) is stored before the container exists: a
        # hub killed right after start() re-attaches it under the identity its token names.
        await self._move(task.id, "dispatched", ("pending",), instance_id=instance.instance_id)
        handle = await self._started(task.id, self.backend.start(spec))
        await self.store.update_task(
            task.id, container_id=handle.id, container_name=handle.name, dispatch="cold"
        )
        return handle

    async def _started(self, task_id: str, starting: Any) -> ContainerHandle:
        """Await a container start that a cancellation cannot cut in two.

        The engine call runs on a worker thread that a cancelled await does not stop: the
        container would be created (or started) anyway and left to the orphan scan. So a
        cancel waits for the call to end and removes what it made, unless the hub is
        shutting down (then the container stays for recovery).
        """
        job = asyncio.ensure_future(starting)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            if self._detaching:
                # Shutting down: what the engine makes is re-attached (running) or removed
                # (created, never started) by recovery at the next start.
                raise
            with contextlib.suppress(BaseException):
                await self._remove_soon(await asyncio.shield(job))
            raise

    async def _release(self, warm: Warm, owner: str | None) -> None:
        """Give a warm container back to the pool (kept for ``owner``, or removed)."""
        assert self.pool is not None
        job = asyncio.ensure_future(self.pool.release(warm, owner=owner))
        self._removals.add(job)
        job.add_done_callback(self._removals.discard)
        await asyncio.shield(job)

    async def _hand_over(
        self, task: Task, agent: AgentSpec, handle: ContainerHandle, *, svid: str | None = None
    ) -> Any:
        """POST the task to the agent; its answer, or the result it reports through the hub.

        An agent may answer 202 and report later (``POST /v1/tasks/{id}/result``), or report
        while its answer is still on the way: whichever comes first is the result. The
        task's deadline (the caller's timeout) bounds both.
        """
        task_id = task.id
        report = self._expect_report(task_id)
        post = asyncio.ensure_future(
            self.agents.post(
                handle,
                agent.endpoint,
                {"task_id": task_id, "input": task.input, "deadline": task.deadline}
                | ({"svid": svid} if svid else {})
                | ({"traceparent": trace} if (trace := self.trace_of(task_id)) else {}),
                max(0.001, task.deadline - time.time()),
            )
        )
        try:
            await asyncio.wait({post, report}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not post.done():
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError, GatewayError):
                    await post
        if report.done():
            return report.result()
        reply = post.result()
        if not isinstance(reply, Accepted):
            return reply
        if not self.options.shared_store:
            return await report
        # In a cluster the agent may report to another hub, which records the end in the
        # shared store: look there too, once a second.
        elsewhere = asyncio.ensure_future(self._ended_in_store(task_id))
        try:
            await asyncio.wait({report, elsewhere}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            elsewhere.cancel()
        if report.done():
            return report.result()
        raise _EndedElsewhere(task_id)

    async def _ended_in_store(self, task_id: str) -> None:
        # Polling, not an event: the end is written by another process.
        while True:
            if (await self.store.get_task(task_id)).terminal:
                return
            await asyncio.sleep(1.0)

    def trace_of(self, task_id: str) -> str | None:
        """The W3C traceparent of a running task (None after a restart: not stored)."""
        return self._traces.get(task_id)

    def _progress(self, task_id: str, data: dict[str, Any]) -> None:
        if self.progress_observer is not None:
            self.progress_observer(task_id, data)

    async def _complete(self, task_id: str, agent: AgentSpec, reply: Any) -> bool:
        """Record the agent's reply as the task's end; whether it succeeded."""
        if not isinstance(reply, dict) or "output" not in reply:
            await self._finish(
                task_id,
                "failed",
                error={"code": "agent_protocol", "message": "agent reply has no 'output'"},
            )
            return False
        output = reply["output"]
        config = self._accepted_under.get(task_id) or self._config()
        errors = config.schemas.errors(agent.output_schema, output, "/output")
        if errors:
            await self._finish(
                task_id,
                "failed",
                error={
                    "code": "output_schema_violation",
                    "message": f"agent output does not match {agent.output_schema}",
                    "details": errors,
                },
            )
            return False
        await self._finish(task_id, "succeeded", result=output)
        return True

    async def _move(
        self,
        task_id: str,
        state: str,
        allowed: tuple[str, ...],
        *,
        via: str | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> None:
        try:
            await self.store.transition(
                task_id, state, allowed_from=allowed, via=via, durable=durable, **fields
            )
        except InvalidState:
            # Someone (cancel) ended the task first; stop working on it.
            raise asyncio.CancelledError from None
        if via is not None:
            self._observe(task_id, via)
        self._observe(task_id, state)

    async def _finish(self, task_id: str, state: str, **fields: Any) -> None:
        ended: Task | None = None
        try:
            ended = await self.store.transition(
                task_id, state, allowed_from=ACTIVE_STATES, **fields
            )
            log.info("task finished", extra={"state": state})
        except InvalidState:
            pass  # already terminal (e.g. cancelled while the agent answered)
        else:
            self._observe(task_id, state)
        self._signal(task_id, ended)

    def _observe(self, task_id: str, state: str) -> None:
        if self.state_observer is not None:
            self.state_observer(task_id, state, state not in ACTIVE_STATES)

    async def _ended(self, task_id: str) -> bool:
        """Whether the store has the task in a terminal state (its container is done)."""
        try:
            task = await asyncio.shield(self.store.get_task(task_id))
        except Exception:
            return False
        return task.terminal

    async def _remove_soon(self, handle: ContainerHandle) -> None:
        """Remove the container in a task of its own that a cancellation cannot interrupt."""
        removal = asyncio.create_task(self._remove(handle))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
        await asyncio.shield(removal)

    async def _remove(self, handle: ContainerHandle) -> None:
        self.agents.forget(handle)
        try:
            await self.backend.remove(handle.id)
        except GatewayError as e:
            log.warning(
                "could not remove container", extra={"container": handle.name, "error": e.message}
            )

    async def record_report(self, task_id: str, agent: AgentSpec, body: dict[str, Any]) -> Task:
        """Record a result reported for a task another hub of the cluster runs, as its
        runner would (output schema, then the guarded end); the task as it now is."""
        if "error" in body:
            err = body["error"]
            failure = AgentReplyError(
                f"agent reported an error: {err.get('message') or err.get('code')}",
                status=202,
                agent_error=err,
            )
            await self._finish(task_id, "failed", error=failure.to_json()["error"])
        else:
            await self._complete(task_id, agent, body)
        return await self.store.get_task(task_id)

    def deliver_report(self, task_id: str, body: dict[str, Any]) -> None:
        """Hand ``{"output"}`` or ``{"error"}`` reported by the agent to the task's runner.

        InvalidState when the task is not waiting for one (it ended, or was answered already).
        """
        report = self._reports.get(task_id)
        if report is None or report.done():
            raise InvalidState(f"task {task_id} is not waiting for a reported result")
        if "error" in body:
            err = body["error"]
            report.set_exception(
                AgentReplyError(
                    f"agent reported an error: {err.get('message') or err.get('code')}",
                    status=202,
                    agent_error=err,
                )
            )
        else:
            report.set_result(body)

    def _signal(self, task_id: str, ended: Task | None = None) -> None:
        done = self._done.pop(task_id, None)
        if done is not None:
            # The terminal task as its transition wrote it: waiters need not read it back.
            done.task = done.task or ended
            done.event.set()

    # -- recovery after a restart

    async def reattach(self, task: Task, agent: AgentSpec, container_id: str) -> None:
        """Resume a task whose container still runs: hand the task over again (agents
        answer a repeated task id with the one result) and record the outcome.

        The instance is back in the registry, under the id the container's token names,
        when this returns (before the hub listens): the container's calls verify at once,
        and a result it reports again is taken.
        """
        log.info("re-attaching", extra={"task_id": task.id, "container": container_id})
        try:
            subject = self._subjects(task.key_id, task.subject or "")
            lineage = tuple(
                LineageEntry(tid, name) for tid, name in await self.store.ancestors(task.id)
            )
        except Exception:
            # The runner tries again, and fails the task with the reason if it cannot.
            log.exception("could not restore the re-attached task's subject or lineage")
            self._start_runner(task, agent, task.sandbox or {}, attach_to=container_id)
            return
        instance = self.instances.open(
            agent=agent.name,
            task_id=task.id,
            subject=subject,
            lineage=lineage,
            instance_id=task.instance_id,
        )
        self._expect_report(task.id)
        self._start_runner(
            task,
            agent,
            task.sandbox or {},
            attach_to=container_id,
            subject=subject,
            lineage=lineage,
            instance=instance,
        )

    async def redispatch(self, task: Task, agent: AgentSpec, reason: str) -> None:
        """Start a task again from pending (its container never ran it, or is gone)."""
        attempts = int(task.attempts or 0) + 1
        if task.state != "pending":
            task = await self.store.transition(
                task.id,
                "pending",
                allowed_from=("dispatched", "running"),
                detail=reason,
                attempts=attempts,
                container_id=None,
                container_name=None,
            )
        else:
            await self.store.update_task(task.id, attempts=attempts)
        log.info("re-dispatching", extra={"task_id": task.id, "reason": reason})
        self._start_runner(task, agent, task.sandbox or {})

    async def end(self, task_id: str, state: str, error: dict[str, Any]) -> None:
        """Put a task that cannot go on in a terminal state (used by recovery)."""
        await self._finish(task_id, state, error=error)

    # -- queries and control

    async def get(self, task_id: str) -> Task:
        """One task with its history; UnknownTask when absent. Who may see it is the API
        policy's to decide (``gateway.routers.access``), before this is called."""
        return await self.store.get_task(task_id)

    async def list(
        self, *, subject: str | None = None, **filters: Any
    ) -> tuple[list[Task], int | None]:
        """A page of tasks newest first, of ``subject`` only when given; (tasks, next cursor)."""
        return await self.store.list_tasks(subject=subject, **filters)

    async def wait_for(self, task_id: str, timeout_s: float) -> Task:
        """The task (with its history) once it is terminal or ``timeout_s`` has passed.

        At once for ``timeout_s`` 0 or a task this router does not run (e.g. ended).
        """
        done = self._done.get(task_id)
        if done is not None and timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await done.event.wait()
            if done.task is not None:
                return done.task
        return await self.store.get_task(task_id)

    async def cancel(self, task_id: str, by: str) -> Task:
        """Cancel an active task and stop its container; InvalidState if it already ended.

        ``by`` (who asked) goes into the task's history; the API policy decided that they may.
        """
        task = await self.get(task_id)
        if task.terminal:
            raise InvalidState(f"task {task_id} already ended ({task.state})")
        await self.store.transition(
            task_id, "cancelled", allowed_from=ACTIVE_STATES, detail=f"cancelled by {by}"
        )
        self._observe(task_id, "cancelled")
        runner = self._runners.get(task_id)
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._signal(task_id)
        return await self.store.get_task(task_id)

    async def shutdown(self) -> None:
        """Stop every runner, leaving tasks and their containers for the next start."""
        self._detaching = True
        runners = list(self._runners.values())
        for runner in runners:
            runner.cancel()
        for runner in runners:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        self._accepted_under.clear()  # configs (regorus engines) go now, on this thread
        await self.a2a.close()

    @property
    def running(self) -> int:
        return len(self._runners)

    def drives(self, task_id: str) -> bool:
        """Whether a runner of this router is driving ``task_id`` now."""
        return task_id in self._runners


_SECRETS = SecretPointers()


def _secret_pointers(config: Config, agent: AgentSpec) -> list[str]:
    """Where a dispatch input holds the fields the agent's input schema marks x-secret."""
    return list(_SECRETS.of(config.schemas.documents, agent.input_schema, "/task/input"))
