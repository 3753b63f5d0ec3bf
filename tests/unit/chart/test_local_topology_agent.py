"""The chart's topology agent on the local cluster: every node its DaemonSet selects can run its
pods (the RuntimeClass it names exists there and admits that node), so `helm install --wait`
finishes, on every topology, with the chart's defaults."""

from __future__ import annotations

from typing import Any

import pytest
from kiln_chart import Helm
from test_selector_contract import matches

from kiln.local import topology


def agent_pod_spec(helm: Helm) -> dict[str, Any]:
    (daemonset,) = [
        o for o in helm.render() if o["kind"] == "DaemonSet" and "topology-agent" in o["metadata"]["name"]
    ]
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


def untainted_or_tolerated(node: dict[str, Any], pod: dict[str, Any]) -> bool:
    tolerations = pod.get("tolerations") or []
    return all(
        any(t.get("operator") == "Exists" and t.get("key") in (None, taint["key"]) for t in tolerations)
        for taint in node["spec"].get("taints") or []
        if taint["effect"] in ("NoSchedule", "NoExecute")
    )


@pytest.mark.parametrize("name", topology.topology_names())
def test_every_node_the_topology_agent_selects_has_its_runtime_class(helm: Helm, name: str) -> None:
    pod = agent_pod_spec(helm)
    nodes = topology.load_topology(name)
    selected = [
        node
        for node in nodes
        if matches({"matchLabels": pod["nodeSelector"]}, node["metadata"]["labels"])
        and untainted_or_tolerated(node, pod)
    ]
    classes = {c["metadata"]["name"]: c for c in topology.gpu_runtime_classes(nodes)}
    if not selected:
        return  # a CPU-only topology: no agent pod, nothing to admit
    assert pod["runtimeClassName"] in classes, f"{name}: the agent's pods would be refused"
    scheduling = classes[pod["runtimeClassName"]].get("scheduling") or {}
    for node in selected:
        assert matches({"matchLabels": scheduling.get("nodeSelector") or {}}, node["metadata"]["labels"])


def test_the_gpu_runtime_class_never_reaches_a_node_without_gpus() -> None:
    nodes = topology.load_topology("mixed")
    (runtime_class,) = topology.gpu_runtime_classes(nodes)
    selector = {"matchLabels": runtime_class["scheduling"]["nodeSelector"]}
    cpu_nodes = [n for n in nodes if topology.GPU_PRESENT_LABEL not in n["metadata"]["labels"]]
    assert cpu_nodes
    assert not any(matches(selector, n["metadata"]["labels"]) for n in cpu_nodes)
    assert topology.gpu_runtime_classes(topology.load_topology("cpu")) == []
