"""The agent's client for the hub: messages, delegation, reported results, token renewal.

Standard library only (``http.client``, one keep-alive connection per thread). Inside a
container started by the hub it needs no arguments: ``GATEWAY_URL`` and ``AGENT_SVID`` come
from the environment, and the token is renewed by itself shortly before it expires::

    from gateway.sdk import GatewayClient

    hub = GatewayClient()
    reply = hub.request("wordstats", "text.stats", {"text": "Policies decide."})
    hub.publish("notices", "notice", {"text": "done"})
    output = hub.delegate("wordstats", {"text": "a part of a document"})
    result = hub.call_tool("echo.debug.echo", {"text": "hi"})  # MCP, through GATEWAY_URL/mcp

Every failure the hub reports raises ``HubError`` with its status, code and message.

Calls that are safe to repeat are retried on a transient failure (``is_transient``: no
answer, 408, 425, 429 or 5xx, e.g. a hub restarting), with backoff: a delegation (it carries
an ``Idempotency-Key``, so a repeat gets the same child task) for up to ``retry_s``, polling
a task until its wait ends, and a reported result until the task's deadline. Requests,
events and broadcasts are sent once: a repeat could be handled twice.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
POLL_S = 25.0  # below the hub's default max_wait_s of 60
DEFAULT_RETRY_S = 30.0
# Statuses that say "not now" rather than "never": worth the same call again later.
TRANSIENT_STATUSES = frozenset({0, 408, 425, 429})  # and every 5xx
# The stateless MCP revision: no initialize, no session; each request carries its envelope.
MCP_VERSION = "2026-07-28"
TERMINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
# A reused keep-alive connection the server closed meanwhile fails with one of these before
# any byte of a response: safe to send again on a fresh connection.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class HubError(Exception):
    """The hub refused or failed a call: ``status``, ``code``, ``message``, ``details``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        decision_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.decision_id = decision_id
        self.retry_after_s = retry_after_s  # the hub's Retry-After, if it sent one


def is_transient(error: HubError) -> bool:
    """Whether the same call may succeed later (no answer, 408, 425, 429, 5xx)."""
    return error.status in TRANSIENT_STATUSES or error.status >= 500


def retry_until(
    call: Callable[[], T], until: float, *, first_s: float = 0.1, max_s: float = 1.0
) -> T:
    """``call()`` until it returns, raises a non-transient HubError or ``until`` (epoch s)
    passes (then its last error); backoff doubles from ``first_s`` up to ``max_s``."""
    pause = first_s
    while True:
        try:
            return call()
        except HubError as e:
            left = until - time.time()
            if not is_transient(e) or left <= 0:
                raise
            wait = e.retry_after_s if e.retry_after_s is not None else pause
            # Jitter, so agents cut off by the same restart do not come back in step.
            time.sleep(max(0.01, min(left, wait * random.uniform(0.75, 1.25))))
            pause = min(max_s, pause * 2)


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the hub verifies)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError):
        return None


class GatewayClient:
    """Calls the hub as this agent (``Authorization: Bearer <JWT-SVID>``). Thread-safe."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        renew_before_s: float = 60.0,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        env = os.environ if env is None else env
        self.url = (url or env.get("GATEWAY_URL") or "").rstrip("/")
        self._token = token or env.get("AGENT_SVID") or ""
        self.timeout_s = timeout_s
        self.renew_before_s = renew_before_s
        self.retry_s = retry_s
        self._local = threading.local()
        self._lock = threading.Lock()

    @property
    def token(self) -> str:
        """The current JWT-SVID (renewed through the hub when it is about to expire)."""
        exp = token_expiry(self._token)
        if exp is not None and exp - time.time() < self.renew_before_s:
            with self._lock:
                if token_expiry(self._token) == exp:
                    self._token = self._renew(self._token)
        return self._token

    # -- the calls

    def request(
        self,
        to: str,
        kind: str,
        payload: Any,
        *,
        timeout_s: float | None = None,
        correlation_id: str | None = None,
        task_id: str | None = None,
    ) -> Any:
        """Send ``payload`` to agent ``to`` through the hub and return its reply."""
        envelope = _envelope("request", kind, payload, to=to, correlation_id=correlation_id)
        if timeout_s is not None:
            envelope["timeout_s"] = timeout_s
        if task_id is not None:
            envelope["task_id"] = task_id
        wait = (timeout_s or self.timeout_s) + 5
        return self._call("POST", "/v1/messages", envelope, timeout_s=wait)[1]["reply"]

    def publish(self, topic: str, kind: str, payload: Any) -> int:
        """Publish an event to ``topic``; return how many subscribers it was delivered to."""
        envelope = _envelope("event", kind, payload, topic=topic)
        return int(self._call("POST", "/v1/messages", envelope)[1]["delivered"])

    def broadcast(self, kind: str, payload: Any) -> int:
        """Send to every running agent the policy lets this one reach; return the count."""
        envelope = _envelope("broadcast", kind, payload)
        return int(self._call("POST", "/v1/messages", envelope)[1]["delivered"])

    def delegate(
        self, to: str, input: Any, *, timeout_s: float | None = None, wait_s: float = 300.0
    ) -> Any:
        """Run a child task on agent ``to`` and return its output (HubError if it fails)."""
        task = self.start_delegate(to, input, timeout_s=timeout_s, wait_s=min(wait_s, POLL_S))
        task = self.wait_task(task, wait_s)
        if task["state"] != "succeeded":
            err = task.get("error") or {}
            raise HubError(
                200,
                err.get("code", task["state"]),
                f"delegated task {task['task_id']} {task['state']}: {err.get('message', '')}",
                details={"task": task},
            )
        return task["result"]

    def start_delegate(
        self,
        to: str,
        input: Any,
        *,
        timeout_s: float | None = None,
        wait_s: float = 0,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a child task on agent ``to``; return its view (finished if within wait_s).

        Retried on a transient failure under one ``idempotency_key`` (a fresh one unless
        given), so a hub restart mid-call makes no second child: a repeat waits only for
        what is left of ``wait_s``, and gives up ``retry_s`` after it.
        """
        payload: dict[str, Any] = {"input": input}
        if timeout_s is not None:
            payload["timeout_s"] = timeout_s
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        envelope = _envelope("delegate", "task.delegate", payload, to=to)
        wait_until = time.time() + wait_s

        def once() -> dict[str, Any]:
            left = wait_until - time.time() if wait_s else 0
            query = f"?wait={left:.3f}" if left > 0 else ""
            return self._call(
                "POST",
                "/v1/messages" + query,
                envelope,
                timeout_s=max(0.0, left) + self.timeout_s,
                headers=headers,
            )[1]

        return retry_until(once, wait_until + self.retry_s)

    def wait_task(self, task: dict[str, Any] | str, wait_s: float) -> dict[str, Any]:
        """Poll a delegated task until it ends or ``wait_s`` passes; return its last view."""
        view = task if isinstance(task, dict) else {"task_id": task, "state": "pending"}
        deadline = time.time() + wait_s
        task_id = view["task_id"]

        def poll() -> dict[str, Any]:
            return self.task(task_id, wait_s=max(0.001, min(deadline - time.time(), POLL_S)))

        while view["state"] in ("pending", "dispatched", "running"):
            if deadline - time.time() <= 0:
                break
            try:
                view = retry_until(poll, deadline)
            except HubError as e:
                if not is_transient(e):
                    raise
                break  # the hub stayed away until the wait ended: the last view stands
        return view

    def task(self, task_id: str, *, wait_s: float | None = None) -> dict[str, Any]:
        """A task this agent delegated (or its own), optionally waiting for it to end."""
        query = f"?wait={wait_s:.3f}" if wait_s else ""
        path = f"/v1/tasks/{urllib.parse.quote(task_id, safe='')}{query}"
        return self._call("GET", path, None, timeout_s=(wait_s or 0) + self.timeout_s)[1]

    def report_result(
        self, task_id: str, output: Any, *, deadline: float | None = None
    ) -> dict[str, Any]:
        """Report the output of a task this agent answered 202 to.

        With ``deadline`` (epoch seconds; the task's) the report is repeated until the hub
        acknowledges it; see ``report``.
        """
        return self.report(task_id, {"output": output}, deadline=deadline)

    def report_error(
        self, task_id: str, code: str, message: str, *, deadline: float | None = None
    ) -> dict[str, Any]:
        """Report that a task this agent answered 202 to failed (``deadline``: as above)."""
        body = {"error": {"code": code, "message": message}}
        return self.report(task_id, body, deadline=deadline)

    def report(
        self, task_id: str, body: dict[str, Any], *, deadline: float | None = None
    ) -> dict[str, Any]:
        """POST ``{"output"}`` or ``{"error"}`` to ``/v1/tasks/{id}/result``; once without a
        ``deadline``, else until acknowledged.

        Acknowledged: a 2xx naming a terminal state, or a status that says the report will
        never be taken (400 malformed or off-schema, 401 token refused: the hub no longer
        runs this task, 403 not this container's task, 404, 409 the task ended or has its
        result, 413, 422); HubError then. Repeated, with backoff, until ``deadline``: no
        answer, 408, 425, 429, 5xx (503 while a restarted hub re-attaches its containers),
        and a 2xx whose state is not terminal yet (the hub took the report but had not
        recorded it: the repeat is refused 409 by that hub, taken by a restarted one). The
        hub records one result per task, so a repeat cannot end a task twice.
        """
        path = f"/v1/tasks/{urllib.parse.quote(task_id, safe='')}/result"
        if deadline is None:
            return self._call("POST", path, body)[1]
        taken: list[dict[str, Any]] = []  # the last 2xx answer, once there is one

        def once() -> dict[str, Any]:
            try:
                doc = self._call("POST", path, body, timeout_s=self._left(deadline))[1]
            except HubError as e:
                if taken and not is_transient(e):
                    return taken[-1]  # the hub that took it refuses a repeat: it is its now
                raise
            taken.append(doc if isinstance(doc, dict) else {})
            if taken[-1].get("state") not in TERMINAL_STATES:
                raise HubError(0, "not_recorded", f"task {task_id} is {taken[-1].get('state')}")
            return taken[-1]

        try:
            return retry_until(once, deadline)
        except HubError:
            if taken:
                return taken[-1]  # taken, but not known to be recorded by the deadline
            raise

    def progress(self, task_id: str, message: str, fraction: float | None = None) -> int:
        """Report progress of the task this agent runs; the event id the hub gave it."""
        body = {"message": message, "fraction": fraction, "sent_at": time.time()}
        return int(self._call("POST", f"/v1/tasks/{task_id}/progress", body)[1]["event_id"])

    def renew(self) -> str:
        """Exchange the current token for a fresh one now; return it."""
        with self._lock:
            self._token = self._renew(self._token)
            return self._token

    def bundle(self) -> dict[str, Any]:
        """The hub's JWT bundle (JWKS), e.g. to check tokens of other agents."""
        return self._call("GET", "/v1/identity/bundle", None, auth=False)[1]

    # -- plumbing

    def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """Call MCP tool ``name`` through the hub (``POST /mcp``, revision 2026-07-28); return
        its ``CallToolResult`` (``isError`` for a denial or a failure, with the decision id).
        A protocol error raises HubError."""
        params = {
            "name": name,
            "arguments": dict(arguments or {}),
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MCP_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        }
        body = {"jsonrpc": "2.0", "id": uuid.uuid4().hex, "method": "tools/call", "params": params}
        headers = {
            "MCP-Protocol-Version": MCP_VERSION,
            "Mcp-Method": "tools/call",
            "Mcp-Name": name,
        }
        # An error status (401, 403...) raises HubError with the JSON-RPC code as its code.
        doc = self._call("POST", "/mcp", body, timeout_s=timeout_s, headers=headers)[1]
        if not isinstance(doc, dict) or "result" not in doc:
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            raise HubError(200, "mcp_error", str(err.get("message", "no result")), err)
        return dict(doc["result"])

    def _left(self, deadline: float) -> float:
        """One call's timeout: the usual one, but no longer than until ``deadline``."""
        return max(1.0, min(self.timeout_s, deadline - time.time()))

    def _renew(self, token: str) -> str:
        return str(self._call("POST", "/v1/identity/renew", None, token=token)[1]["token"])

    def _connection(self, timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        reused = conn is not None
        if conn is None:
            if not self.url:
                raise HubError(0, "no_gateway", "GATEWAY_URL is not set")
            parts = urllib.parse.urlsplit(self.url)
            cls = (
                http.client.HTTPSConnection
                if parts.scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(parts.hostname or "", parts.port, timeout=timeout_s)
            self._local.conn = conn
        conn.timeout = timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(timeout_s)
        return conn, reused

    def _call(
        self,
        method: str,
        path: str,
        body: Any,
        *,
        timeout_s: float | None = None,
        token: str | None = None,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json", **(headers or {})}
        if auth:
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        prefix = urllib.parse.urlsplit(self.url).path if self.url else ""
        for attempt in (1, 2):
            conn, reused = self._connection(timeout_s or self.timeout_s)
            try:
                conn.request(method, prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except _STALE as e:
                conn.close()
                self._local.conn = None
                if reused and attempt == 1:
                    continue
                raise HubError(0, "hub_unreachable", f"{type(e).__name__}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._local.conn = None
                code = "hub_timeout" if isinstance(e, TimeoutError) else "hub_unreachable"
                raise HubError(0, code, f"{type(e).__name__}: {e}") from e
            if resp.will_close:
                conn.close()
                self._local.conn = None
            break
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            raise HubError(resp.status, "bad_response", "the hub answered with non-JSON") from None
        if resp.status >= 400:
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            raise HubError(
                resp.status,
                str(err.get("code", "error")),
                str(err.get("message", resp.reason)),
                err.get("details"),
                err.get("decision_id"),
                _seconds(resp.getheader("Retry-After")),
            )
        return resp.status, doc


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the caller's own backoff is as good


def _envelope(kind_of: str, kind: str, payload: Any, **fields: Any) -> dict[str, Any]:
    envelope = {"type": kind_of, "kind": kind, "payload": payload}
    envelope.update({k: v for k, v in fields.items() if v is not None})
    return envelope
