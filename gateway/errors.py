"""The gateway's closed set of errors.

```
GatewayError (500 internal_error)
├── BadRequest 400 ── MalformedJSON, SchemaViolation
├── Unauthorized 401 ── InvalidToken ── ExpiredToken, RevokedToken
├── Forbidden 403 ── PolicyDenied, DelegationTooDeep, NotTaskOwner
├── NotFound 404 ── UnknownAgent, UnknownCapability, UnknownTask, UnknownDecision,
│                   UnknownTopic, UnknownMessageKind
├── MethodNotAllowed 405
├── Conflict 409 ── IdempotencyConflict, InvalidState, AgentNotRunning
├── PayloadTooLarge 413, UnsupportedMediaType 415, InvalidConfig 422, TooManyRequests 429
├── AgentUnavailable 502 ── AgentError, SecretUnavailable, GuardrailUnenforceable
├── StoreUnavailable 503, Degraded 503
└── AgentTimeout 504
ConfigError (a file a user edits is invalid) ── PolicyTestsFailed
GuardrailViolation (a sandbox that cannot be enforced)
```

Every failure a caller can see is one of these classes. Each carries a stable ``code``
and the HTTP status it maps to; the HTTP layer turns them into
``{"error": {"code", "message", "details"?, "decision_id"?}}`` in one place
(``gateway.http.middlewares``). Core modules raise these and never import aiohttp.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base class: a failure with a stable code, an HTTP status and optional details."""

    code = "internal_error"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        decision_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.decision_id = decision_id
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        """The JSON body for this error."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        if self.decision_id is not None:
            body["decision_id"] = self.decision_id
        return {"error": body}


class BadRequest(GatewayError):
    code, status = "bad_request", 400


class MalformedJSON(BadRequest):
    code = "malformed_json"


class SchemaViolation(BadRequest):
    """A document broke its JSON Schema; ``details`` lists every failure by JSON pointer."""

    code = "schema_violation"


class Unauthorized(GatewayError):
    code, status = "unauthorized", 401


class InvalidToken(Unauthorized):
    code = "invalid_token"

    def __init__(self, message: str) -> None:
        # RFC 6750 asks for the reason in WWW-Authenticate on a rejected bearer token.
        super().__init__(message, headers={"WWW-Authenticate": f'Bearer error="{self.code}"'})


class ExpiredToken(InvalidToken):
    code = "token_expired"


class RevokedToken(InvalidToken):
    code = "token_revoked"


class Forbidden(GatewayError):
    code, status = "forbidden", 403


class PolicyDenied(Forbidden):
    code = "policy_denied"


class DelegationTooDeep(Forbidden):
    """A delegation would nest tasks deeper than the hub's limit."""

    code = "delegation_too_deep"


class NotTaskOwner(Forbidden):
    """A result was posted by a container instance that is not running the task."""

    code = "not_task_owner"


class NotFound(GatewayError):
    code, status = "not_found", 404


class UnknownAgent(NotFound):
    code = "unknown_agent"


class UnknownCapability(NotFound):
    code = "unknown_capability"


class UnknownTask(NotFound):
    code = "unknown_task"


class UnknownDecision(NotFound):
    code = "unknown_decision"


class UnknownTopic(NotFound):
    code = "unknown_topic"


class UnknownMessageKind(NotFound):
    """No schema under ``schemas/messages/kinds/`` for a message's ``kind``."""

    code = "unknown_message_kind"


class MethodNotAllowed(GatewayError):
    code, status = "method_not_allowed", 405


class Conflict(GatewayError):
    code, status = "conflict", 409


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class InvalidState(Conflict):
    code = "invalid_state"


class AgentNotRunning(Conflict):
    """The target agent is in the registry but no container of it is running."""

    code = "agent_not_running"


class PayloadTooLarge(GatewayError):
    code, status = "payload_too_large", 413


class UnsupportedMediaType(GatewayError):
    code, status = "unsupported_media_type", 415


class TooManyRequests(GatewayError):
    code, status = "too_many_requests", 429


class AgentUnavailable(GatewayError):
    """The container engine or the agent could not be reached (502)."""

    code, status = "agent_unavailable", 502


class SecretUnavailable(AgentUnavailable):
    """A secret an agent's env names cannot be read (no file, a readable-by-others file,
    no such secret): the container is not started. The message names, never shows, it."""

    code = "secret_unavailable"


class GuardrailUnenforceable(AgentUnavailable):
    """The container backend cannot enforce a guardrail of the spec and the decision's
    sandbox did not accept the backend's equivalent: nothing is started. ``details`` names
    the guardrail, the backend and what the backend would do instead."""

    code = "guardrail_unenforceable"


class AgentError(AgentUnavailable):
    """The agent answered with an error; its status and error body are in ``details``."""

    code = "agent_error"


class InvalidConfig(GatewayError):
    """A reload was refused: a file is invalid (``details.location`` is file:line)."""

    code, status = "invalid_config", 422


class StoreUnavailable(GatewayError):
    """The state database cannot be written (disk full, read-only file, closed store)."""

    code, status = "store_unavailable", 503

    def __init__(self, message: str, **kwargs: Any) -> None:
        # A 503 says when to come back: the store probe runs every few seconds.
        kwargs.setdefault("headers", {"Retry-After": "5"})
        super().__init__(message, **kwargs)


class Degraded(GatewayError):
    code, status = "degraded", 503


class AgentUnreachable(AgentUnavailable):
    """No connection to the agent could be made: nothing was sent to it (so a task may be
    placed elsewhere without running twice)."""


class AgentTimeout(GatewayError):
    code, status = "agent_timeout", 504


class ConfigError(Exception):
    """A file a user edits (agents.yaml, a schema, a policy) is invalid.

    ``location`` is ``file:line`` (or ``file:line:col``) when known.
    """

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.message = message
        self.location = location


class PolicyTestsFailed(ConfigError):
    """Policy tests failed, so a change was refused; ``failures`` lists each (file:line)."""

    def __init__(self, message: str, *, location: str | None, failures: list[dict[str, Any]]):
        super().__init__(message, location=location)
        self.failures = failures


class GuardrailViolation(Exception):
    """A sandbox the decision did not grant, or one the guardrails cannot enforce."""


def _error_classes(root: type[GatewayError]) -> list[type[GatewayError]]:
    """``root`` and every subclass of it, depth first."""
    found = [root]
    for sub in root.__subclasses__():
        found.extend(_error_classes(sub))
    return found


ERROR_CODES: dict[str, int] = {cls.code: cls.status for cls in _error_classes(GatewayError)}
"""Every error code the API can return, with its HTTP status (documented in the README).

Derived from the classes, so a new error class is a new code without a second list to keep.
"""
