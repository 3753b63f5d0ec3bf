"""The watch cache keeps the newest copy (resourceVersions opaque); logs are one JSON object a line."""

from __future__ import annotations

import json
import logging

from kiln.controller.cli import JSONFormatter
from kiln.controller.reconcile import ObjectCache


def obj(version: str, uid: str = "u1", phase: str = "") -> dict[str, object]:
    return {
        "kind": "LLMEngine",
        "metadata": {"name": "e", "namespace": "ns", "uid": uid, "resourceVersion": version},
        "status": {"phase": phase},
    }


def phase(cache: ObjectCache) -> str:
    return cache.get("LLMEngine", "ns", "e")["status"]["phase"]  # type: ignore[index,no-any-return]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_late_watch_event_never_replaces_our_fresher_write_with_opaque_versions() -> None:
    """resourceVersions are opaque strings: the cache compares them only for equality."""
    cache = ObjectCache()
    cache.observe(obj("zz-first", phase="Pending"))
    cache.put(obj("aa-ours", phase="Ready"))  # the answer to our write
    cache.observe(obj("mm-between", phase="Building"))  # a watch event from before our write
    assert phase(cache) == "Ready"
    cache.observe(obj("aa-ours", phase="Ready"))  # the stream reaches our write
    cache.observe(obj("11", phase="Failed"))  # so what follows is newer, whatever its version
    assert phase(cache) == "Failed"


def test_the_watch_wins_again_if_it_never_delivers_our_write() -> None:
    clock = Clock()
    cache = ObjectCache(clock=clock, confirm_seconds=30.0)
    cache.put(obj("ours", phase="Ready"))
    cache.observe(obj("late", phase="Building"))
    assert phase(cache) == "Ready"
    clock.now = 31.0  # e.g. the watch re-listed past our version
    cache.observe(obj("after-relist", phase="Failed"))
    assert phase(cache) == "Failed"


def test_an_event_held_back_becomes_the_copy_once_the_window_passes_with_no_event_after_it() -> None:
    """The watch re-listed past our write and the object then stayed still: the event held back
    is the newest copy, and the caller is told to look again when the window has passed."""
    clock = Clock()
    cache = ObjectCache(clock=clock, confirm_seconds=30.0)
    cache.put(obj("ours", phase="Deploying"))
    assert cache.observe(obj("relisted", phase="Ready")) is False  # held back: look again later
    assert phase(cache) == "Deploying"
    clock.now = 30.0
    assert phase(cache) == "Ready"
    assert [o["status"]["phase"] for o in cache.items("LLMEngine")] == ["Ready"]
    cache.observe(obj("ours", phase="Deploying"))  # a stream this late would still win
    assert phase(cache) == "Deploying"


def test_the_event_for_our_write_drops_what_was_held_back_before_it() -> None:
    clock = Clock()
    cache = ObjectCache(clock=clock, confirm_seconds=30.0)
    cache.put(obj("ours", phase="Ready"))
    cache.observe(obj("older", phase="Building"))  # from before our write
    assert cache.observe(obj("ours", phase="Ready")) is True
    clock.now = 60.0
    assert phase(cache) == "Ready"


def test_a_read_answer_never_holds_back_the_watch() -> None:
    """A get or list can be older than the watch's first event and carry a version the watch never
    delivers (it started after it): the operator's restart, when its resync lists everything."""
    cache = ObjectCache()
    cache.put_read(obj("listed", phase="Building"))
    assert phase(cache) == "Building"
    assert cache.observe(obj("watch-start", phase="Ready")) is True
    assert phase(cache) == "Ready"
    cache.put_read(obj("listed-late", phase="Building"))  # the watch has it: a read changes nothing
    assert phase(cache) == "Ready"


def test_a_resync_of_an_unchanged_object_does_not_hold_back_the_watch() -> None:
    cache = ObjectCache()
    cache.observe(obj("v1", phase="Pending"))
    cache.put(obj("v1", phase="Pending"))  # a full list returns the copy the watch already gave
    cache.observe(obj("v2", phase="Ready"))
    assert phase(cache) == "Ready"


def test_an_answer_the_watch_already_passed_is_ignored() -> None:
    cache = ObjectCache()
    cache.observe(obj("ours", phase="Ready"))  # the watch delivered our write before its answer came
    cache.observe(obj("theirs", phase="Failed"))  # and someone else's change after it
    cache.put(obj("ours", phase="Ready"))
    assert phase(cache) == "Failed"
    cache.observe(obj("next", phase="Building"))
    assert phase(cache) == "Building"


def test_a_new_incarnation_replaces_the_old_one_and_drop_forgets() -> None:
    cache = ObjectCache()
    cache.observe(obj("10", phase="Ready"))
    cache.observe(obj("3", uid="u2", phase="Pending"))
    assert phase(cache) == "Pending"
    cache.drop("LLMEngine", "ns", "e")
    assert cache.get("LLMEngine", "ns", "e") is None and cache.items("LLMEngine") == []


def test_json_logs_carry_message_level_and_extras() -> None:
    record = logging.LogRecord("kiln.x", logging.WARNING, __file__, 1, "built %s", ("e1",), None)
    record.object = "LLMEngine/ns/e1"
    line = json.loads(JSONFormatter().format(record))
    assert (line["level"], line["logger"], line["message"], line["object"]) == (
        "warning",
        "kiln.x",
        "built e1",
        "LLMEngine/ns/e1",
    )
    assert line["time"].endswith("Z")
