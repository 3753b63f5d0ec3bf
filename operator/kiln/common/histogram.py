"""Quantiles from Prometheus histogram buckets, computed the way `histogram_quantile` does.

Used on bucket deltas between two scrapes (direct pod scraping) and by the simulator, so both
see the same bucket resolution Prometheus would.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative buckets `(upper_bound, cumulative_count)`, or None when empty.

    Same rules as PromQL: linear interpolation inside the bucket that holds the rank, the first
    bucket starts at 0, a rank in the +Inf bucket returns the highest finite bound.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank and count > previous_count:
            if math.isinf(bound):
                return previous_bound if len(ordered) > 1 else None
            if bound <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def bucket_delta(
    newer: Mapping[float, float], older: Mapping[float, float] | None
) -> list[tuple[float, float]] | None:
    """Cumulative bucket counts observed between two scrapes, or None after a counter reset."""
    if older is None:
        return sorted(newer.items())
    delta: list[tuple[float, float]] = []
    for bound, count in newer.items():
        before = older.get(bound, 0.0)
        if count < before:
            return None  # the process restarted: this interval cannot be trusted
        delta.append((bound, count - before))
    return sorted(delta)


def cumulative(bounds: Sequence[float], observations: Iterable[float]) -> list[tuple[float, float]]:
    """Cumulative buckets (with +Inf) of raw observations: what an exporter would publish."""
    edges = [*sorted(bounds), math.inf]
    counts = [0] * len(edges)
    for value in observations:
        counts[bisect_left(edges, value)] += 1
    running = 0
    result: list[tuple[float, float]] = []
    for edge, count in zip(edges, counts, strict=True):
        running += count
        result.append((edge, float(running)))
    return result
