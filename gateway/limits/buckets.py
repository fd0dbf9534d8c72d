"""Token buckets, one per (limit, key), in a table that forgets the ones that refilled.

A bucket is two floats; its ``Rate`` is passed on each take, so a reload that changes a
rate applies at once without losing what a caller has used. A bucket that has refilled is
the same as a new one, so the table drops those when it grows: a flood from many anonymous
addresses costs memory only while their buckets are not full.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.limits.model import Rate

# The table is swept for full buckets once it holds this many.
SWEEP_AT = 10_000


class TokenBucket:
    """``tokens`` left at ``stamp`` (monotonic seconds)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, rate: Rate, now: float) -> float:
        """The tokens now (at most ``burst``)."""
        tokens = min(float(rate.burst), self.tokens + (now - self.stamp) * rate.rate)
        self.tokens, self.stamp = tokens, now
        return tokens


@dataclass(frozen=True, slots=True)
class Take:
    """A take's outcome: admitted or not, tokens left, and when the next one is there."""

    ok: bool
    remaining: int
    retry_after_s: float  # 0 when admitted


class BucketTable:
    """The buckets of one hub, keyed by (limit name, caller key)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sweep_at: int = SWEEP_AT
    ) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._sweep_at = sweep_at
        self._rates: dict[tuple[str, str], Rate] = {}

    def take(self, limit: str, key: str, rate: Rate) -> Take:
        """Take one token from the bucket of ``key`` under ``limit``."""
        now = self._clock()
        slot = (limit, key)
        bucket = self._buckets.get(slot)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self.sweep(now)
            bucket = self._buckets[slot] = TokenBucket(float(rate.burst), now)
        self._rates[slot] = rate
        tokens = bucket.refill(rate, now)
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return Take(True, int(tokens - 1.0), 0.0)
        return Take(False, 0, (1.0 - tokens) / rate.rate)

    def sweep(self, now: float | None = None) -> int:
        """Drop the buckets that are full again; return how many went."""
        now = self._clock() if now is None else now
        full = [
            slot
            for slot, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.stamp) * self._rates[slot].rate
            >= self._rates[slot].burst
        ]
        for slot in full:
            del self._buckets[slot]
            del self._rates[slot]
        if len(self._buckets) >= self._sweep_at:
            # Still full of live buckets: grow rather than forget what callers have used.
            self._sweep_at *= 2
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)
