"""Small helpers shared by the benchmarks: percentiles and a uniform print format."""

from __future__ import annotations

import json
import os
import platform
import statistics
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
