"""Prometheus metrics, kept in a registry per hub so tests can run several hubs."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The hub's metrics; ``render()`` gives the text exposition format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "gateway_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "gateway_decisions",
            "Policy decisions by kind and result",
            ["kind", "result"],
            registry=self.registry,
        )
        self.tasks = Gauge(
            "gateway_tasks", "Tasks by state (from the store)", ["state"], registry=self.registry
        )
        self.dispatch_seconds = Histogram(
            "gateway_dispatch_seconds",
            "Submit-to-running time: container start and readiness",
            ["agent"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=self.registry,
        )
        self.containers_running = Gauge(
            "gateway_containers_running", "Agent containers this hub runs", registry=self.registry
        )
        self.mode = Gauge(
            "gateway_mode", "1 for the hub's current mode", ["mode"], registry=self.registry
        )
        self.alerts = Counter(
            "gateway_alerts", "Alerts raised by name", ["alert"], registry=self.registry
        )
        # Counted, not logged one by one: a flood must not fill the disk (gateway.limits).
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused by a quota or rate limit of limits.yaml, by limit",
            ["limit"],
            registry=self.registry,
        )
        self._rate_limited_children: dict[str, Any] = {}
        # Warm pools (gateway.containers.pools).
        self.pool_containers = Gauge(
            "gateway_pool_containers",
            "Pooled containers by agent and state (idle, reusable, assigned, warming)",
            ["agent", "state"],
            registry=self.registry,
        )
        self.pool_dispatches = Counter(
            "gateway_pool_dispatches",
            "Dispatches that asked a pool, by agent and result (hit: ran warm, miss: cold)",
            ["agent", "result"],
            registry=self.registry,
        )
        self.pool_warmup_seconds = Histogram(
            "gateway_pool_warmup_seconds",
            "Time to start a pooled container and see it answer /health",
            ["agent"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=self.registry,
        )

        # labels() looks its child up under a lock on every call; the children of the
        # request metrics (one per route, method and status) are kept here instead.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, method, status))
        if children is None:
            children = self._request_children[(route, method, status)] = (
                self.requests.labels(route, method, str(status)),
                self.request_seconds.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_rate_limited(self, limit: str) -> None:
        """Count one request refused by ``limit``."""
        child = self._rate_limited_children.get(limit)
        if child is None:
            child = self._rate_limited_children[limit] = self.rate_limited.labels(limit)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
