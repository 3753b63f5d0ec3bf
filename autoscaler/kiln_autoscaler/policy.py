"""Kiln's scaling policy: a pure function from targets, signals, replicas, capacity and history to a decision.

How it decides (docs/autoscaler.md has the long form):

1. No fresh signals: hold (missing or stale metrics never scale down).
2. At zero replicas: scale to one (or what capacity says) on the first queued request, or at once
   when the deployment's routers hold requests for want of a ready replica (read from the routers
   themselves: at zero there are no engine series to read).
3. Feed-forward: the load the deployment carries (token rates ÷ measured per-replica capacity,
   and requests in flight ÷ the concurrency a replica holds within the TTFT target), divided by
   the target utilization, is the replica count that would carry it with headroom.
4. Feedback: latency over target (the worst of TTFT p50/p90/p95 and inter-token latency, each
   where set) beyond the tolerance band adds replicas in proportion to (latency / target) ** gain,
   never fewer than one more than are ready; under target lets the feed-forward count pull down;
   inside the band the count only goes up.
5. Stabilization: scale-up takes the lowest recommendation of the up window, scale-down the
   highest of the down window; step limits bound each change. A burst (queue per replica
   over a threshold, or demand jumping over its recent minimum) skips the up window and step
   limit, because a replica takes minutes to start and the queue grows meanwhile.
6. Routed deployments: the routers' count of requests in flight, read at each pass and between
   passes, stands in for the engines' where it is higher (what the engines do not show yet counts
   as running), so a burst at the routers is sized, and between passes starts one, without waiting
   for the engine series.
7. Scale to zero after `idle_seconds_before_zero` without any request, when enabled.
"""

from __future__ import annotations

import math
from dataclasses import replace

from kiln_autoscaler.data import (
    DEFAULT_TUNING,
    Capacity,
    Decision,
    History,
    Replicas,
    Signals,
    Targets,
    Tuning,
)

EPSILON = 1e-9


def _ceil(value: float) -> int:
    return math.ceil(value - EPSILON) if value > 0 else 0


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def with_router_in_flight(signals: Signals, router_in_flight: float) -> Signals:
    """The signals with the routers' count of requests in flight where it is above the engines':
    the routers count a request when it arrives, the engines' series reach the autoscaler a scrape
    interval and a rate window later. The requests they do not show yet are at the engines, in a
    batch or waiting for one: they count as running, so sizing by concurrency sees them."""
    unseen = router_in_flight - signals.in_flight
    return signals if unseen <= 0 else replace(signals, running=signals.running + unseen)


def router_burst(router_in_flight: float, counted: float, ready: int, tuning: Tuning) -> bool:
    """Between passes: the routers have taken a burst's worth of requests per ready replica (the
    fast path's queue threshold) more than the last pass counted, so a pass should run now."""
    return router_in_flight - counted >= tuning.burst_queue_per_replica * max(ready, 1)


def is_fresh(signals: Signals | None, now: float, tuning: Tuning) -> bool:
    """True when `signals` exist and are recent enough to act on."""
    return signals is not None and now - signals.observed_at <= tuning.stale_after_s


def load_in_replicas(
    signals: Signals, capacity: Capacity, arrival_rate: float | None = None, backlog_drain_s: float = 60.0
) -> float | None:
    """How many replicas' worth of measured capacity the load needs (None if capacity is unknown).

    Token work adds prefill and decode time (they share a replica's GPU). When requests arrive
    faster than they finish (`arrival_rate` over the finish rate), the work scales with it. Running
    requests are compared with what one replica holds within the TTFT target. The larger wins, plus
    what it takes to drain the waiting requests within `backlog_drain_s`.
    """
    work = 0.0
    has_work = False
    if capacity.prefill_tokens_per_second:
        work += signals.prompt_token_rate / capacity.prefill_tokens_per_second
        has_work = True
    if capacity.output_tokens_per_second:
        work += signals.output_token_rate / capacity.output_tokens_per_second
        has_work = True
    per_request = work / signals.request_rate if has_work and signals.request_rate > 0 else None
    estimates: list[float] = []
    if has_work:
        estimates.append(work)
    if per_request is not None and arrival_rate is not None:
        estimates.append(arrival_rate * per_request)
    if capacity.max_concurrency_at_ttft_target:
        estimates.append(signals.running / capacity.max_concurrency_at_ttft_target)
    if not estimates:
        return None
    if per_request is not None:
        backlog = signals.queue_depth * per_request / backlog_drain_s
    elif capacity.max_concurrency_at_ttft_target:
        backlog = signals.queue_depth / capacity.max_concurrency_at_ttft_target
    else:
        backlog = 0.0
    return max(estimates) + backlog


def latency_ratios(signals: Signals, targets: Targets) -> dict[str, tuple[float, float]]:
    """Each targeted latency that has samples: name -> (observed, target) in seconds."""
    pairs = {
        "ttft p50": (signals.ttft_p50_s, targets.ttft_p50_target_s),
        "ttft p90": (signals.ttft_p90_s, targets.ttft_p90_target_s),
        "ttft p95": (signals.ttft_p95_s, targets.ttft_p95_target_s),
        f"itl p{targets.itl_percentile}": (
            signals.itl(targets.itl_percentile) if targets.itl_target_s else None,
            targets.itl_target_s,
        ),
    }
    return {
        name: (observed, target)
        for name, (observed, target) in pairs.items()
        if observed is not None and target is not None and target > 0
    }


def latency_error(signals: Signals, targets: Targets) -> float | None:
    """Observed over target latency, the worst of every target set (TTFT p50/p90/p95, ITL);
    None without samples. Whichever target is violated drives the feedback."""
    ratios = [observed / target for observed, target in latency_ratios(signals, targets).values()]
    return max(ratios) if ratios else None


def is_burst(signals: Signals, replicas: Replicas, history: History, now: float, tuning: Tuning) -> bool:
    """A sudden rise: a queue building on every ready replica, or demand jumping over its recent low."""
    if signals.queue_depth >= tuning.burst_queue_per_replica * max(replicas.ready, 1):
        return True
    recent = [flight + rate for time, flight, rate in history.demand if now - time <= tuning.burst_lookback_s]
    if not recent:
        return False
    baseline = max(min(recent), 1.0)
    return signals.in_flight + signals.request_rate >= tuning.burst_demand_ratio * baseline


def _describe(signals: Signals, targets: Targets) -> str:
    parts = [
        f"{name} {observed * 1000:.0f}ms/{target * 1000:.0f}ms"
        for name, (observed, target) in latency_ratios(signals, targets).items()
    ]
    parts.append(f"queue {signals.queue_depth:.0f}")
    parts.append(f"running {signals.running:.0f}")
    return ", ".join(parts)


def decide(
    targets: Targets,
    signals: Signals | None,
    replicas: Replicas,
    capacity: Capacity,
    history: History,
    now: float,
    tuning: Tuning = DEFAULT_TUNING,
    held: int = 0,
) -> Decision:
    """The replica count a deployment should have now, and why (pure: same inputs, same answer).

    `held`: requests the deployment's routers hold because no replica is ready."""
    current = replicas.current
    high = max(targets.max_replicas, targets.min_replicas)
    low = targets.min_replicas

    if current == 0 and held > 0:
        wanted = _clamp(1, max(low, 1), high)
        why = f"scale from zero: {held} requests held by the router"
        return Decision(wanted, why, wanted, fast_path=True)

    if signals is None or not is_fresh(signals, now, tuning):
        held = _clamp(current, low, high)
        age = "none" if signals is None else f"{now - signals.observed_at:.0f}s old"
        return Decision(held, f"metrics missing or stale ({age}): holding at {held}", held)

    described = _describe(signals, targets)
    load = load_in_replicas(signals, capacity, history.arrival_rate(signals, now), tuning.backlog_drain_s)
    sized = None if load is None else _ceil(load / tuning.target_utilization)

    # Zero replicas: wake up on the first request seen anywhere (gateway queue included).
    if current == 0:
        if signals.has_demand:
            wanted = _clamp(max(1, sized or 1), max(low, 1), high)
            return Decision(wanted, f"scale from zero on demand ({described})", wanted, fast_path=True)
        held = _clamp(0, low, high)
        return Decision(held, "idle at zero" if held == 0 else f"raise to minReplicas {held}", held)

    # Scale to zero after the idle period; until then keep at least one replica.
    if targets.scale_to_zero and low == 0:
        if not signals.has_demand:
            idle_since = history.last_active if history.last_active is not None else now
            idle_for = now - idle_since
            if idle_for >= targets.idle_seconds_before_zero:
                return Decision(0, f"no requests for {idle_for:.0f}s: scale to zero", 0)
        low = 1

    ready = max(replicas.ready, 1)
    error = latency_error(signals, targets)
    tolerance = tuning.tolerance
    over = error is not None and error > 1 + tolerance
    queue_need = 0
    queue_over = False
    if targets.queue_depth_target:
        queue_need = _ceil(signals.queue_depth / targets.queue_depth_target)
        queue_over = signals.queue_depth > targets.queue_depth_target * replicas.ready * (1 + tolerance)
    under = (error is None or error < 1 - tolerance) and not queue_over

    if over or queue_over:
        feedback = 0
        settled = history.last_scale_up is None or now - history.last_scale_up >= tuning.feedback_settle_s
        if over and error is not None and settled and replicas.ready >= current:
            factor = min(error**tuning.feedback_gain, tuning.max_feedback_ratio)
            feedback = max(_ceil(ready * factor), ready + 1)
        raw = max(sized or 0, feedback, queue_need, current)
        why = f"over target ({described})"
    elif under:
        if sized is not None:
            raw = max(sized, queue_need, 1 if signals.has_demand else 0)
            why = (
                f"capacity sizing: load {load:.2f} replicas at {tuning.target_utilization:.0%} ({described})"
            )
        elif not signals.has_demand:
            raw = low
            why = f"no requests in the window ({described})"
        else:
            step_down = error is not None and error < 0.5 and signals.queue_depth == 0
            raw = current - 1 if step_down else current
            why = f"no measured capacity; under target ({described})"
        if raw != current and abs(raw - current) <= tolerance * current:
            raw = current
            why = f"within tolerance ({described})"
    else:
        raw = max(sized or 0, queue_need, current)
        why = f"within the latency band ({described})"

    recommendation = _clamp(raw, low, high)
    if replicas.ready == 0 and recommendation < current:
        return Decision(current, f"no replica ready yet: holding at {current}", current)

    if recommendation > current:
        if is_burst(signals, replicas, history, now, tuning):
            return Decision(recommendation, f"burst fast path: {why}", recommendation, fast_path=True)
        window = [r for t, r in history.recommendations if now - t < targets.scale_up_window_s]
        desired = max(current, min([*window, recommendation]))
        step = max(tuning.scale_up_step_min, _ceil(current * tuning.scale_up_step_ratio))
        desired = _clamp(min(desired, current + step), low, high)
        return Decision(desired, f"scale up: {why}", recommendation)
    if recommendation < current:
        window = [r for t, r in history.recommendations if now - t < targets.scale_down_window_s]
        desired = min(current, max([*window, recommendation]))
        step = max(tuning.scale_down_step_min, math.floor(current * tuning.scale_down_step_ratio))
        desired = _clamp(max(desired, current - step), low, high)
        if desired == current:
            return Decision(current, f"scale-down stabilizing: {why}", recommendation)
        return Decision(desired, f"scale down: {why}", recommendation)
    return Decision(current, f"steady: {why}", recommendation)
