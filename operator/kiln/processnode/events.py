"""Events the process node reports about pods (`kubectl describe pod`), named as the kubelet names them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

COMPONENT = "kiln-process-node"

# Reasons the kubelet uses.
STARTED = "Started"
KILLING = "Killing"
UNHEALTHY = "Unhealthy"
BACK_OFF = "BackOff"
FAILED = "Failed"


def event_manifest(
    pod: Mapping[str, Any],
    reason: str,
    message: str,
    node: str,
    now: str,
    container: str | None = None,
    warning: bool = False,
) -> dict[str, Any]:
    """A core/v1 Event about `pod` (or one of its containers)."""
    meta = pod["metadata"]
    involved: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta.get("uid", ""),
    }
    if container:
        involved["fieldPath"] = f"spec.containers{{{container}}}"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": "Warning" if warning else "Normal",
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
