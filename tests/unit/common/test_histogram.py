"""Quantiles from histogram buckets follow PromQL's histogram_quantile rules."""

from __future__ import annotations

import math

import pytest

from kiln.common.histogram import bucket_delta, cumulative, histogram_quantile


def test_interpolates_inside_the_bucket_holding_the_rank() -> None:
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (math.inf, 20.0)]
    # rank 10 of 20 is the top of the (0.1, 0.2] bucket
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    # rank 15 is halfway through (0.2, 0.4]
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)


def test_first_bucket_starts_at_zero() -> None:
    assert histogram_quantile(0.5, [(1.0, 4.0), (math.inf, 4.0)]) == pytest.approx(0.5)


def test_rank_in_the_inf_bucket_returns_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.9, [(0.5, 1.0), (1.0, 2.0), (math.inf, 10.0)]) == 1.0


def test_empty_or_malformed_histograms_have_no_quantile() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.5, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, [(0.5, 3.0)]) is None  # no +Inf bucket
    with pytest.raises(ValueError):
        histogram_quantile(1.5, [(math.inf, 1.0)])


def test_cumulative_matches_an_exporter_and_round_trips_the_median() -> None:
    buckets = cumulative([0.1, 0.5, 1.0], [0.05, 0.2, 0.3, 0.7, 2.0])
    assert buckets == [(0.1, 1.0), (0.5, 3.0), (1.0, 4.0), (math.inf, 5.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (2.5 - 1) / 2)


def test_bucket_delta_between_scrapes_and_after_a_restart() -> None:
    older = {0.1: 2.0, math.inf: 3.0}
    newer = {0.1: 5.0, math.inf: 9.0}
    assert bucket_delta(newer, older) == [(0.1, 3.0), (math.inf, 6.0)]
    assert bucket_delta(newer, None) == [(0.1, 5.0), (math.inf, 9.0)]
    assert bucket_delta({0.1: 1.0, math.inf: 1.0}, older) is None  # counters went back: restarted
