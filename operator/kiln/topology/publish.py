"""The Node labels and annotation the topology agent publishes for a discovery (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from kiln import labels
from kiln.topology.discovery import Discovery

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def product_label_value(nvml_name: str) -> str:
    """A GPU product name as GFD labels it: "NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3"."""
    value = _LABEL_VALUE_BAD.sub("-", nvml_name.strip())
    return value[:63].strip("-_.")


def islands_annotation(islands: list[list[int]]) -> str:
    """The `kiln.dev/nvlink-islands` annotation value: compact JSON, e.g. "[[0,1],[2,3]]"."""
    return json.dumps(islands, separators=(",", ":"))


def node_patch(discovery: Discovery, node_labels: Mapping[str, str]) -> dict[str, Any]:
    """A merge patch for the Node: Kiln's NVLink labels and annotation, plus GPU product and memory
    labels only where GPU Feature Discovery has not published them (GFD stays the owner when present).
    """
    islands = discovery.islands()
    new_labels: dict[str, str] = {
        labels.NVLINK_MAX_ISLAND: str(discovery.max_island()),
        labels.NVLINK_ISLAND_COUNT: str(len(islands)),
    }
    product = discovery.product()
    if product is not None and labels.GPU_PRODUCT not in node_labels:
        new_labels[labels.GPU_PRODUCT] = product_label_value(product)
    memory = discovery.memory_mib()
    if memory is not None and labels.GPU_MEMORY_MIB not in node_labels:
        new_labels[labels.GPU_MEMORY_MIB] = str(memory)
    return {
        "metadata": {
            "labels": new_labels,
            "annotations": {labels.NVLINK_ISLANDS: islands_annotation(islands)},
        }
    }


def dry_run_report(discovery: Discovery, node_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything the agent saw and would publish, for `--dry-run` (recorded on real GPU machines)."""
    return {
        "discovery": discovery.model_dump(mode="json"),
        "nvlink_matrix": [[int(cell) for cell in row] for row in discovery.nvlink_matrix()],
        "islands": discovery.islands(),
        "max_island": discovery.max_island(),
        "patch": node_patch(discovery, node_labels or {}),
    }
