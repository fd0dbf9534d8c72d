"""A2A push notifications: webhooks per task, delivered from the task events, off the hot path.

Whether a URL may be used is the API policy's decision: the door resolves the URL's host and
hands the policy its addresses, each marked ``public`` or not (loopback, link-local, private,
shared, reserved, multicast and unspecified addresses are not); ``policies/api.rego`` refuses
non-public ones unless the host is in ``data.config.a2a.push_allowed_hosts``. Deliveries
(a ``StreamResponse`` holding the task, with the client's token in
``X-A2A-Notification-Token``) run in one worker fed by a bounded queue: a slow or dead webhook
never slows a task, and when the queue is full a task's update is dropped and counted, never
awaited. Configs live in memory and go when their task's final update has been sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from a2a.types import StreamResponse, TaskPushNotificationConfig
from google.protobuf.json_format import MessageToDict

from gateway.logs import get_logger
from gateway.routers.events import STATE, StreamEvent
from gateway.store import Task as StoredTask

log = get_logger(__name__)
MAX_CONFIGS_PER_TASK = 8


def is_public(ip: str) -> bool:
    """Whether ``ip`` is a public unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        addr = mapped
    return bool(
        addr.is_global
        and not (
            addr.is_loopback
            or addr.is_link_local
            or addr.is_multicast
            or addr.is_reserved
            or addr.is_unspecified
        )
    )


async def push_target(url: str) -> dict[str, Any]:
    """What the policy is told about a webhook URL: scheme, host, port, resolved addresses."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return {"url": url[:512], "scheme": "", "host": "", "port": 0, "addresses": []}
    host = parts.hostname or ""
    addresses: list[dict[str, Any]] = []
    if host and parts.scheme in ("http", "https"):
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            infos = []
        seen: set[str] = set()
        for info in infos:
            ip = str(info[4][0])
            if ip not in seen:
                seen.add(ip)
                addresses.append({"ip": ip, "public": is_public(ip)})
    return {
        "url": url[:512],
        "scheme": parts.scheme,
        "host": host,
        "port": port,
        "addresses": addresses,
    }


class PushNotifier:
    """Push configs per task and the worker that delivers their updates."""

    def __init__(
        self,
        load_task: Callable[[str], Awaitable[StoredTask]],
        to_a2a: Callable[[StoredTask], Any],
        *,
        queue: int = 1024,
        timeout_s: float = 5.0,
    ) -> None:
        self._load = load_task
        self._to_a2a = to_a2a
        self._configs: dict[str, dict[str, TaskPushNotificationConfig]] = {}
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue(maxsize=queue)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.dropped = 0
        self.sent = 0
        self.failed = 0

    def add(self, task_id: str, config: TaskPushNotificationConfig) -> TaskPushNotificationConfig:
        """Register ``config`` for ``task_id`` (the id is made when the client set none)."""
        stored = TaskPushNotificationConfig()
        stored.CopyFrom(config)
        stored.task_id = task_id
        if not stored.id:
            stored.id = uuid.uuid4().hex
        configs = self._configs.setdefault(task_id, {})
        if stored.id not in configs and len(configs) >= MAX_CONFIGS_PER_TASK:
            from a2a.utils.errors import InvalidParamsError

            raise InvalidParamsError(f"a task has at most {MAX_CONFIGS_PER_TASK} push configs")
        configs[stored.id] = stored
        return stored

    def get(self, task_id: str, config_id: str) -> TaskPushNotificationConfig | None:
        """One config of the task, or None."""
        return self._configs.get(task_id, {}).get(config_id)

    def list(self, task_id: str) -> list[TaskPushNotificationConfig]:
        """The task's configs."""
        return list(self._configs.get(task_id, {}).values())

    def delete(self, task_id: str, config_id: str) -> None:
        """Remove one config (no error if it is gone)."""
        self._configs.get(task_id, {}).pop(config_id, None)

    def on_event(self, event: StreamEvent) -> None:
        """A listener of the task events: queue a delivery for tasks with webhooks."""
        if event.kind != STATE or event.task_id not in self._configs:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> AsyncIterator[None]:
        """The delivery worker, for ``app.cleanup_ctx``."""
        session = aiohttp.ClientSession(timeout=self._timeout)
        worker = asyncio.create_task(self._deliver_all(session), name="a2a-push")
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            await session.close()

    async def _deliver_all(self, session: aiohttp.ClientSession) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(session, event)
            except Exception:
                log.exception("push delivery failed", extra={"task_id": event.task_id})

    async def _deliver(self, session: aiohttp.ClientSession, event: StreamEvent) -> None:
        configs = self.list(event.task_id)
        if not configs:
            return
        task = await self._load(event.task_id)
        body = MessageToDict(StreamResponse(task=self._to_a2a(task)))
        for config in configs:
            headers = {}
            if config.token:
                headers["X-A2A-Notification-Token"] = config.token
            auth = config.authentication
            if config.HasField("authentication") and auth.scheme and auth.credentials:
                headers["Authorization"] = f"{auth.scheme} {auth.credentials}"
            try:
                async with session.post(
                    config.url, json=body, headers=headers, allow_redirects=False
                ) as resp:
                    ok = resp.status < 300
            except (aiohttp.ClientError, TimeoutError) as e:
                ok = False
                log.info("push failed", extra={"task_id": event.task_id, "error": type(e).__name__})
            if ok:
                self.sent += 1
            else:
                self.failed += 1
        if event.final:
            self._configs.pop(event.task_id, None)
