"""Small statistics used by every benchmark, kept separate so they can be tested on known inputs."""

from __future__ import annotations

import math
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def summary(values: Sequence[float]) -> dict:
    """median, min, max and the spread (max - min) / median of repeated measurements."""
    mid = median(values)
    return {"median": mid, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / mid if mid else 0.0, "runs": list(values)}


def latency_summary(seconds: Sequence[float]) -> dict:
    """Batch latencies in milliseconds: p50/p95/p99 and the mean."""
    ms = [s * 1000 for s in seconds]
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "mean": sum(ms) / len(ms)}
