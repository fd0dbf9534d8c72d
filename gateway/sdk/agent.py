"""An agent's HTTP server: ``POST /task``, ``POST /message`` and ``GET /health``.

Usage::

    from gateway.sdk import Agent

    agent = Agent("echo")

    @agent.task
    def handle(input, ctx):
        return {"echo": input}

    if __name__ == "__main__":
        agent.run()

The hub starts the container with ``AGENT_PORT``, ``AGENT_NAME``, ``AGENT_TASK_ID``,
``GATEWAY_URL`` and ``AGENT_SVID`` (its JWT-SVID) in its environment; ``ctx.client`` (a
``GatewayClient``) uses the last two to send messages, delegate and report results.
A container from a warm pool starts with neither ``AGENT_SVID`` nor ``AGENT_TASK_ID``: the hub
sends the token minted for the task in the ``POST /task`` body (``svid``), and from then on
``ctx.client`` and ``agent.client`` call the hub with it. ``@agent.message`` answers messages
routed by the hub; ``@agent.background_task`` answers
``POST /task`` with 202 at once and reports the result when the function returns, again and
again until the hub acknowledges it or the task's deadline passes (so a hub restart loses
no result; ``GatewayClient.report`` lists which answers end the retries).
``python3 agent.py --once`` reads one task input (JSON) from stdin and prints the output,
which is how the benchmark runs the same work without the hub.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.sdk.client import GatewayClient, HubError

# The header the hub names the container it means with (its hostname); must equal
# gateway.containers.backend.CONTAINER_HEADER (the SDK imports nothing of the hub).
CONTAINER_HEADER = "X-Gateway-Container"

MAX_BODY = 8 * 1024 * 1024
# How long a result is offered to the hub when the task came without a deadline.
REPORT_WITHOUT_DEADLINE_S = 300.0
TaskHandler = Callable[[Any, "TaskContext"], Any]
MessageHandler = Callable[[dict[str, Any], "TaskContext"], Any]


class AgentError(Exception):
    """Raise from a handler to fail the task with a code and message of your choosing."""

    def __init__(self, message: str, code: str = "agent_error", status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class TaskContext:
    """What a handler knows about the task it serves."""

    agent: str
    task_id: str | None
    deadline: float | None = None
    gateway_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    client: GatewayClient | None = None

    def remaining_s(self) -> float | None:
        """Seconds until the hub gives up on this task, if it said."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def progress(self, message: str, fraction: float | None = None) -> bool:
        """Tell the task's watchers how far it got (A2A streams, ``/v1/tasks/{id}/events``).

        Best effort: whether the hub took it; a refused or lost report never fails the task.
        """
        if self.client is None or not self.task_id or not self.client.url:
            return False
        try:
            self.client.progress(self.task_id, message, fraction)
        except HubError as e:
            print(f"progress of task {self.task_id} not reported: {e}", file=sys.stderr)
            return False
        return True


class Agent:
    """An agent: register handlers with the decorators, then ``run()``."""

    def __init__(self, name: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        # ``env`` stands in for os.environ (tests run several agents in one process).
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.name = name or self.env.get("AGENT_NAME", "agent")
        self._client: GatewayClient | None = None
        self._svid: str | None = None  # the token the last task brought in its body
        self._background = False
        self._task: TaskHandler | None = None
        self._message: MessageHandler | None = None
        self._lock = threading.Lock()
        self._results: dict[str, tuple[int, dict[str, Any]]] = {}
        self._running: dict[str, threading.Event] = {}
        self.started = time.time()

    def task(self, func: TaskHandler) -> TaskHandler:
        """Decorator: ``func(input, ctx) -> output`` answers ``POST /task``."""
        self._task = func
        return func

    def background_task(self, func: TaskHandler) -> TaskHandler:
        """Decorator: like ``task``, but ``POST /task`` is answered 202 at once and the
        output (or AgentError) is reported later through ``POST /v1/tasks/{id}/result``.

        The same task handed over again once it has a result (by a restarted hub) is
        answered with that result directly."""
        self._task = func
        self._background = True
        return func

    def message(self, func: MessageHandler) -> MessageHandler:
        """Decorator: ``func(message, ctx) -> reply`` answers ``POST /message``.

        ``message`` has ``type``, ``kind``, ``payload``, ``from`` (``spiffe_id``, ``agent``,
        ``task_id``, as verified by the hub), ``message_id`` and, when set, ``topic``,
        ``correlation_id`` and ``about_task``. The reply of a ``request`` goes back to the
        sender; replies to events and broadcasts are dropped.
        """
        self._message = func
        return func

    @property
    def client(self) -> GatewayClient:
        """This agent's client for the hub (from ``GATEWAY_URL`` and ``AGENT_SVID``)."""
        if self._client is None:
            self._client = GatewayClient(env=self.env)
        return self._client

    def context(self, body: dict[str, Any]) -> TaskContext:
        """The context of the task in ``body``; a ``svid`` there becomes this agent's token."""
        svid = body.get("svid")
        if isinstance(svid, str) and svid:
            with self._lock:
                if svid != self._svid:  # a new task's token (the same one comes again
                    self._svid = svid  # on a repeated hand-over, maybe renewed since)
                    self._client = GatewayClient(token=svid, env=self.env)
        return TaskContext(
            agent=self.name,
            task_id=body.get("task_id") or self.env.get("AGENT_TASK_ID"),
            deadline=body.get("deadline"),
            gateway_url=self.env.get("GATEWAY_URL"),
            client=self.client,
        )

    def handle_task(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run the task handler on a request body; return (status, response body).

        Idempotent per ``task_id``: a hub that restarted while the task ran hands it over
        again and gets the one result (waiting for it if it is still being computed), so a
        task's work is never done twice in one container.
        """
        if self._task is None:
            return 501, _error("not_implemented", "this agent takes no tasks")
        task_id = body.get("task_id")
        if self._background and task_id:
            return self._start_background(task_id, body)
        if not task_id:
            return _call(lambda: {"output": self._task(body.get("input"), self.context(body))})
        with self._lock:
            done = self._results.get(task_id)
            running = self._running.get(task_id)
            if done is None and running is None:
                running = self._running[task_id] = threading.Event()
                owner = True
            else:
                owner = False
        if done is not None:
            return done
        assert running is not None
        if not owner:
            running.wait()
            return self._results[task_id]
        result = _call(lambda: {"output": self._task(body.get("input"), self.context(body))})
        with self._lock:
            self._remember(task_id, result)
            self._running.pop(task_id, None)
        running.set()
        return result

    def _start_background(self, task_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            done = self._results.get(task_id)
            first = done is None and task_id not in self._running
            if first:
                self._running[task_id] = threading.Event()
        if done is not None:
            # A restarted hub hands the task over again: the result goes back at once (the
            # hub takes whichever comes first, this answer or the report).
            return done
        if first:
            threading.Thread(target=self._run_background, args=(task_id, body), daemon=True).start()
        return 202, {"accepted": True, "task_id": task_id}

    def _run_background(self, task_id: str, body: dict[str, Any]) -> None:
        status, result = _call(
            lambda: {"output": self._task(body.get("input"), self.context(body))}
        )
        with self._lock:
            self._remember(task_id, (status, result))
            event = self._running.pop(task_id, None)
        if event is not None:
            event.set()
        deadline = body.get("deadline")
        if not isinstance(deadline, int | float):
            deadline = time.time() + REPORT_WITHOUT_DEADLINE_S
        try:
            # Repeated until the hub acknowledges it (GatewayClient.report): a hub that
            # restarts meanwhile re-attaches this container and takes the result then.
            if status == 200:
                self.client.report_result(task_id, result["output"], deadline=deadline)
            else:
                err = result["error"]
                self.client.report_error(task_id, err["code"], err["message"], deadline=deadline)
        except HubError as e:
            print(f"reporting task {task_id} failed: {e}", file=sys.stderr)

    def _remember(self, task_id: str, result: tuple[int, dict[str, Any]]) -> None:
        """Keep a task's result for a repeated hand-over (the last 64; under ``_lock``)."""
        self._results[task_id] = result
        while len(self._results) > 64:
            self._results.pop(next(iter(self._results)))

    def handle_message(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run the message handler on a delivered message; return (status, response body)."""
        if self._message is None:
            return 501, _error("not_implemented", "this agent takes no messages")
        # The context is this agent's own task, not the sender's.
        ctx = self.context({})
        return _call(lambda: {"reply": self._message(body, ctx)})

    def run(self, host: str = "0.0.0.0", port: int | None = None) -> None:
        """Serve until the container stops; ``--once`` runs one task from stdin instead."""
        if "--once" in sys.argv[1:]:
            status, body = self.handle_task({"input": json.load(sys.stdin)})
            json.dump(body.get("output", body), sys.stdout)
            sys.stdout.write("\n")
            raise SystemExit(0 if status == 200 else 1)
        port = port or int(self.env.get("AGENT_PORT", "8000"))
        server = _Server((host, port), _make_handler(self))
        try:
            server.serve_forever(poll_interval=0.25)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    def serve_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """Start the server on a background thread (for tests); returns the server."""
        server = _Server((host, port), _make_handler(self))
        # A short poll so shutdown() (tests stopping a fake container) returns at once.
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The hub hung up first (it took a reported result, or gave up at the deadline):
        # nothing to tell anyone.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _call(func: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    try:
        return 200, func()
    except AgentError as e:
        return e.status, _error(e.code, str(e))
    except Exception as e:  # an agent bug must become a failed task, not a dropped connection
        return 500, _error("agent_exception", f"{type(e).__name__}: {e}")


class _JsonHandler(BaseHTTPRequestHandler):
    """JSON answers, and the refusal of a request meant for another container."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _misdirected(self) -> bool:
        # The hub names the container it means; another one may have been given this
        # address after that one died. Answering would run someone else's task here.
        meant = self.headers.get(CONTAINER_HEADER)
        if meant is None or meant == socket.gethostname():
            return False
        self.close_connection = True
        self._send(421, _error("misdirected", f"this is not container {meant[:64]}"))
        return True


def _make_handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class Handler(_JsonHandler):
        protocol_version = "HTTP/1.1"
        server_version = "agent-gateway-sdk"
        # Headers and body go out in two writes: without TCP_NODELAY the second waits for
        # the peer's delayed ACK (up to 40 ms) on a keep-alive connection.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the hub logs every task; per-request lines here are noise

        def do_GET(self) -> None:
            if self._misdirected():
                return
            if self.path == "/health":
                self._send(200, {"status": "ok", "agent": agent.name})
            else:
                self._send(404, _error("not_found", self.path))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(413, _error("payload_too_large", f"over {MAX_BODY} bytes"))
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body is not an object")
            except ValueError as e:
                self._send(400, _error("malformed_json", str(e)))
                return
            if self._misdirected():
                return
            if self.path == "/task":
                self._send(*agent.handle_task(body))
            elif self.path == "/message":
                self._send(*agent.handle_message(body))
            else:
                self._send(HTTPStatus.NOT_FOUND, _error("not_found", self.path))

    return Handler
