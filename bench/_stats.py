"""Small helpers shared by the benchmarks: percentiles and a uniform print format."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``samples``."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def summary(samples: list[float]) -> dict[str, float]:
    """median, p99, mean and min of ``samples``."""
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p99": percentile(samples, 99),
        "mean": statistics.fmean(samples),
        "min": min(samples),
    }


def report(name: str, figures: dict[str, Any]) -> None:
    """Print a human line per figure and one JSON line (for the README table)."""
    print(f"== {name} ({platform.python_version()}, {os.cpu_count()} cores)")
    for key, value in figures.items():
        if isinstance(value, dict):
            inner = ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
            print(f"  {key}: {inner}")
        else:
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    print("JSON " + json.dumps({"bench": name, **figures}, default=str))


async def rate(n: int, make: Callable[[int], Awaitable[Any]], concurrency: int) -> float:
    """Calls per second of ``make(i)`` for i < n, with ``concurrency`` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await make(i)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - start)
