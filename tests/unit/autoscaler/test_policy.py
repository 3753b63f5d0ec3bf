"""Kiln's scaling policy, decision by decision, with plain values."""

from __future__ import annotations

from dataclasses import replace

import pytest

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
from kiln_autoscaler.policy import decide, load_in_replicas, with_router_in_flight

NOW = 10_000.0
TARGETS = Targets(min_replicas=1, max_replicas=20, ttft_p50_target_s=0.5, scale_down_window_s=300.0)
# One replica: 10k prompt tokens/s, 1000 output tokens/s, 16 concurrent requests within target.
CAPACITY = Capacity(output_tokens_per_second=1000.0, prefill_tokens_per_second=10_000.0,
                    max_concurrency_at_ttft_target=16.0)  # fmt: skip


def signals(**values: float | None) -> Signals:
    base: dict[str, float | None] = dict(
        observed_at=NOW, ttft_p50_s=0.2, ttft_p90_s=0.4, queue_depth=0.0, running=8.0,
        request_rate=4.0, prompt_token_rate=4000.0, output_token_rate=400.0, pods=4,
    )  # fmt: skip
    base.update(values)
    return Signals(**base)  # type: ignore[arg-type]


def run(
    s: Signals | None,
    current: int = 4,
    ready: int | None = None,
    history: History | None = None,
    targets: Targets = TARGETS,
    capacity: Capacity = CAPACITY,
    tuning: Tuning = DEFAULT_TUNING,
) -> Decision:
    return decide(
        targets, s, Replicas(current, current if ready is None else ready), capacity,
        history or History(), NOW, tuning,
    )  # fmt: skip


def test_load_adds_prefill_and_decode_time_and_takes_the_larger_of_work_and_concurrency() -> None:
    # 4000/10000 + 400/1000 = 0.8 replicas of work; 8 running / 16 = 0.5
    assert load_in_replicas(signals(), CAPACITY) == pytest.approx(0.8)
    assert load_in_replicas(signals(running=32.0), CAPACITY) == pytest.approx(2.0)
    # requests arriving twice as fast as they finish double the work estimate
    assert load_in_replicas(signals(), CAPACITY, arrival_rate=8.0) == pytest.approx(1.6)
    # waiting requests add what drains them within the drain time: 60 * 0.2 replica-s / 60 s
    assert load_in_replicas(signals(queue_depth=60.0), CAPACITY) == pytest.approx(1.0)
    assert load_in_replicas(signals(), Capacity()) is None


def test_missing_or_stale_signals_never_scale_down() -> None:
    for s in (None, signals(observed_at=NOW - 600, running=0.0, request_rate=0.0)):
        decision = run(s, current=6)
        assert decision.desired == 6
        assert "stale" in decision.reason or "missing" in decision.reason


def test_missing_signals_still_respect_min_and_max() -> None:
    assert run(None, current=0, targets=replace(TARGETS, min_replicas=2)).desired == 2
    assert run(None, current=30).desired == 20


def test_over_target_scales_up_by_the_ttft_error_at_least_one_replica() -> None:
    # ttft 4x target: factor min(4 ** 0.5, 2) = 2 -> 8 replicas, within the step limit of +4
    decision = run(signals(ttft_p50_s=2.0), current=4)
    assert decision.desired == 8
    assert decision.reason.startswith("scale up")
    # slightly over (1.2x): sqrt -> 1.095 * 4 = 4.4 -> 5, never less than ready + 1
    assert run(signals(ttft_p50_s=0.6), current=4).desired == 5


def test_p90_target_counts_when_set() -> None:
    targets = replace(TARGETS, ttft_p90_target_s=1.0)
    assert run(signals(ttft_p90_s=3.0), targets=targets).desired > 4
    assert run(signals(ttft_p90_s=3.0)).desired <= 4  # no p90 target: p90 ignored


def test_p95_target_scales_up_when_it_alone_is_violated() -> None:
    targets = replace(TARGETS, ttft_p95_target_s=1.0)
    # p50 well under its target (0.2 / 0.5) and load that capacity sizing calls small
    decision = run(signals(ttft_p95_s=2.5), targets=targets)
    assert decision.desired > 4 and "ttft p95 2500ms/1000ms" in decision.reason
    assert run(signals(ttft_p95_s=0.9), targets=targets).desired <= 4  # met: no scale-up
    assert run(signals(ttft_p95_s=2.5)).desired <= 4  # no p95 target: p95 ignored


def test_itl_target_at_its_percentile_scales_up_when_violated() -> None:
    itl = replace(TARGETS, itl_target_s=0.03, itl_percentile=90)
    slow_tail = signals(itl_p50_s=0.02, itl_p90_s=0.06)
    decision = run(slow_tail, targets=itl)
    assert decision.desired > 4 and "itl p90 60ms/30ms" in decision.reason
    # the same signals against a p50 ITL target are within it
    assert run(slow_tail, targets=replace(itl, itl_percentile=50)).desired <= 4
    assert run(slow_tail).desired <= 4  # no ITL target: ITL ignored


def test_the_worst_violated_target_sets_the_feedback() -> None:
    targets = replace(TARGETS, ttft_p95_target_s=1.0, itl_target_s=0.02)
    # p95 at 1.2x, ITL at 4x: sqrt(4) = 2 -> 8 replicas (ITL drives it)
    assert run(signals(ttft_p95_s=1.2, itl_p50_s=0.08), targets=targets).desired == 8
    assert run(signals(ttft_p95_s=1.2, itl_p50_s=0.01), targets=targets).desired == 5


def test_ttft_feedback_waits_for_replicas_that_are_starting_and_after_a_scale_up() -> None:
    # 4 asked for, 2 ready: TTFT over target is already being handled
    assert run(signals(ttft_p50_s=2.0), current=4, ready=2).desired == 4
    recent = History(last_scale_up=NOW - 20)
    assert run(signals(ttft_p50_s=2.0), current=4, history=recent).desired == 4
    settled = History(last_scale_up=NOW - 120)
    assert run(signals(ttft_p50_s=2.0), current=4, history=settled).desired == 8


def test_inside_the_band_nothing_scales_down_but_feed_forward_may_scale_up() -> None:
    decision = run(signals(ttft_p50_s=0.5, running=2.0, prompt_token_rate=100.0, output_token_rate=10.0))
    assert decision.desired == 4
    # demand the capacity model says needs 4.0 / 0.6 -> 7 replicas
    busy = signals(ttft_p50_s=0.5, prompt_token_rate=20_000.0, output_token_rate=2000.0)
    assert run(busy).desired == 7


def test_under_target_scales_down_to_the_capacity_sizing_after_the_window() -> None:
    quiet = signals(ttft_p50_s=0.1, running=4.0, prompt_token_rate=3000.0, output_token_rate=300.0)
    # load 0.6 replicas at 60% utilization -> 1; step limit -max(1, 25%) from 8 -> 6
    assert run(quiet, current=8).desired == 6
    # a higher recommendation inside the down window holds the count there
    history = History(recommendations=((NOW - 100, 7),))
    assert run(quiet, current=8, history=history).desired == 7
    # recommendations older than the window do not
    old = History(recommendations=((NOW - 400, 8),))
    assert run(quiet, current=8, history=old).desired == 6


def test_scale_up_window_takes_the_lowest_recent_recommendation() -> None:
    targets = replace(TARGETS, scale_up_window_s=60.0)
    history = History(recommendations=((NOW - 30, 5),))
    assert run(signals(ttft_p50_s=2.0), targets=targets, history=history).desired == 5


def test_step_limit_bounds_a_normal_scale_up_and_the_burst_fast_path_skips_it() -> None:
    huge = signals(ttft_p50_s=0.5, prompt_token_rate=100_000.0, output_token_rate=10_000.0)
    assert run(huge, current=2).desired == 6  # +max(4, 100%)
    burst = replace(huge, queue_depth=40.0)  # >= 2 waiting per ready replica
    decision = run(burst, current=2)
    assert decision.fast_path
    assert decision.desired == 20  # capacity says 34: clamped to max


def test_a_demand_jump_over_the_last_minute_is_a_burst() -> None:
    history = History(demand=((NOW - 30, 10.0, 4.0), (NOW - 15, 12.0, 4.0)))
    jump = signals(ttft_p50_s=0.5, running=40.0, prompt_token_rate=60_000.0, output_token_rate=6000.0)
    assert run(jump, current=2, history=history).fast_path
    assert not run(jump, current=2).fast_path


def test_requests_the_routers_count_before_the_engines_do_size_the_deployment() -> None:
    # The engines' series (a scrape and a rate window old) show 2 replicas at ease; 30 more requests
    # have reached the routers since: at the engines, they count as running.
    calm = signals(ttft_p50_s=0.2, running=8.0, queue_depth=0.0)
    assert run(calm, current=2).desired == 2
    merged = with_router_in_flight(calm, 38.0)
    assert (merged.queue_depth, merged.running) == (0.0, 38.0)
    assert run(merged, current=2).desired == 4  # 38 / 16 per replica at 60% utilization
    # after a calm minute that jump is a burst: no scale-up window, no step limit
    history = History(demand=((NOW - 30, 8.0, 4.0), (NOW - 15, 8.0, 4.0)))
    assert run(merged, current=2, history=history).fast_path
    # routers that count fewer (requests sent around them, or finished since) change nothing
    assert with_router_in_flight(calm, 5.0) == calm


def test_tolerance_ignores_small_changes() -> None:
    tuning = Tuning(tolerance=0.2)
    # sized 9 vs current 10: within 20%, and under target
    s = signals(ttft_p50_s=0.1, prompt_token_rate=25_000.0, output_token_rate=2700.0)
    assert run(s, current=10, tuning=tuning).desired == 10


def test_scale_from_zero_on_the_first_queued_request() -> None:
    targets = replace(TARGETS, min_replicas=0, scale_to_zero=True)
    waking = signals(ttft_p50_s=None, ttft_p90_s=None, queue_depth=1.0, running=0.0, request_rate=0.0,
                     prompt_token_rate=0.0, output_token_rate=0.0, pods=0)  # fmt: skip
    decision = run(waking, current=0, targets=targets)
    assert decision.desired == 1
    assert decision.fast_path
    idle = replace(waking, queue_depth=0.0)
    assert run(idle, current=0, targets=targets).desired == 0


def test_requests_held_by_the_router_wake_a_deployment_at_zero_without_engine_series() -> None:
    # At zero there is no engine to scrape: the signals are missing, and only the router knows.
    targets = replace(TARGETS, min_replicas=0, scale_to_zero=True)
    at_zero = Replicas(0, 0)
    woken = decide(targets, None, at_zero, CAPACITY, History(), NOW, held=3)
    assert (woken.desired, woken.fast_path) == (1, True)
    assert "3 requests held by the router" in woken.reason
    assert decide(targets, None, at_zero, CAPACITY, History(), NOW, held=0).desired == 0
    # a replica already asked for (starting, not ready) is not added to by held requests
    starting = decide(targets, None, Replicas(1, 0), CAPACITY, History(), NOW, held=3)
    assert starting.desired == 1


def test_scale_to_zero_only_after_the_idle_period() -> None:
    targets = replace(TARGETS, min_replicas=0, scale_to_zero=True, idle_seconds_before_zero=900.0)
    idle = signals(ttft_p50_s=None, ttft_p90_s=None, running=0.0, request_rate=0.0, prompt_token_rate=0.0,
                   output_token_rate=0.0)  # fmt: skip
    assert run(idle, current=1, targets=targets, history=History(last_active=NOW - 1000)).desired == 0
    assert run(idle, current=1, targets=targets, history=History(last_active=NOW - 100)).desired == 1
    # without scaleToZero the floor is minReplicas even when idle for long
    assert run(idle, current=1, history=History(last_active=NOW - 10_000)).desired == 1


def test_no_measured_capacity_steps_down_one_at_a_time_when_well_under_target() -> None:
    s = signals(ttft_p50_s=0.1)
    assert run(s, current=5, capacity=Capacity()).desired == 4
    assert run(signals(ttft_p50_s=0.4), current=5, capacity=Capacity()).desired == 5
    idle = signals(ttft_p50_s=None, ttft_p90_s=None, running=0.0, request_rate=0.0, prompt_token_rate=0.0,
                   output_token_rate=0.0)  # fmt: skip
    assert run(idle, current=3, capacity=Capacity()).desired == 2  # toward minReplicas, step-limited


def test_queue_depth_target_scales_up_without_ttft_samples() -> None:
    targets = replace(TARGETS, queue_depth_target=5.0)
    s = signals(ttft_p50_s=None, ttft_p90_s=None, queue_depth=60.0)
    decision = run(s, current=4, targets=targets, capacity=Capacity())
    assert decision.desired == 12  # 60 waiting / 5 per replica; a burst, so no step limit


def test_no_ready_replica_never_scales_down() -> None:
    quiet = signals(ttft_p50_s=None, running=0.0, request_rate=0.0, prompt_token_rate=0.0,
                    output_token_rate=0.0, pods=0)  # fmt: skip
    assert run(quiet, current=3, ready=0).desired == 3


def test_history_records_recommendations_demand_activity_and_scale_ups() -> None:
    decision = Decision(desired=5, reason="x", recommendation=6)
    history = History().record(NOW, decision, signals(), current=4)
    assert history.recommendations == ((NOW, 6),)
    assert history.demand == ((NOW, 8.0, 4.0),)
    assert history.last_active == NOW
    assert history.last_scale_up == NOW
    later = history.record(NOW + 15, Decision(5, "x", 5), signals(running=20.0), current=5)
    assert later.last_scale_up == NOW
    assert later.arrival_rate(signals(running=20.0), NOW + 30) == pytest.approx(4.0)
    assert history.arrival_rate(signals(running=20.0), NOW + 15) == pytest.approx(4.0 + 12 / 15)
    pruned = History(horizon_s=10).record(NOW, decision, None, 4).record(NOW + 20, decision, None, 5)
    assert pruned.recommendations == ((NOW + 20, 6),)
