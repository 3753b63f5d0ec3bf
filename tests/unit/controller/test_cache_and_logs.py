"""The watch cache keeps the newest copy of an object; operator logs are one JSON object a line."""

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


def test_cache_ignores_an_older_copy_of_the_same_object() -> None:
    cache = ObjectCache()
    cache.put(obj("10", phase="Ready"))
    cache.put(obj("9", phase="Building"))  # a late watch event after our own write's answer
    assert cache.get("LLMEngine", "ns", "e")["status"] == {"phase": "Ready"}  # type: ignore[index]
    cache.put(obj("3", uid="u2", phase="Pending"))  # a new incarnation replaces the old one
    assert cache.get("LLMEngine", "ns", "e")["status"] == {"phase": "Pending"}  # type: ignore[index]
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
