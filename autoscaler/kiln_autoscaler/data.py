"""The autoscaler's plain data (targets, capacity, signals, decisions) and the one edge mapping the API to it.

The policy and the simulator only see these frozen dataclasses, so they are tested with plain
values; `targets_from_api` and `capacity_from_api` are the only places that read the CRD models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Targets:
    """What the user asked for in `.spec.autoscaling` (seconds, not milliseconds)."""

    min_replicas: int = 1
    max_replicas: int = 4
    ttft_p50_target_s: float = 0.5
    ttft_p90_target_s: float | None = None
    ttft_p95_target_s: float | None = None
    itl_target_s: float | None = None  # inter-token latency at `itl_percentile`
    itl_percentile: int = 50
    queue_depth_target: float | None = None  # waiting requests per ready replica
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    scale_to_zero: bool = False
    idle_seconds_before_zero: float = 900.0


@dataclass(frozen=True)
class Capacity:
    """What one replica sustains, measured when the engine was built (any figure may be unknown)."""

    output_tokens_per_second: float | None = None
    prefill_tokens_per_second: float | None = None
    max_concurrency_at_ttft_target: float | None = None
    # The TTFT target and percentile `max_concurrency_at_ttft_target` holds at (None: not recorded).
    ttft_target_s: float | None = None
    ttft_percentile: int | None = None

    @property
    def known(self) -> bool:
        """True when at least one figure can size replicas."""
        return any(
            value is not None and value > 0
            for value in (
                self.output_tokens_per_second,
                self.prefill_tokens_per_second,
                self.max_concurrency_at_ttft_target,
            )
        )


@dataclass(frozen=True)
class Signals:
    """One reading of a deployment's serving metrics, summed (or averaged) over its ready pods.

    Rates are per second over the source's window; gauges are the latest samples. A quantile is
    None when no request got its first token inside the window.
    """

    observed_at: float  # unix seconds of the newest sample used
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    ttft_p95_s: float | None = None
    itl_p50_s: float | None = None  # inter-token latency quantiles (the engine's per-token gaps)
    itl_p90_s: float | None = None
    itl_p95_s: float | None = None
    queue_depth: float = 0.0  # waiting requests, all pods (plus any gateway queue)
    running: float = 0.0  # requests in the running batches, all pods
    request_rate: float = 0.0  # finished requests per second
    prompt_token_rate: float = 0.0
    output_token_rate: float = 0.0
    kv_cache_usage: float | None = None  # mean over pods, 0..1
    pods: int = 0  # pods that reported

    @property
    def in_flight(self) -> float:
        """Requests admitted or waiting."""
        return self.queue_depth + self.running

    def itl(self, percentile: int) -> float | None:
        """The inter-token latency quantile at `percentile` (50, 90 or 95)."""
        quantiles = {50: self.itl_p50_s, 90: self.itl_p90_s, 95: self.itl_p95_s}
        if percentile not in quantiles:
            raise ValueError(f"inter-token latency percentile must be 50, 90 or 95, got {percentile}")
        return quantiles[percentile]

    @property
    def has_demand(self) -> bool:
        """Any request seen in the window or in flight now."""
        return self.in_flight > 0 or self.request_rate > 0 or self.prompt_token_rate > 0


@dataclass(frozen=True)
class Replicas:
    """Replica counts: `current` is `.spec.replicas`, `ready` those serving now."""

    current: int
    ready: int


@dataclass(frozen=True)
class Decision:
    """What the policy wants and why. `recommendation` is the raw count before stabilization."""

    desired: int
    reason: str
    recommendation: int
    fast_path: bool = False


@dataclass(frozen=True)
class History:
    """What the policy remembers between decisions (kept by the caller, updated by `record`)."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (time, raw recommendation)
    demand: tuple[tuple[float, float, float], ...] = ()  # (time, requests in flight, finished per second)
    last_active: float | None = None  # last time any demand was seen
    last_scale_up: float | None = None  # last time the policy raised the replica count
    horizon_s: float = 3600.0

    def record(self, now: float, decision: Decision, signals: Signals | None, current: int) -> History:
        """History after `decision` was taken at `now` from `current` replicas (pure; drops old entries)."""
        cutoff = now - self.horizon_s
        recommendations = (
            *(r for r in self.recommendations if r[0] >= cutoff),
            (now, decision.recommendation),
        )
        demand = self.demand
        last_active = self.last_active
        if signals is not None:
            demand = (*(d for d in demand if d[0] >= cutoff), (now, signals.in_flight, signals.request_rate))
            if signals.has_demand or last_active is None:
                last_active = now
        last_scale_up = now if decision.desired > current else self.last_scale_up
        return History(recommendations, demand, last_active, last_scale_up, self.horizon_s)

    def arrival_rate(self, signals: Signals, now: float) -> float:
        """Requests arriving per second: those finishing plus the growth of those in flight."""
        previous = [d for d in self.demand if d[0] < now]
        if not previous:
            return signals.request_rate
        then, in_flight, _ = previous[-1]
        growth = (signals.in_flight - in_flight) / (now - then)
        return max(0.0, signals.request_rate + growth)


@dataclass(frozen=True)
class Tuning:
    """Policy knobs that are not in the CRD: defaults chosen once, documented in docs/autoscaler.md."""

    target_utilization: float = 0.6  # fraction of measured capacity a replica should run at
    tolerance: float = 0.1  # relative band in which nothing changes
    feedback_gain: float = 0.5  # replicas scale with (ttft / target) ** gain when over target
    max_feedback_ratio: float = 2.0  # at most this factor from TTFT feedback in one decision
    scale_up_step_ratio: float = 1.0  # +100% per decision ...
    scale_up_step_min: int = 4  # ... or +4 replicas, whichever is more
    scale_down_step_ratio: float = 0.25  # -25% per decision ...
    scale_down_step_min: int = 1  # ... or -1 replica, whichever is more
    burst_queue_per_replica: float = 2.0  # waiting requests per ready replica that trigger the fast path
    burst_demand_ratio: float = 1.5  # demand jump over the last minute's minimum that triggers it
    burst_lookback_s: float = 60.0
    backlog_drain_s: float = 60.0  # size so that waiting requests drain within this time
    feedback_settle_s: float = 60.0  # after a scale-up, TTFT (a windowed signal) lags: no feedback this long
    stale_after_s: float = 90.0  # older signals never scale down


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def targets_from_api(spec_autoscaling: dict[str, Any]) -> Targets:
    """Targets from a `.spec.autoscaling` dict as stored (camelCase), validated by the API model."""
    from kiln.api.v1alpha1 import AutoscalingSpec

    spec = AutoscalingSpec.model_validate(spec_autoscaling or {})
    return Targets(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        ttft_p50_target_s=spec.ttft_p50_target_ms / 1000.0,
        ttft_p90_target_s=_ms_to_s(spec.ttft_p90_target_ms),
        ttft_p95_target_s=_ms_to_s(spec.ttft_p95_target_ms),
        itl_target_s=_ms_to_s(spec.itl_target_ms),
        itl_percentile=spec.itl_percentile,
        queue_depth_target=None if spec.queue_depth_target is None else float(spec.queue_depth_target),
        scale_up_window_s=float(spec.scale_up_window_seconds),
        scale_down_window_s=float(spec.scale_down_window_seconds),
        scale_to_zero=spec.scale_to_zero,
        idle_seconds_before_zero=float(spec.idle_seconds_before_zero),
    )


def capacity_from_api(engine_status_capacity: dict[str, Any] | None) -> Capacity:
    """Capacity from an LLMEngine's `.status.capacity` dict (camelCase); unknown when absent."""
    from kiln.api.v1alpha1 import Capacity as ApiCapacity

    if not engine_status_capacity:
        return Capacity()
    capacity = ApiCapacity.model_validate(engine_status_capacity)
    return Capacity(
        output_tokens_per_second=capacity.output_tokens_per_second,
        prefill_tokens_per_second=capacity.prefill_tokens_per_second,
        max_concurrency_at_ttft_target=(
            None
            if capacity.max_concurrency_at_ttft_target is None
            else float(capacity.max_concurrency_at_ttft_target)
        ),
        ttft_target_s=_ms_to_s(capacity.ttft_target_ms),
        ttft_percentile=capacity.ttft_percentile,
    )


def capacity_target(targets: Targets) -> tuple[int, float]:
    """(percentile, seconds) a deployment's capacity must be measured at: its p90 target where it
    sets one, else its p50 target (the rule the operator's build follows, kiln.api.enginekey)."""
    if targets.ttft_p90_target_s is not None:
        return 90, targets.ttft_p90_target_s
    return 50, targets.ttft_p50_target_s


def capacity_for(capacity: Capacity, targets: Targets) -> Capacity:
    """The capacity figures that hold for `targets`: the concurrency within the TTFT target only when
    it was measured at the deployment's own percentile and target (an engine measured for another
    target, or before targets were recorded, would size replicas for the wrong latency); token
    rates hold whatever the target."""
    percentile, target_s = capacity_target(targets)
    measured_for_these = capacity.ttft_percentile == percentile and (
        capacity.ttft_target_s is not None and math.isclose(capacity.ttft_target_s, target_s, rel_tol=1e-6)
    )
    if measured_for_these or capacity.max_concurrency_at_ttft_target is None:
        return capacity
    return Capacity(
        output_tokens_per_second=capacity.output_tokens_per_second,
        prefill_tokens_per_second=capacity.prefill_tokens_per_second,
    )


DEFAULT_TUNING = Tuning()


def finite_or_none(value: float | None) -> float | None:
    """None for NaN/inf (Prometheus returns NaN for an empty histogram window)."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value
