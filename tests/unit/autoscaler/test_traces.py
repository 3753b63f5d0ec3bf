"""Synthetic traces are seeded and shaped as named; Azure-format CSVs load and round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln_autoscaler.sim import traces


def rate_between(trace: traces.Trace, start: float, end: float) -> float:
    return sum(1 for r in trace.requests if start <= r.arrival_s < end) / (end - start)


def test_same_seed_same_trace_and_arrivals_are_ordered() -> None:
    a, b = traces.steady(seed=3, duration_s=600), traces.steady(seed=3, duration_s=600)
    assert a == b
    assert a != traces.steady(seed=4, duration_s=600)
    times = [r.arrival_s for r in a.requests]
    assert times == sorted(times) and times[-1] < 600
    assert rate_between(a, 0, 600) == pytest.approx(8.0, rel=0.1)


def test_step_triples_the_rate_in_the_middle_third() -> None:
    trace = traces.step(low=5, high=15, duration_s=1800)
    assert rate_between(trace, 0, 600) == pytest.approx(5, rel=0.15)
    assert rate_between(trace, 600, 1200) == pytest.approx(15, rel=0.15)
    assert rate_between(trace, 1200, 1800) == pytest.approx(5, rel=0.15)


def test_diurnal_peaks_in_the_middle_and_bursty_has_bursts() -> None:
    day = traces.diurnal(low=2, high=16, duration_s=3600)
    assert rate_between(day, 1500, 2100) > 3 * rate_between(day, 0, 300)
    bursty = traces.bursty(duration_s=3600)
    per_minute = [rate_between(bursty, m * 60, (m + 1) * 60) for m in range(60)]
    assert max(per_minute) > 1.5 * sorted(per_minute)[30]


def test_flash_crowds_jump_5_to_10x_within_seconds_hold_then_decay() -> None:
    crowds = traces.flash_crowds(duration_s=7200, seed=3)
    assert crowds and all(5 <= c.factor <= 10 and 60 <= c.hold_s <= 180 for c in crowds)
    assert all(c.start_s >= 300 for c in crowds)
    crowd = traces.Crowd(start_s=600, factor=8, rise_s=10, hold_s=120, decay_s=120)
    trace = traces.flash_crowd(base=3.0, duration_s=1500, seed=1, crowds=[crowd])
    calm = rate_between(trace, 0, 590)
    assert calm == pytest.approx(3.0, rel=0.15)
    assert rate_between(trace, 615, 730) == pytest.approx(8 * calm, rel=0.15)  # the plateau
    # 120 s into the decay the excess is e^-1 of the jump: 1 + 7 / e ~ 3.6x
    assert rate_between(trace, 840, 870) / calm == pytest.approx(1 + 7 / 2.718, rel=0.3)
    assert rate_between(trace, 1300, 1500) == pytest.approx(calm, rel=0.2)
    again = traces.flash_crowd(duration_s=900, seed=2)
    assert again == traces.flash_crowd(duration_s=900, seed=2) != traces.flash_crowd(duration_s=900, seed=3)


def test_azure_csv_round_trip_with_published_timestamps(tmp_path: Path) -> None:
    trace = traces.steady(rate=2.0, duration_s=60, seed=9)
    path = tmp_path / "t.csv"
    traces.write_azure_csv(trace, path)
    header, first = path.read_text().splitlines()[:2]
    assert header == "TIMESTAMP,ContextTokens,GeneratedTokens"
    assert len(first.split(",")[0].split(".")[1]) == 7  # 100 ns digits, as Azure publishes them
    loaded = traces.load_azure_csv(path)
    assert len(loaded.requests) == len(trace.requests)
    offset = trace.requests[0].arrival_s
    for original, back in zip(trace.requests, loaded.requests, strict=True):
        assert back.arrival_s == pytest.approx(original.arrival_s - offset, abs=1e-5)
        assert (back.prompt_tokens, back.output_tokens) == (original.prompt_tokens, original.output_tokens)


def test_azure_loader_accepts_seconds_and_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,100,20\n10.0,50,0\n")
    loaded = traces.load_azure_csv(path, time_scale=2.0)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in loaded.requests] == [
        (0.0, 50, 1),
        (0.25, 100, 20),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        traces.load_azure_csv(bad)


def test_shipped_sample_loads() -> None:
    sample = Path(__file__).resolve().parents[3] / "autoscaler" / "traces" / "azure_sample.csv"
    trace = traces.load_azure_csv(sample)
    assert len(trace.requests) > 100
