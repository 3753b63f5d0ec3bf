"""The operator's node cache: one list however many reconcilers ask at once, and watch events that
arrive during that list are not lost under its older copies."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kiln.controller.nodes import NodeCache


def node(name: str, gpus: int) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}


def gpus_by_name(cache: NodeCache) -> dict[str, int]:
    return {n.name: n.gpus for n in cache.all()}


def test_concurrent_first_uses_share_one_list() -> None:
    lists = 0
    release = threading.Event()

    def list_nodes() -> Iterator[dict[str, Any]]:
        nonlocal lists
        lists += 1
        release.wait(5)  # a slow list of thousands of nodes: every other reconciler asks meanwhile
        yield from (node("a", 8), node("b", 8))

    cache = NodeCache(list_nodes)
    seen: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda: seen.append(gpus_by_name(cache))) for _ in range(8)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(5)
    assert lists == 1
    assert seen == [{"a": 8, "b": 8}] * 8


def test_events_during_the_list_win_over_its_copies() -> None:
    cache: NodeCache

    def list_nodes() -> Iterator[dict[str, Any]]:
        yield node("a", 8)
        # The watch delivers newer versions while the list's later pages are still being read.
        cache.changed("MODIFIED", node("a", 4))
        cache.changed("DELETED", node("b", 8))
        cache.changed("ADDED", node("c", 2))
        yield node("b", 8)

    cache = NodeCache(list_nodes)
    assert gpus_by_name(cache) == {"a": 4, "c": 2}


def test_events_before_the_first_use_wait_for_the_list_and_later_ones_apply() -> None:
    cache = NodeCache(lambda: iter([node("a", 8)]))
    cache.changed("ADDED", node("z", 8))  # nothing loaded: the list will have it if it exists
    assert gpus_by_name(cache) == {"a": 8}
    cache.changed("MODIFIED", node("a", 6))
    cache.changed("ADDED", node("b", 8))
    cache.changed("DELETED", node("a", 6))
    assert gpus_by_name(cache) == {"b": 8}


def test_a_failed_list_is_tried_again_on_the_next_use() -> None:
    calls = 0

    def list_nodes() -> Iterator[dict[str, Any]]:
        nonlocal calls
        calls += 1
        yield node("a", 8)
        if calls == 1:
            raise ConnectionError("the API server went away mid-list")

    cache = NodeCache(list_nodes)
    with pytest.raises(ConnectionError):
        cache.all()
    cache.changed("ADDED", node("b", 8))  # after the failed list: not loaded, so left to the next list
    assert gpus_by_name(cache) == {"a": 8}
    assert calls == 2
