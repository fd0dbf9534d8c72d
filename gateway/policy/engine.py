"""The policy engine interface and its regorus implementation.

The rest of the hub only sees ``PolicyEngine.evaluate(query, input) -> Decision``, so an
OPA-compatible backend can be added later. Evaluation fails closed: an error, an undefined
``decision``, a non-boolean ``allow`` or an evaluation over its time budget is a deny whose
reason says why.

With ``fast_path`` the hub's queries are answered by a compiled ``Rvm`` where it may
(``gateway.policy.fast``): allows only, once the revision passed ``cross_check``; the
``Engine`` answers everything else, as before.

regorus objects are bound to the thread that made them and never release the GIL, so the
engine is built and evaluated on the event-loop thread (DESIGN §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Without this every regorus error message carries a Rust backtrace.
os.environ["RUST_BACKTRACE"] = "0"
os.environ["RUST_LIB_BACKTRACE"] = "0"

import regorus

from gateway.errors import ConfigError
from gateway.logs import get_logger
from gateway.policy.fast import FastPath

log = get_logger(__name__)

DISPATCH_QUERY = "data.gateway.dispatch.decision"
MESSAGES_QUERY = "data.gateway.messages.decision"
API_QUERY = "data.gateway.api.decision"
TOOLS_QUERY = "data.gateway.tools.decision"
# The queries the hub asks, which get a compiled fast path.
HUB_QUERIES = (DISPATCH_QUERY, MESSAGES_QUERY, API_QUERY, TOOLS_QUERY)


@dataclass(frozen=True)
class Decision:
    """A policy answer. ``error`` is set when the engine failed and this is a fail-closed deny."""

    allow: bool
    reasons: tuple[str, ...] = ()
    sandbox: dict[str, Any] | None = None
    error: str | None = None
    eval_ns: int = 0
    raw: Any = None
    # Other members of the decision object (e.g. the API policy's ``scope``), JSON-plain.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The decision as logged: the policy's object, with reasons sorted."""
        body: dict[str, Any] = {**self.extra, "allow": self.allow, "reasons": list(self.reasons)}
        if self.sandbox is not None:
            body["sandbox"] = self.sandbox
        if self.error is not None:
            body["error"] = self.error
        return body


class PolicyEngine(Protocol):
    """What the routers need from a policy backend."""

    revision: str

    def evaluate(self, query: str, input: dict[str, Any]) -> Decision:
        """Evaluate ``query`` for ``input``; never raises, fails closed."""
        ...


def parse_engine_error(message: str) -> tuple[str | None, str]:
    """Split a regorus error into (``file:line:col`` or None, its one-line reason)."""
    location = None
    reason = ""
    for line in message.splitlines():
        stripped = line.strip()
        if stripped.startswith("-->") and location is None:
            location = stripped[3:].strip()
        elif stripped.startswith("error:") and not reason:
            reason = stripped[len("error:") :].strip()
    if not reason:
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        reason = lines[-1] if lines else "unknown error"
    return location, reason


def policy_files(policy_dir: Path, *, include_tests: bool = False) -> list[Path]:
    """The .rego modules under ``policy_dir`` in a stable order."""
    files = sorted(p for p in Path(policy_dir).rglob("*.rego") if p.is_file())
    if not include_tests:
        files = [p for p in files if not p.name.endswith("_test.rego")]
    return files


def data_documents(root: Path) -> dict[str, Any]:
    """``data.json`` files, each merged at the path of its directory (as OPA bundles do)."""
    data: dict[str, Any] = {}
    for path in sorted(root.rglob("data.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"invalid JSON: {e.msg}", location=f"{_display(root, path)}:{e.lineno}:{e.colno}"
            ) from e
        if not isinstance(doc, dict):
            raise ConfigError("a data.json file must hold an object", location=_display(root, path))
        target = data
        for part in path.parent.relative_to(root).parts:
            target = target.setdefault(part, {})
        target.update(doc)
    return data


def _display(root: Path, path: Path) -> str:
    # The same "policies/x.rego" naming as the runtime engine, so locations agree.
    return f"{root.name}/{path.relative_to(root).as_posix()}"


@dataclass
class RegorusPolicy:
    """Rego modules compiled into one regorus engine, with the data they were loaded with."""

    engine: Any
    revision: str
    modules: tuple[str, ...]
    budget_ms: float = 50.0
    data: dict[str, Any] = field(default_factory=dict)
    # The compiled fast path (None: the Engine answers everything).
    fast: FastPath | None = None

    def __post_init__(self) -> None:
        self._owner = threading.get_ident()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def __del__(self) -> None:
        # A policy replaced by a reload may still be held by a reference cycle (a request's
        # exception and its traceback's frames); the garbage collector may then free it on
        # any thread, and a regorus engine dropped off its own thread is leaked with an
        # error. Hand the engine to its loop instead: the callback holds the last reference.
        # With no loop to hand it to, it waits for its thread's next load.
        owner = getattr(self, "_owner", None)
        if "engine" not in self.__dict__ or threading.get_ident() == owner:
            return
        # Only the box references the engine from here on, and only the owner thread
        # empties it: neither this frame nor the instance dict (freed after this returns,
        # maybe after the loop has run the callback) may hold the last reference.
        box = [self.__dict__.pop("engine"), self.__dict__.pop("fast", None)]
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(box.clear)
                return
        with _ORPHANS_LOCK:
            _ORPHANS.append((owner, box))

    @classmethod
    def load(
        cls,
        policy_dir: Path,
        *,
        data: dict[str, Any] | None = None,
        revision: str = "",
        budget_ms: float = 50.0,
        required: tuple[str, ...] = (DISPATCH_QUERY,),
        fast_path: bool = False,
    ) -> RegorusPolicy:
        """Compile every module under ``policy_dir``; raise ConfigError with file:line:col.

        ``fast_path``: also compile the hub's queries for the ``Rvm``; it stays off until
        ``cross_check`` has compared it with the Engine.
        """
        _drop_orphans()
        root = Path(policy_dir)
        engine = regorus.Engine()
        names = []
        for path in policy_files(root):
            display = f"{root.name}/{path.relative_to(root).as_posix()}"
            try:
                engine.add_policy(display, path.read_text(encoding="utf-8"))
            except RuntimeError as e:
                location, reason = parse_engine_error(str(e))
                # The error's traceback and this frame form a cycle that only the garbage
                # collector frees, on any thread: drop the (thread-bound) engine now.
                del engine
                raise ConfigError(reason, location=location or display) from e
            names.append(display)
        if not names:
            raise ConfigError("no .rego modules", location=root.name)
        merged = {**data_documents(root), **(data or {})}
        engine.add_data(merged)
        policy = cls(engine=engine, revision=revision, modules=tuple(names), budget_ms=budget_ms)
        policy.data = merged
        for query in required:
            # Evaluating once with an empty input surfaces rule conflicts and missing
            # packages at load time rather than on the first request.
            try:
                engine.set_input({})
                engine.eval_rule(query)
            except RuntimeError as e:
                location, reason = parse_engine_error(str(e))
                if reason == "not a valid rule path":
                    reason = f"{query} is not defined by any module"
                del engine, policy  # as above: not left to the garbage collector
                raise ConfigError(reason, location=location or root.name) from e
        if fast_path:
            policy.fast = FastPath.build(engine.get_ast_as_json(), merged, HUB_QUERIES)
        return policy

    def cross_check(self, cases: list[tuple[str, Any]], *, source: str) -> bool:
        """Evaluate ``cases`` (query, input) with both the ``Rvm`` and the ``Engine``; the
        first difference turns the fast path off for this revision. True if it stays on."""
        fast = self.fast
        if fast is None or fast.disabled is not None:
            return False
        for query, policy_input in cases:
            if query not in fast.rvms or not isinstance(policy_input, dict):
                continue
            expected = self._engine_decide(query, policy_input, budget=False)
            value = fast.raw(query, policy_input)
            fast.checked[query] = fast.checked.get(query, 0) + 1
            if value is None:
                continue  # the Engine answers this input anyway
            got = interpret(value)
            if got.to_json() != expected.to_json():
                fast.disable(query, policy_input, expected.to_json(), got.to_json(), source)
                return False
        return True

    def fast_path_status(self) -> dict[str, Any] | None:
        """The fast path's state for /v1/status (None when there is none)."""
        return self.fast.to_json() if self.fast is not None else None

    def set_data(self, data: dict[str, Any]) -> None:
        """Replace ``data`` (e.g. after the registry changed), keeping data.json files."""
        self.engine.clear_data()
        merged = {**data_documents_cached(self.data), **data}
        self.engine.add_data(merged)
        self.data = merged
        if self.fast is not None:
            # Compiled and checked against the old data: the Engine answers from now on.
            self.fast.disabled = {"source": "set_data", "reason": "data replaced after the check"}

    def evaluate(self, query: str, input: dict[str, Any]) -> Decision:
        """Evaluate ``query``; any failure is a deny with its reason (fail closed)."""
        fast = self.fast
        if fast is not None and fast.on(query):
            start = time.perf_counter_ns()
            value = fast.raw(query, input)
            # Only an allow is taken from the Rvm; a deny or anything doubtful is decided
            # again by the Engine, so every refusal carries the Engine's reason or error.
            if type(value) is dict and value.get("allow") is True:
                elapsed = time.perf_counter_ns() - start
                if elapsed <= self.budget_ms * 1e6:
                    decision = interpret(value, elapsed)
                    if decision.allow:
                        fast.answered += 1
                        return decision
            fast.fell_back += 1
        return self._engine_decide(query, input)

    def _engine_decide(self, query: str, input: dict[str, Any], budget: bool = True) -> Decision:
        """The Engine's decision (the authority); over ``budget_ms`` is a deny if ``budget``."""
        start = time.perf_counter_ns()
        try:
            self.engine.set_input(input)
            value = self.engine.eval_rule(query)
        except Exception as e:  # regorus raises RuntimeError; anything else is also a deny
            location, reason = parse_engine_error(str(e))
            if reason == "not a valid rule path":
                reason = f"no rule defines {query}"
            where = f" at {location}" if location else ""
            return _deny(f"policy error{where}: {reason}", start)
        except BaseException as e:
            # pyo3 panics are BaseException; they must not escape as a crash of the hub.
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            return _deny(f"policy engine panic: {type(e).__name__}", start)
        elapsed = time.perf_counter_ns() - start
        if budget and elapsed > self.budget_ms * 1e6:
            return _deny(
                f"policy evaluation took {elapsed / 1e6:.1f} ms, "
                f"over its {self.budget_ms} ms budget",
                start,
            )
        return interpret(value, elapsed)


# Engines freed off their thread when their loop was gone: (owner thread, [engine]).
_ORPHANS: list[tuple[int | None, list[Any]]] = []
_ORPHANS_LOCK = threading.Lock()


def _drop_orphans() -> None:
    """Drop the orphaned engines that belong to the calling thread, here."""
    me = threading.get_ident()
    with _ORPHANS_LOCK:
        mine = [box for owner, box in _ORPHANS if owner == me]
        _ORPHANS[:] = [(owner, box) for owner, box in _ORPHANS if owner != me]
    for box in mine:
        box.clear()


def data_documents_cached(data: dict[str, Any]) -> dict[str, Any]:
    """The part of ``data`` that came from data.json files (everything but ``agents``)."""
    return {k: v for k, v in data.items() if k != "agents"}


def interpret(value: Any, eval_ns: int = 0) -> Decision:
    """Turn a raw ``decision`` value into a Decision, denying anything malformed."""
    if value is None:
        return Decision(False, ("policy error: decision is undefined",), None, "undefined", eval_ns)
    if not isinstance(value, dict):
        return Decision(
            False,
            (f"policy error: decision is a {type(value).__name__}, not an object",),
            None,
            "malformed",
            eval_ns,
            value,
        )
    allow = value.get("allow")
    if not isinstance(allow, bool):
        return Decision(
            False,
            ("policy error: decision.allow is not a boolean",),
            None,
            "malformed",
            eval_ns,
            value,
        )
    raw_reasons = value.get("reasons", ())
    if isinstance(raw_reasons, set | frozenset | list | tuple):
        reasons = tuple(sorted(str(r) for r in raw_reasons))
    else:
        reasons = (str(raw_reasons),)
    sandbox = value.get("sandbox")
    if sandbox is not None and not isinstance(sandbox, dict):
        return Decision(
            False, ("policy error: decision.sandbox is not an object",), None, "malformed", eval_ns
        )
    if not allow and not reasons:
        reasons = ("denied by policy (no reason given)",)
    extra = {k: _plain(v) for k, v in value.items() if k not in _CORE_MEMBERS}
    return Decision(allow, reasons, _plain(sandbox), None, eval_ns, value, extra)


_CORE_MEMBERS = frozenset(("allow", "reasons", "sandbox", "error"))


def _deny(reason: str, start: int) -> Decision:
    return Decision(False, (reason,), None, reason, time.perf_counter_ns() - start)


def _plain(value: Any) -> Any:
    """Sets from Rego become sorted lists so the value is JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
