"""How many threads xgrammar's batch fill gets: serial while fills are cheap, threaded once they are
not, and serial again when a periodic serial probe finds them cheap."""

from __future__ import annotations

import pytest

from kiln_engine import grammar
from kiln_engine.grammar import (
    MAX_FILL_THREADS,
    MULTI_THREAD_ABOVE_S,
    PROBE_EVERY,
    FillThreads,
    threads_for_fill,
)

CHEAP, COSTLY = MULTI_THREAD_ABOVE_S / 10, MULTI_THREAD_ABOVE_S * 10


def test_a_cheap_fill_stays_on_the_calling_thread() -> None:
    assert threads_for_fill(CHEAP, cpus=16) == 1


def test_a_costly_fill_gets_threads_leaving_a_core_for_the_engine_loop() -> None:
    assert threads_for_fill(COSTLY, cpus=4) == 3
    assert threads_for_fill(COSTLY, cpus=64) == MAX_FILL_THREADS


def test_two_cores_get_no_threads() -> None:
    assert threads_for_fill(COSTLY, cpus=2) == 1


def run(fills: FillThreads, serial_s: float, steps: int) -> list[int]:
    counts = []
    for _ in range(steps):
        threads = fills.next()
        fills.took(threads, serial_s if threads == 1 else serial_s / threads)
        counts.append(threads)
    return counts


def test_fills_go_threaded_after_one_costly_serial_fill_and_probe_serially() -> None:
    fills = FillThreads(cpus=16)
    counts = run(fills, COSTLY, 2 * PROBE_EVERY + 1)
    assert counts[0] == 1 and counts[1] == 8
    serial = [i for i, n in enumerate(counts) if n == 1]
    assert serial == [0, PROBE_EVERY, 2 * PROBE_EVERY]


def test_fills_that_turn_cheap_go_serial_at_the_next_probe() -> None:
    fills = FillThreads(cpus=16)
    run(fills, COSTLY, 2)
    counts = run(fills, CHEAP, PROBE_EVERY)
    first_cheap_probe = PROBE_EVERY - 2
    assert set(counts[:first_cheap_probe]) == {8}
    assert set(counts[first_cheap_probe:]) == {1}


def test_a_fixed_count_overrides_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grammar, "FILL_THREADS", 4)
    assert run(FillThreads(cpus=16), CHEAP, 3) == [4, 4, 4]
