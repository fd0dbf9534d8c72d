"""API authorization: every call to the hub's API is a decision of ``data.gateway.api``.

The doors authenticate (an API key gives a subject, no key an anonymous caller) and describe
the call: method, route template, parameters, and the resource it touches (for a task: its
owner and state). Roles, ownership and tenancy live in ``policies/api.rego``; nothing here
knows a role. Evaluation fails closed (``gateway.policy.engine``), and the answer becomes:

- allow: an ``Access`` with the decision id and the list ``scope`` (``all`` only when the
  policy says so explicitly; anything else is the caller's own tasks);
- deny with ``conceal``: the resource's not-found error, so ids leak nothing;
- deny of an anonymous caller: 401; any other deny: 403 with reasons and decision id.

Written to the decision log (kind ``api``): every denial, every state-changing call, and
allowed reads by an authenticated caller unless ``log_reads`` is off. While the store cannot
be written (degraded mode), an allowed change is refused (503), and a read or a denial goes
on with a log line instead of a record. Allowed anonymous
reads of the public routes (health, metrics, the API description) are not logged: probes
would fill the log with nothing an auditor needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.bundle.config import Config
from gateway.decisionlog.sink import DecisionSink
from gateway.errors import (
    Degraded,
    Forbidden,
    NotFound,
    StoreUnavailable,
    Unauthorized,
    UnknownTask,
)
from gateway.identity.apikeys import Subject
from gateway.logs import get_logger
from gateway.policy.engine import API_QUERY, Decision
from gateway.store.records import SealedDecision

log = get_logger(__name__)
API_PATH = "gateway/api/decision"
READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One API call as the policy sees it."""

    method: str
    route: str
    params: dict[str, Any] = field(default_factory=dict)
    protocol: str = "http"
    remote_addr: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``input.request`` member."""
        return {
            "method": self.method,
            "route": self.route,
            "params": self.params,
            "protocol": self.protocol,
            "remote_addr": self.remote_addr,
        }


@dataclass(frozen=True, slots=True)
class Access:
    """An allowed call: its decision id (None when not logged) and the caller's list scope."""

    decision_id: str | None
    scope: str
    # A change's record not written yet (``authorize(..., defer=True)``): the caller
    # appends it with the change itself, or ``ApiAuthorizer.commit`` writes it.
    pending: list[SealedDecision] = field(default_factory=list)

    @property
    def sees_all(self) -> bool:
        """Whether list calls show every subject's tasks."""
        return self.scope == "all"


def _record(
    config: Config, subject: Subject | None, policy_input: dict[str, Any], decision: Decision
) -> dict[str, Any]:
    """The decision log fields of one API decision."""
    resource = policy_input["resource"]
    return {
        "kind": "api",
        "path": API_PATH,
        "input": policy_input,
        "decision": decision,
        "revision": config.revision,
        "subject": subject.id if subject is not None else None,
        "agent": resource.get("agent") or resource.get("name"),
        "task_id": resource.get("id") if resource.get("kind") == "task" else None,
    }


def subject_input(subject: Subject | None) -> dict[str, Any]:
    """``input.subject``: the verified subject, or an anonymous caller."""
    if subject is None:
        return {"authenticated": False, "id": None, "roles": [], "key_id": None}
    return {"authenticated": True, **subject.to_json()}


def task_resource(task: Any) -> dict[str, Any]:
    """``input.resource`` for one task (a store ``Task`` or a task dict)."""

    def get(name: str) -> Any:
        return task[name] if isinstance(task, dict) else getattr(task, name)

    return {
        "kind": "task",
        "id": get("id"),
        "owner": get("subject"),
        "state": get("state"),
        "agent": get("agent"),
        "parent_id": get("parent_id"),
    }


class ApiAuthorizer:
    """Asks ``data.gateway.api.decision`` about each call and logs what it must."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        decisions: DecisionSink,
        log_reads: bool = True,
        observe: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._config = config
        self._decisions = decisions
        self.log_reads = log_reads
        self._observe = observe

    async def authorize(
        self,
        subject: Subject | None,
        call: ApiCall,
        resource: dict[str, Any] | None = None,
        *,
        defer: bool = False,
    ) -> Access:
        """Decide ``call``; return its Access, or raise the error the denial maps to.

        ``defer``: an allowed change's record is not written here but handed back in
        ``Access.pending``, for the write of the change itself (one commit for both).
        """
        config = self._config()
        policy_input = {
            "subject": subject_input(subject),
            "request": call.to_json(),
            "resource": resource or {"kind": "hub"},
        }
        decision = config.policy.evaluate(API_QUERY, policy_input)
        if self._observe is not None:
            self._observe(call.route, decision.allow)
        if defer and decision.allow and call.method not in READ_METHODS:
            sealed = self._decisions.prepare(**_record(config, subject, policy_input, decision))
            scope = decision.extra.get("scope")
            return Access(sealed.decision_id, "all" if scope == "all" else "own", [sealed])
        decision_id = await self._log(config, subject, call, policy_input, decision)
        if decision.allow:
            scope = decision.extra.get("scope")
            return Access(decision_id, "all" if scope == "all" else "own")
        raise _denial(subject, call, resource, decision, decision_id)

    async def commit(self, access: Access) -> None:
        """Write the deferred record of an allowed change that its change did not write
        (the change failed, or was an idempotent replay); Degraded if it cannot be."""
        while access.pending:
            sealed = access.pending[0]
            try:
                await self._decisions.append(sealed)
            except StoreUnavailable as e:
                raise Degraded(
                    f"the change cannot be recorded: {e.message}", headers={"Retry-After": "5"}
                ) from e
            access.pending.pop(0)

    async def _log(
        self,
        config: Config,
        subject: Subject | None,
        call: ApiCall,
        policy_input: dict[str, Any],
        decision: Decision,
    ) -> str | None:
        is_read = call.method in READ_METHODS
        if decision.allow and is_read and (subject is None or not self.log_reads):
            return None
        try:
            return await self._decisions.record(
                **_record(config, subject, policy_input, decision),
                # A read changes nothing: its caller need not wait for the record to be
                # durable. Denials and changes are durable before the answer.
                durable=not (decision.allow and is_read),
            )
        except StoreUnavailable as e:
            # A change the log cannot record does not happen (fail closed). A denial stays a
            # denial, and a read goes on (degraded mode keeps reads): both leave this line.
            if decision.allow and not is_read:
                raise Degraded(
                    f"the change cannot be recorded: {e.message}", headers={"Retry-After": "5"}
                ) from e
            log.warning(
                "api decision not logged: the store is unavailable",
                extra={"route": call.route, "allow": decision.allow, "error": e.message},
            )
            return None


def _denial(
    subject: Subject | None,
    call: ApiCall,
    resource: dict[str, Any] | None,
    decision: Decision,
    decision_id: str | None,
) -> Exception:
    reasons = list(decision.reasons)
    log.info(
        "api call denied",
        extra={"decision_id": decision_id, "route": call.route, "reasons": reasons},
    )
    if decision.extra.get("conceal") is True and resource is not None:
        if resource.get("kind") == "task":
            return UnknownTask(f"no task {resource.get('id')!r}")
        return NotFound(f"no {resource.get('kind')} {resource.get('id')!r}")
    if subject is None:
        return Unauthorized(
            "this call needs an API key: " + "; ".join(reasons), decision_id=decision_id
        )
    return Forbidden(
        f"not allowed: {'; '.join(reasons)}",
        details={"reasons": reasons, "roles": list(subject.roles)},
        decision_id=decision_id,
    )
