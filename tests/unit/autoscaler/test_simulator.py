"""The serving simulator: costs follow the replica profile, requests are conserved, policies act."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kiln_autoscaler.baselines import HpaConcurrencyPolicy, KilnPolicy, StaticPolicy
from kiln_autoscaler.data import Targets
from kiln_autoscaler.sim.simulator import ReplicaProfile, SimConfig, simulate, weighted_quantile
from kiln_autoscaler.sim.traces import Request, Trace, steady, step

PROFILE = ReplicaProfile(max_batch=4, prefill_tokens_per_second=1000.0, itl_min_s=0.01, itl_max_s=0.04,
                         prefill_chunk_tokens=100, start_delay_s=30.0)  # fmt: skip
TARGETS = Targets(min_replicas=1, max_replicas=10, ttft_p50_target_s=0.5)
SERVING = ReplicaProfile(start_delay_s=30.0)  # the bench's replica, for traffic from the trace generators


def test_one_request_costs_its_prefill_then_decodes_at_batch_one() -> None:
    trace = Trace("one", (Request(1.0, 500, 11),), 60.0)
    result = simulate(trace, StaticPolicy(1), SimConfig(TARGETS, PROFILE, initial_replicas=1))
    assert result.ttfts == [pytest.approx(0.5)]  # 500 tokens at 1000 tokens/s
    assert result.replica_hours == pytest.approx(60 / 3600)


def test_a_full_batch_queues_the_next_request_until_a_slot_frees() -> None:
    requests = tuple(Request(0.0, 10, 100) for _ in range(5))
    result = simulate(
        Trace("five", requests, 60.0), StaticPolicy(1), SimConfig(TARGETS, PROFILE, initial_replicas=1)
    )
    first_four = sorted(result.ttfts[:4])
    assert first_four[-1] < 0.1  # admitted together: tiny prefills back to back
    assert result.ttfts[4] > 1.0  # waited for a decode of ~99 steps to finish


def test_prefill_slows_decoding_on_the_shared_gpu() -> None:
    # a long prompt arriving while another request decodes delays that request's finish
    alone = Trace("alone", (Request(0.0, 10, 200),), 60.0)
    shared = Trace("shared", (Request(0.0, 10, 200), Request(0.5, 3000, 2)), 60.0)
    config = SimConfig(TARGETS, PROFILE, initial_replicas=1)
    base = simulate(alone, StaticPolicy(1), config)
    both = simulate(shared, StaticPolicy(1), config)
    assert both.ttfts[0] == pytest.approx(base.ttfts[0])
    # second request's prefill ran in chunks beside decode steps: slower than 3 s alone
    assert both.ttfts[1] > 3.0


def test_every_request_finishes_and_more_replicas_mean_better_ttft() -> None:
    trace = steady(rate=3.0, duration_s=300.0, seed=5)
    small = simulate(trace, StaticPolicy(1), SimConfig(TARGETS, SERVING, initial_replicas=1))
    large = simulate(trace, StaticPolicy(6), SimConfig(TARGETS, SERVING, initial_replicas=6))
    assert len(small.ttfts) == len(large.ttfts) == len(trace.requests)
    assert all(t >= 0 for t in large.ttfts)
    assert large.minute_attainment() > small.minute_attainment()
    assert large.replica_hours == pytest.approx(6 * 300 / 3600)


def test_policies_scale_up_under_a_step_and_drain_without_losing_requests() -> None:
    trace = step(low=1.0, high=8.0, duration_s=1800.0, seed=2)
    for policy in (KilnPolicy(), HpaConcurrencyPolicy(target_in_flight_per_replica=11.0)):
        result = simulate(trace, policy, SimConfig(TARGETS, SERVING, initial_replicas=1))
        desired = [entry[1] for entry in result.timeline]
        assert max(desired) > 2, policy.name
        assert desired[-1] < max(desired), policy.name  # scaled back down after the step
        assert len(result.ttfts) == len(trace.requests)


def test_scale_from_zero_serves_requests_that_waited_at_the_gateway() -> None:
    targets = Targets(min_replicas=0, max_replicas=4, ttft_p50_target_s=0.5, scale_to_zero=True,
                      idle_seconds_before_zero=60.0)  # fmt: skip
    requests = (Request(100.0, 10, 5), Request(101.0, 10, 5))
    result = simulate(
        Trace("wake", requests, 400.0), KilnPolicy(), SimConfig(targets, PROFILE, initial_replicas=0)
    )
    # the first control pass after the arrival starts a replica, which takes 30 s
    assert 30.0 < result.ttfts[0] < 30.0 + 15.0 + 1.0
    assert [entry[1] for entry in result.timeline][-1] == 0  # idle again: back to zero


def test_summary_reports_attainment_and_cost() -> None:
    trace = steady(rate=1.0, duration_s=180.0, seed=1)
    row = simulate(trace, StaticPolicy(2), SimConfig(TARGETS, SERVING, initial_replicas=2)).summary()
    assert row["requests"] == len(trace.requests)
    assert row["slo_minutes_pct"] == 100.0
    assert row["replica_hours"] == pytest.approx(0.1)


def test_inter_token_latency_follows_the_batch_and_reaches_the_signals() -> None:
    # one request decodes alone at itl_min; four together at itl_max (batch 4 = max_batch)
    alone = simulate(Trace("one", (Request(0.0, 10, 11),), 60.0), StaticPolicy(1),
                     SimConfig(TARGETS, PROFILE, initial_replicas=1))  # fmt: skip
    assert alone.itls == [pytest.approx(0.01)] and alone.gaps == [10]
    four = tuple(Request(0.0, 10, 101) for _ in range(4))
    batch = simulate(
        Trace("four", four, 60.0), StaticPolicy(1), SimConfig(TARGETS, PROFILE, initial_replicas=1)
    )
    # all four decode together at batch 4 (their tiny prefills end within the first step)
    assert batch.itls == [pytest.approx(0.04, rel=0.01)] * 4


def test_minutes_are_judged_by_every_target_and_all_at_once() -> None:
    trace = steady(rate=3.0, duration_s=300.0, seed=5)
    result = simulate(trace, StaticPolicy(3), SimConfig(TARGETS, SERVING, initial_replicas=3))
    strict = Targets(ttft_p50_target_s=10.0, ttft_p95_target_s=0.001, itl_target_s=10.0, itl_percentile=95)
    row = result.summary(judged_by=strict)
    assert row["minutes_ttft_p50_pct"] == 100.0 and row["minutes_itl_p95_pct"] == 100.0
    assert row["minutes_ttft_p95_pct"] == 0.0 and row["minutes_all_pct"] == 0.0
    assert len(row["missed_ttft_p95"]) == 5
    p95 = result.per_minute(0.95)
    assert all(p95[m] >= result.minute_medians()[m] for m in p95)
    assert "minutes_all_pct" not in result.summary()


def test_weighted_quantile_counts_each_value_by_its_weight() -> None:
    assert weighted_quantile(0.5, [(1.0, 1), (2.0, 1), (3.0, 1)]) == 2.0
    assert weighted_quantile(0.5, [(1.0, 1), (9.0, 10)]) == 9.0
    assert weighted_quantile(0.05, [(1.0, 1), (9.0, 10)]) == 1.0


def test_kiln_given_a_tail_target_adds_replicas_that_a_p50_target_does_not() -> None:
    trace = steady(rate=6.0, duration_s=900.0, seed=2)
    config = SimConfig(TARGETS, SERVING, initial_replicas=4)
    median_only = simulate(trace, KilnPolicy(), config)
    tail = simulate(trace, KilnPolicy(), replace(config, targets=replace(TARGETS, ttft_p95_target_s=0.2)))
    assert tail.replica_hours > median_only.replica_hours
    assert tail.quantile(0.95) < median_only.quantile(0.95)


def test_the_chart_draws_each_policy_of_a_trace_as_a_png(tmp_path: Path) -> None:
    from kiln_autoscaler.sim.plot import draw, minute_rates

    trace = steady(rate=2.0, duration_s=150.0, seed=1)
    assert len(minute_rates(trace)) == 3 and sum(minute_rates(trace)) * 60 == len(trace.requests)
    config = SimConfig(replace(TARGETS, ttft_p95_target_s=1.0), SERVING, initial_replicas=2)
    results = [simulate(trace, policy, config) for policy in (StaticPolicy(2), KilnPolicy())]
    path = draw(trace, results, config.targets, tmp_path / "chart.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000


def test_the_first_pass_sees_the_first_minute_and_holds_the_warm_start() -> None:
    seen: list[tuple[float, float, int]] = []

    def recording(targets, signals, replicas, capacity, history, now):  # type: ignore[no-untyped-def]
        seen.append((signals.request_rate, signals.prompt_token_rate, len(history.recommendations)))
        return KilnPolicy()(targets, signals, replicas, capacity, history, now)

    recording.name = "recording"  # type: ignore[attr-defined]
    trace = steady(rate=4.0, duration_s=120.0, seed=3)
    result = simulate(trace, recording, SimConfig(TARGETS, SERVING, initial_replicas=3))  # type: ignore[arg-type]
    first_minute = sum(1 for r in trace.requests if r.arrival_s < 60)
    # most of the first minute's requests finished by t=60: the rate is over the whole minute
    assert seen[0][0] == pytest.approx(first_minute / 60, rel=0.15) and seen[0][1] > 1000
    assert seen[0][2] == 1  # the warm start's count, as the controller seeds a new deployment
    assert result.timeline[0][1] == 3  # not scaled down on the first pass


def test_a_routed_deployment_scales_up_within_seconds_of_a_step_not_at_the_next_pass() -> None:
    # Passes at 60 s + every 15 s (540, 555, ...); the step starts at 546 s.
    trace = step(low=1.0, high=8.0, duration_s=1638.0, seed=2)
    onset = 1638.0 / 3

    def first_scale_up(policy: KilnPolicy) -> float:
        result = simulate(trace, policy, SimConfig(TARGETS, SERVING, initial_replicas=1))
        before = [d for t, d, _, _ in result.timeline if t < onset][-1]
        return next(t for t, d, _, _ in result.timeline if t >= onset and d > before)

    plain = first_scale_up(KilnPolicy())
    assert plain >= 555.0  # the next pass after the onset
    # Woken passes run from the onset on and scale up once the routers' count sizes a second
    # replica: before the next regular pass.
    assert first_scale_up(KilnPolicy(router_wake_s=1.0)) < plain
