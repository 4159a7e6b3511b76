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


# Two-sided 95% quantiles of Student's t distribution, t(0.975, df), for df = 1..30.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_and_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_interval(differences: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean paired difference and its 95% t-interval (None, None with fewer than two pairs)."""
    mean, sd = mean_and_sd(differences)
    if sd is None:
        return mean, None, None
    df = len(differences) - 1
    half = (T_975[df - 1] if df <= len(T_975) else 1.96) * sd / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def equivalence_verdict(low: float | None, high: float | None, margin: float) -> str:
    """Read a difference's interval against +-margin: within it, outside it, or too wide to tell."""
    if low is None:
        return "too few seeds to tell"
    if -margin <= low and high <= margin:
        return f"within {margin:g} of the reference"
    if high < -margin or low > margin:
        return f"differs by more than {margin:g}"
    return "too few seeds to tell"
