"""The reconcile work queue: deduplicates keys, never runs one key twice at once, re-runs a key
queued during its run, and delays retries."""

from __future__ import annotations

import threading
import time
from collections import Counter

from kiln.controller.workqueue import WorkQueue


def test_a_key_queued_many_times_before_a_worker_takes_it_runs_once() -> None:
    seen: Counter[str] = Counter()
    queue: WorkQueue[str] = WorkQueue(lambda key: seen.update([key]), workers=2)
    for _ in range(50):
        queue.add("a")
    queue.add("b")
    queue.start()
    try:
        assert queue.wait_idle(5)
    finally:
        queue.stop()
    assert seen == {"a": 1, "b": 1}


def test_one_key_never_runs_concurrently_and_a_change_during_a_run_is_seen() -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    runs: Counter[str] = Counter()
    entered = threading.Event()
    release = threading.Event()

    def handle(key: str) -> None:
        if key in running:
            overlaps.append(key)
        running.add(key)
        runs[key] += 1
        if runs[key] == 1:
            entered.set()
            release.wait(5)
        running.discard(key)

    queue: WorkQueue[str] = WorkQueue(handle, workers=4)
    queue.start()
    try:
        queue.add("k")
        assert entered.wait(5)
        for _ in range(10):  # arrive while "k" runs: one more run afterwards, not ten, not concurrent
            queue.add("k")
        time.sleep(0.1)
        assert runs["k"] == 1
        release.set()
        assert queue.wait_idle(5)
    finally:
        queue.stop()
    assert overlaps == [] and runs["k"] == 2


def test_delayed_add_waits() -> None:
    times: list[float] = []
    queue: WorkQueue[str] = WorkQueue(lambda key: times.append(time.monotonic()), workers=1)
    queue.start()
    try:
        started = time.monotonic()
        queue.add("later", delay=0.3)
        deadline = time.monotonic() + 5
        while not times and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.stop()
    assert times and times[0] - started >= 0.29


def test_a_failing_handler_does_not_kill_the_worker() -> None:
    handled: list[str] = []

    def handle(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        handled.append(key)

    queue: WorkQueue[str] = WorkQueue(handle, workers=1)
    queue.add("bad")
    queue.add("good")
    queue.start()
    try:
        assert queue.wait_idle(5)
    finally:
        queue.stop()
    assert handled == ["good"]
