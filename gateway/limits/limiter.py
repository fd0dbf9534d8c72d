"""The checks the doors run before any policy evaluation or decision-log write.

Each check either returns (or enters) or raises ``TooManyRequests`` carrying ``Retry-After``
and the ``RateLimit-Policy`` / ``RateLimit`` fields of draft-ietf-httpapi-ratelimit-headers,
with ``details`` naming the limit. A refusal is counted (``observe``, the
``gateway_rate_limited_total{limit}`` metric) and at most one log line per limit every
``log_every_s`` says how many were refused since the last: a flood writes neither decision
records nor a line per request.

| check | key | limit |
|---|---|---|
| ``api_call`` | the subject id; an anonymous caller's address | ``requests`` bucket |
| ``submission`` | the same | ``submit`` bucket, then the ``pending`` quota |
| ``message`` | the sender's instance id (its SPIFFE id for a foreign token) | ``messages`` bucket |
| ``long_poll`` | the hub | ``long_polls`` at once |

Pending counts come from the task router (``pending_of``: its runners, rebuilt by restart
recovery from the store); a submission holds a reservation until it has been accepted or
refused, so concurrent submissions cannot overshoot the quota.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from gateway.errors import TooManyRequests
from gateway.identity.apikeys import Subject
from gateway.limits.buckets import BucketTable
from gateway.limits.model import Limits, Rate
from gateway.logs import get_logger

log = get_logger(__name__)

# Retry-After (s) for a quota (pending tasks, long polls): no clock says when a slot frees,
# so a short fixed pause, documented in the README.
QUOTA_RETRY_AFTER_S = 2
LOG_EVERY_S = 10.0


def caller_key(subject: Subject | None, remote_addr: str | None) -> str:
    """The key an API caller's buckets are kept under."""
    if subject is not None:
        return "subject:" + subject.id
    return "addr:" + (remote_addr or "unknown")


class Reservation:
    """A slot held (a pending task being submitted, a long poll), given back on exit."""

    __slots__ = ("_counts", "_key")

    def __init__(self, counts: dict[str, int] | None, key: str = "") -> None:
        self._counts = counts
        self._key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        counts = self._counts
        if counts is not None:
            left = counts[self._key] - 1
            if left:
                counts[self._key] = left
            else:
                del counts[self._key]
            self._counts = None


_NOTHING = Reservation(None)


class Limiter:
    """The hub's rate limits and quotas, read from the limits in force on every check."""

    def __init__(
        self,
        *,
        limits: Callable[[], Limits],
        pending_of: Callable[[str], int] = lambda subject: 0,
        observe: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = LOG_EVERY_S,
        share: Callable[[], int] = lambda: 1,
    ) -> None:
        # ``share()``: how many hubs split each rate (a cluster's live hubs): every hub
        # enforces 1/n of it, so together they allow the rate written in limits.yaml.
        self._share = share
        self._limits = limits
        self._pending_of = pending_of
        self._observe = observe
        self._clock = clock
        self.buckets = BucketTable(clock=clock)
        self._reserved: dict[str, int] = {}  # subject id -> submissions in progress
        self._polls: dict[str, int] = {}  # "hub" -> long polls in progress
        self._log_every_s = log_every_s
        self._last_line: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # by limit, since start

    @property
    def long_polls(self) -> int:
        """Long polls in progress."""
        return self._polls.get("hub", 0)

    # -- checks

    def api_call(self, subject: Subject | None, remote_addr: str | None) -> None:
        """Any API call: the caller's ``requests`` bucket."""
        limits = self._limits()
        if not limits.enabled:
            return
        own = limits.for_subject(subject.id if subject else None, subject.roles if subject else ())
        if own.requests is not None:
            self._take("requests", caller_key(subject, remote_addr), own.requests)

    def submission(self, subject: Subject | None, remote_addr: str | None) -> Reservation:
        """``POST /v1/tasks``: the ``submit`` bucket, then a reserved pending slot.

        Use as ``with limiter.submission(...):`` around the whole submission.
        """
        limits = self._limits()
        if not limits.enabled:
            return _NOTHING
        own = limits.for_subject(subject.id if subject else None, subject.roles if subject else ())
        if own.submit is not None:
            self._take("submit", caller_key(subject, remote_addr), own.submit)
        if own.pending is None or subject is None:
            return _NOTHING  # an anonymous caller owns no tasks (the policy refuses it)
        held = self._pending_of(subject.id) + self._reserved.get(subject.id, 0)
        quota = self.per_hub(own.pending)
        if held >= quota:
            raise self._refuse(
                "pending",
                f"{held} tasks are waiting already; the quota is {quota}",
                QUOTA_RETRY_AFTER_S,
                policy=f'"pending";q={quota}',
                details={"quota": quota, "pending": held},
            )
        self._reserved[subject.id] = self._reserved.get(subject.id, 0) + 1
        return Reservation(self._reserved, subject.id)

    def per_hub(self, quota: int) -> int:
        """This hub's share of a quota split among the cluster's live hubs (at least 1 of a
        quota that allows any; a quota of 0 stays 0)."""
        if quota <= 0:
            return quota
        return max(1, math.ceil(quota / max(1, self._share())))

    def message(self, instance_key: str, agent: str | None) -> None:
        """``POST /v1/messages``: the sending instance's ``messages`` bucket."""
        limits = self._limits()
        if not limits.enabled:
            return
        rate = limits.for_instance(agent).messages
        if rate is not None:
            self._take("messages", "instance:" + instance_key, rate)

    def long_poll(self, wait_s: float | None) -> Reservation:
        """A call with ``?wait=`` > 0: one of the hub's ``long_polls`` slots while it waits.

        Use as ``with limiter.long_poll(wait):``; a call without a wait takes no slot.
        """
        if not wait_s:
            return _NOTHING
        cap = self._limits().long_polls
        if cap is not None:
            held = self._polls.get("hub", 0)
            if held >= cap:
                raise self._refuse(
                    "long_polls",
                    f"{held} long polls are in progress; the hub allows {cap}",
                    QUOTA_RETRY_AFTER_S,
                    policy=f'"long_polls";q={cap}',
                    details={"quota": cap},
                )
        self._polls["hub"] = self._polls.get("hub", 0) + 1
        return Reservation(self._polls, "hub")

    # -- refusals

    def _take(self, limit: str, key: str, rate: Rate) -> None:
        hubs = self._share()
        if hubs > 1:
            rate = Rate(rate.rate / hubs, max(1, math.ceil(rate.burst / hubs)))
        taken = self.buckets.take(limit, key, rate)
        if taken.ok:
            return
        raise self._refuse(
            limit,
            f"more than {rate.rate:g} a second (burst {rate.burst})",
            max(1, math.ceil(taken.retry_after_s)),
            policy=f'"{limit}";q={rate.burst};w={rate.window_s}',
            details={"rate": rate.rate, "burst": rate.burst},
        )

    def _refuse(
        self, limit: str, why: str, retry_s: int, *, policy: str, details: dict[str, Any]
    ) -> TooManyRequests:
        self.refused[limit] = self.refused.get(limit, 0) + 1
        if self._observe is not None:
            self._observe(limit)
        self._sample(limit)
        return TooManyRequests(
            f"over the {limit!r} limit: {why}; retry in {retry_s} s",
            details={"limit": limit, "retry_after_s": retry_s, **details},
            headers={
                "Retry-After": str(retry_s),
                "RateLimit-Policy": policy,
                "RateLimit": f'"{limit}";r=0;t={retry_s}',
            },
        )

    def _sample(self, limit: str) -> None:
        """One line per limit per ``log_every_s``, with how many it stands for."""
        now = self._clock()
        count = self._unlogged.get(limit, 0) + 1
        if now - self._last_line.get(limit, -math.inf) < self._log_every_s:
            self._unlogged[limit] = count
            return
        self._last_line[limit] = now
        self._unlogged[limit] = 0
        log.warning("requests refused by a limit", extra={"limit": limit, "refused": count})
