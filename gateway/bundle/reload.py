"""Hot reload: watch policies/, schemas/, agents.yaml and limits.yaml, and let a change in
only once it is proven good.

A change is (1) compiled and validated (``load_config``: every schema against the 2020-12
metaschema, agents.yaml against its schema, every Rego module, the decision rules evaluated
once), (2) checked against the inputs of the most recent logged decisions, where a rule
conflict that only some inputs reach would show, and (3) the policy tests are run, as
``agent-gateway policy test`` runs them in CI. The policy's compiled fast path
(``gateway.policy.fast``) is cross-checked against the Engine on the inputs of (2) and of
the tests; a difference turns it off for the revision (the reload still goes in). Only
then is the new ``Config`` swapped in; on any failure the last good one stays in force, an
alert is raised and ``/v1/status`` shows the error with its file:line.

The swap is one assignment on the event-loop thread. A request reads ``hub.config`` once and
keeps that snapshot (the task router keeps it for the task's whole life), so a reload never
changes the rules under an in-flight request. regorus engines are bound to the thread that
made them, so the new engine is compiled on the loop thread (tens of ms); git and the file
hashing run in worker threads, and so do the policy tests, whose throwaway engines live and
die in that one thread.

The watcher polls a content hash (``gateway.bundle.revision.content_hash``) every
``Settings.reload_poll_s`` seconds: no inotify dependency, and it sees edits made through
any path (editors that replace files, git checkouts, bind mounts).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from gateway.bundle.config import Config, file_revisions, load_config
from gateway.bundle.revision import content_hash
from gateway.clock import utcnow
from gateway.errors import ConfigError, GatewayError, PolicyTestsFailed
from gateway.logs import get_logger
from gateway.policy.engine import (
    API_QUERY,
    DISPATCH_QUERY,
    HUB_QUERIES,
    MESSAGES_QUERY,
    TOOLS_QUERY,
    parse_engine_error,
)
from gateway.policy.testing import TestReport, run_tests
from gateway.settings import BundleSettings

log = get_logger(__name__)

# How many of the latest logged inputs of each kind a new policy is evaluated against.
RECENT_INPUTS = 100
# A change is acted on once two reads this far apart agree: an editor or a checkout may be
# half-way through writing several files.
SETTLE_S = 0.2


class AlertSink(Protocol):
    """Where a refused reload is reported (``gateway.health.alerts.Alerts``)."""

    def raise_alert(self, name: str, message: str, **details: Any) -> object:
        """Raise (or update) the alert ``name``."""
        ...

    def resolve(self, name: str) -> None:
        """Mark ``name`` resolved."""
        ...


# The query each kind of logged decision was made with.
QUERY_OF_KIND = {
    "dispatch": DISPATCH_QUERY,
    "message": MESSAGES_QUERY,
    "api": API_QUERY,
    "tool": TOOLS_QUERY,
}


def config_revisions(config: Config) -> dict[str, str]:
    """The revisions of ``config``'s parts and their combination, as /v1/status shows them."""
    revisions = {
        "policies": config.policy_revision,
        "schemas": config.schemas_revision,
        "registry": config.registry_revision,
        "combined": config.revision,
    }
    if config.limits_revision:
        # Limits decide what reaches the policy, not what it decides: not in "combined".
        revisions["limits"] = config.limits_revision
    return revisions


def check_tests(report: TestReport) -> None:
    """Raise PolicyTestsFailed (file:line of the first) when any policy test failed."""
    failures = [
        {
            "test": r.query,
            "location": f"{r.file}:{r.line}",
            "outcome": r.outcome,
            "message": r.message,
        }
        for r in report.results
        if r.outcome != "pass"
    ]
    if not failures:
        return
    first = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    raise PolicyTestsFailed(
        f"policy test {first['test']} {'errored' if first['outcome'] == 'error' else 'failed'}"
        f": {first['message']}{more}",
        location=first["location"],
        failures=failures,
    )


def check_recent_inputs(config: Config, records: list[dict[str, Any]]) -> int:
    """Evaluate the new policy on logged inputs; a rule conflict is a ConfigError.

    regorus reports a conflict between two definitions of a rule only when one input makes
    both apply; the policy tests may not contain such an input, real traffic may. Other
    evaluation errors are not refused here: logged inputs are masked, and a policy may
    legitimately fail on a redacted value. Returns how many inputs were evaluated.
    """
    engine = config.policy.engine
    checked = 0
    cases: list[tuple[str, Any]] = []
    for record in records:
        query = QUERY_OF_KIND.get(str(record.get("kind")), MESSAGES_QUERY)
        policy_input = record.get("input")
        if not isinstance(policy_input, dict):
            continue
        checked += 1
        cases.append((query, policy_input))
        try:
            engine.set_input(policy_input)
            engine.eval_rule(query)
        except RuntimeError as e:
            location, reason = parse_engine_error(str(e))
            if "conflict" in reason:
                raise ConfigError(
                    f"{reason} (on the input of logged decision {record.get('decision_id')})",
                    location=location,
                ) from e
    config.policy.cross_check(cases, source="logged decisions")
    return checked


def _detached(e: ConfigError) -> ConfigError:
    """``e`` without its traceback and causes.

    Their frames hold the refused config's regorus engine, which must be dropped on the
    thread that made it (the loop); kept in a traceback, it would be freed by whichever
    thread the garbage collector runs on.
    """
    e.__cause__ = e.__context__ = None
    return e.with_traceback(None)


def _run_tests_here(policies_dir: Path) -> tuple[TestReport, list[tuple[str, Any]]]:
    """``run_tests`` on the calling (worker) thread, with the inputs the tests give the hub's
    queries (for the fast path's cross-check); a ConfigError leaves it without frames.

    The runner's engines live and die on this thread; an exception carrying their frames to
    the loop thread would drop them there.
    """
    try:
        report = run_tests(policies_dir, capture=HUB_QUERIES)
        return report, report.inputs
    except ConfigError as e:
        error = ConfigError(e.message, location=e.location)
    except OSError as e:
        error = ConfigError(f"cannot read the files: {e}", location=e.filename)
    raise error


class Reloader:
    """Reloads the hub's files on demand (``reload``) and, when polling, on every change."""

    def __init__(
        self,
        *,
        files: BundleSettings,
        current: Callable[[], Config | None],
        install: Callable[[Config], Awaitable[None]],
        recent_inputs: Callable[[str, int], Awaitable[list[dict[str, Any]]]],
        alerts: AlertSink,
        poll_s: float | None = None,
        settle_s: float = SETTLE_S,
    ) -> None:
        # ``current``: the config in force (None before one ever loaded); ``install`` puts a
        # proven one in force; ``recent_inputs(kind, n)``: the latest n logged decisions of
        # a kind, whose inputs a new policy is tried on.
        self.files = files
        self._current = current
        self._install = install
        self._recent_inputs = recent_inputs
        self.alerts = alerts
        self.poll_s = files.reload_poll_s if poll_s is None else poll_s
        self.settle_s = settle_s
        self._seen: str | None = None  # fingerprint of the files last tried
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.last_reload: dict[str, Any] | None = None
        self.reloads = 0
        self.refusals = 0
        # The last refusal (file:line, failing tests, kept revisions); None once one passes.
        self.last_error: dict[str, Any] | None = None

    @property
    def paths(self) -> list[Path]:
        """The watched files: policies, schemas, the registry, and the limits if any."""
        f = self.files
        limits = [f.limits_file] if f.limits_file is not None else []
        return [f.policies_dir, f.schemas_dir, f.agents_file, *limits]

    def _baseline(self) -> tuple[str, bool]:
        """(fingerprint, whether each part's content hash is the one in force)."""
        fingerprint = self.fingerprint()
        c = self._current()
        if c is None:
            return fingerprint, True  # nothing loaded: the policy probe keeps trying
        pairs = [
            (self.paths[0], c.policy_revision),
            (self.paths[1], c.schemas_revision),
            (self.paths[2], c.registry_revision),
        ]
        if self.files.limits_file is not None:
            pairs.append((self.files.limits_file, c.limits_revision))
        loaded = all(
            revision.partition("+sha256:")[2] == content_hash([path])[: len(short)]
            for path, revision in pairs
            if (short := revision.partition("+sha256:")[2])
        )
        return fingerprint, loaded

    def fingerprint(self) -> str:
        """Content hash of every watched file (reads files: call it off the loop)."""
        return content_hash(self.paths)

    async def start(self) -> None:
        """Take the files as seen if they are what is in force, and poll if enabled."""
        seen, loaded = await asyncio.to_thread(self._baseline)
        # Edited between the hub's first load and now: the first round reloads them.
        self._seen = seen if loaded else None
        if self.poll_s > 0:
            self._task = asyncio.create_task(self._loop(), name="reload-watcher")

    async def stop(self) -> None:
        """Stop polling (a reload in progress is abandoned; the old config stays)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except ConfigError:
                pass  # refused: already alerted and shown in /v1/status
            except Exception:
                # The watcher must outlive a bad round (a file vanishing mid-read...).
                log.exception("reload watcher round failed")

    async def poll_once(self) -> bool:
        """Reload if the files changed since last tried; True when a reload was attempted."""
        current = await asyncio.to_thread(self.fingerprint)
        if current == self._seen:
            return False
        if self.settle_s > 0:
            await asyncio.sleep(self.settle_s)
            if await asyncio.to_thread(self.fingerprint) != current:
                return False  # still being written: look again next round
        await self.reload(trigger="watch")
        return True

    async def reload(self, *, trigger: str = "api") -> dict[str, str]:
        """Compile, validate and test the files; swap them in or raise ConfigError.

        Returns the revisions now in force.
        """
        async with self._lock:
            started = time.perf_counter()
            seen = await asyncio.to_thread(self.fingerprint)
            failure: ConfigError | None = None
            try:
                config, tests, checked = await self._prepare()
            except ConfigError as e:
                failure = _detached(e)
            except OSError as e:  # a file vanished or turned unreadable mid-reload
                failure = ConfigError(f"cannot read the files: {e}", location=e.filename)
            self._seen = seen  # a refused set of files is not retried until it changes
            if failure is not None:
                # Raised outside the except blocks, so no context keeps their frames.
                self._refuse(failure, trigger)
                raise failure
            await self._install(config)
            self.last_error = None
            self.alerts.resolve("reload_failed")
            self.reloads += 1
            ms = round((time.perf_counter() - started) * 1000, 1)
            self.last_reload = {
                "at": utcnow(),
                "trigger": trigger,
                "revisions": config_revisions(config),
                "ms": ms,
                "policy_tests_passed": tests.count("pass"),
                "recent_inputs_checked": checked,
            }
            fast = config.policy.fast_path_status()
            if fast is not None and fast["disabled"] is not None:
                self.alerts.raise_alert(
                    "policy_fast_path_off",
                    f"policy fast path off for {config.policy_revision}: the Rvm and the "
                    f"Engine differ on {fast['disabled'].get('query')}",
                )
            else:
                self.alerts.resolve("policy_fast_path_off")
            log.info(
                "config reloaded",
                extra={"trigger": trigger, "ms": ms, "revision": config.revision},
            )
            return config_revisions(config)

    async def _prepare(self) -> tuple[Config, TestReport, int]:
        s = self.files
        revisions = await asyncio.to_thread(
            file_revisions,
            agents_file=s.agents_file,
            schemas_dir=s.schemas_dir,
            policies_dir=s.policies_dir,
            limits_file=s.limits_file,
        )
        # On the loop thread: the engine will serve requests here (thread-bound).
        config = load_config(
            agents_file=s.agents_file,
            schemas_dir=s.schemas_dir,
            policies_dir=s.policies_dir,
            limits_file=s.limits_file,
            revisions=revisions,
            fast_path_check=False,  # cross-checked below, its test inputs found off the loop
        )
        recent: list[dict[str, Any]] = []
        for kind in QUERY_OF_KIND:
            try:
                page = await self._recent_inputs(kind, RECENT_INPUTS)
            except GatewayError as e:
                # Best effort: an unreadable log must not block a fix from going in.
                log.warning("recent inputs unavailable", extra={"error": e.message})
                break
            recent.extend(page)
        checked = check_recent_inputs(config, recent)
        tests, test_inputs = await asyncio.to_thread(_run_tests_here, Path(s.policies_dir))
        check_tests(tests)
        config.policy.cross_check(test_inputs, source="policy tests")
        return config, tests, checked

    def _refuse(self, e: ConfigError, trigger: str) -> None:
        self.refusals += 1
        in_force = self._current()
        kept = config_revisions(in_force) if in_force is not None else None
        error: dict[str, Any] = {
            "message": e.message,
            "location": e.location,
            "at": utcnow(),
            "trigger": trigger,
            "kept_revisions": kept,
        }
        if isinstance(e, PolicyTestsFailed):
            error["failures"] = e.failures
        self.last_error = error
        self.alerts.raise_alert("reload_failed", f"reload refused: {e}", location=e.location or "")
        log.warning(
            "reload refused", extra={"trigger": trigger, "error": e.message, "at": e.location}
        )

    def to_json(self) -> dict[str, Any]:
        """What /v1/status shows about reloading, and the policy fast path in force."""
        in_force = self._current()
        return {
            "policy_fast_path": in_force.policy.fast_path_status() if in_force else None,
            "poll_s": self.poll_s,
            "watching": self._task is not None and not self._task.done(),
            "reloads": self.reloads,
            "refusals": self.refusals,
            "last_reload": self.last_reload,
        }
