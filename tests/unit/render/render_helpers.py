"""Builders for renderer tests: deployments from the examples, engines in each phase, cluster nodes."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kiln.api.v1alpha1 import LLMDeployment, LLMEngine
from kiln.local.topology import load_topology
from kiln.placement import NodeTopology
from kiln.render import engine as render_engine

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
VERSION = "0.1.0"
NOW_TEXT = "2026-12-02T14:00:00Z"


def example(name: str, namespace: str = "serving", **spec: Any) -> LLMDeployment:
    """An example LLMDeployment as the API server would return it (uid, generation), spec keys merged."""
    data = yaml.safe_load((EXAMPLES / name).read_text())
    data["metadata"].update(namespace=namespace, uid=f"uid-{data['metadata']['name']}", generation=1)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(data["spec"].get(key), dict):
            data["spec"][key] = {**data["spec"][key], **value}
        else:
            data["spec"][key] = value
    return LLMDeployment.model_validate(data)


def engine_for(deployment: LLMDeployment, status: dict[str, Any] | None = None) -> LLMEngine:
    """The LLMEngine a deployment needs, as created (uid, generation) with `status`."""
    manifest = copy.deepcopy(render_engine.engine(deployment, VERSION))
    manifest["metadata"].update(uid="uid-engine", generation=1)
    if status is not None:
        manifest["status"] = status
    return LLMEngine.model_validate(manifest)


def ready(deployment: LLMDeployment, uri: str | None = None) -> LLMEngine:
    """A built engine for `deployment`."""
    base = engine_for(deployment)
    artifact = uri or f"{base.spec.cache}/{base.metadata.name}"
    return engine_for(
        deployment,
        {
            "phase": "Ready",
            "artifact": {"uri": artifact, "manifestSha256": "ab" * 32},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Built", "lastTransitionTime": NOW_TEXT}
            ],
        },
    )


def nodes(topology: str = "mixed") -> list[NodeTopology]:
    return [NodeTopology.from_node(node) for node in load_topology(topology)]


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True
