"""The autoscaler sizes replicas with a capacity only where it was measured for the deployment's own
TTFT target and percentile (the build measures at the p90 target where one is set, else p50)."""

from __future__ import annotations

from kiln_autoscaler.data import Capacity, Signals, Targets, capacity_for, capacity_from_api, capacity_target
from kiln_autoscaler.policy import load_in_replicas

P50_ONLY = Targets(ttft_p50_target_s=0.3)
WITH_P90 = Targets(ttft_p50_target_s=0.3, ttft_p90_target_s=0.9)


def measured(percentile: int | None, target_ms: int) -> Capacity:
    status = {"outputTokensPerSecond": 800.0, "prefillTokensPerSecond": 9000.0,
              "maxConcurrencyAtTtftTarget": 16, "ttftTargetMs": target_ms}  # fmt: skip
    if percentile is not None:
        status["ttftPercentile"] = percentile
    return capacity_from_api(status)


def test_the_capacity_target_is_the_p90_target_where_set_else_p50() -> None:
    assert capacity_target(P50_ONLY) == (50, 0.3)
    assert capacity_target(WITH_P90) == (90, 0.9)


def test_a_capacity_measured_at_the_deployments_target_is_used_whole() -> None:
    assert capacity_for(measured(50, 300), P50_ONLY) == measured(50, 300)
    assert capacity_for(measured(90, 900), WITH_P90) == measured(90, 900)


def test_a_capacity_measured_for_another_target_keeps_only_its_token_rates() -> None:
    """The old default (p90 at 500 ms) against a p50 300 ms deployment: 16 concurrent requests met a
    looser target, so that figure would under-scale; throughput does not depend on the target."""
    for capacity, targets in (
        (measured(90, 500), P50_ONLY),  # the CLI default the operator used to leave in place
        (measured(50, 300), WITH_P90),  # right target number, wrong percentile
        (measured(None, 300), P50_ONLY),  # measured before the percentile was recorded
    ):
        used = capacity_for(capacity, targets)
        assert used.max_concurrency_at_ttft_target is None
        assert (used.output_tokens_per_second, used.prefill_tokens_per_second) == (800.0, 9000.0)
    # the replicas the running requests alone ask for: none from a mismatched concurrency figure
    busy = Signals(observed_at=0.0, running=32.0)
    assert load_in_replicas(busy, capacity_for(measured(50, 300), P50_ONLY)) == 2.0
    assert load_in_replicas(busy, capacity_for(measured(90, 500), P50_ONLY)) == 0.0
