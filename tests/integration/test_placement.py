"""The planner's scheduling terms, obeyed by the real kube-scheduler on simulated GPU nodes.

Each test adds its own small pool of KWOK GPU nodes (a "lab": NVSwitch, bridged pairs, no NVLink, two
NVLink cliques) marked with a label its pods select, so the shared session cluster's nodes and other
tests' pods stay out of the picture. The pods carry the planner's `affinity` verbatim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import labels
from kiln.local.testing import LocalCluster, wait_for
from kiln.local.topology import node_manifests, parse_topology
from kiln.placement import NodeTopology, Placement, ReplicaShape, plan
from kiln.topology.discovery import Discovery, GpuInfo, PairLink

pytestmark = pytest.mark.cluster

LAB_LABEL = "kiln.dev/test-placement-lab"
GROUP_LABEL = "kiln.dev/test-placement-group"  # "islands" (one node per NVLink layout) or "cliques"
H200 = "NVIDIA-H200"
IMAGE = "registry.example/kiln/engine:test"  # never pulled: KWOK only pretends to run it


def lab_topology(lab: str) -> str:
    gpu_taint = "{key: nvidia.com/gpu, value: present, effect: NoSchedule}"
    pools = {
        "nvswitch": "{model: H100-SXM5-80GB, count: 8, islands: [[0, 1, 2, 3, 4, 5, 6, 7]]}",
        "pairs": "{model: A100-PCIE-80GB, count: 8, islands: [[0, 1], [2, 3], [4, 5], [6, 7]]}",
        "pcie": "{model: L40S, count: 8, islands: [[0], [1], [2], [3], [4], [5], [6], [7]]}",
    }
    text = f"name: {lab}\npools:\n"
    for pool, gpu in pools.items():
        text += f"  - {{name: {lab}-{pool}, count: 1, gpu: {gpu}, taints: [{gpu_taint}]}}\n"
    for clique in ("a", "b"):
        nvswitch = "islands: [[0, 1, 2, 3, 4, 5, 6, 7]]"
        gpu = f"{{model: H200-SXM5-141GB, count: 8, {nvswitch}, clique: {lab}.{clique}}}"
        text += f"  - {{name: {lab}-clique-{clique}, count: 2, gpu: {gpu}, taints: [{gpu_taint}]}}\n"
    return text


class Kube:
    """Plain-JSON access to the API server (the typed client would re-validate and drop fields, such
    as an empty labelSelector, that the planner emits on purpose)."""

    def __init__(self, local_cluster: LocalCluster) -> None:
        self.api_client = local_cluster.api_client
        self.host = local_cluster.api_client.configuration.host

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        response = self.api_client.call_api(method, f"{self.host}{path}", headers, body)
        data = response.read()
        if response.status >= 400:
            raise AssertionError(f"{method} {path}: {response.status} {data!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    def nodes(self, selector: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/api/v1/nodes?labelSelector={selector}")["items"])


@pytest.fixture
def kube(local_cluster: LocalCluster) -> Kube:
    return Kube(local_cluster)


@pytest.fixture
def lab(kube: Kube) -> Iterator[str]:
    """Seven KWOK GPU nodes of this test only (all labelled LAB_LABEL=<lab>), deleted afterwards."""
    name = f"lab{uuid.uuid4().hex[:6]}"
    manifests = node_manifests(parse_topology(lab_topology(name)))
    for node in manifests:
        node["metadata"]["labels"][LAB_LABEL] = name
        node["metadata"]["labels"][GROUP_LABEL] = (
            "cliques" if "-clique-" in node["metadata"]["name"] else "islands"
        )
        kube.request("POST", "/api/v1/nodes", node)
    try:

        def all_ready() -> bool:
            """Ready, and the node lifecycle controller has lifted its not-ready taint."""
            nodes = kube.nodes(f"{LAB_LABEL}={name}")
            return len(nodes) == len(manifests) and all(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in node["status"].get("conditions", [])
                )
                and not any(
                    t["key"].startswith("node.kubernetes.io/") for t in node["spec"].get("taints", [])
                )
                for node in nodes
            )

        wait_for(all_ready, timeout=60, what=f"lab nodes {name} to be Ready")
        yield name
    finally:
        for node in kube.nodes(f"{LAB_LABEL}={name}"):
            kube.request("DELETE", f"/api/v1/nodes/{node['metadata']['name']}")
        wait_for(
            lambda: not kube.nodes(f"{LAB_LABEL}={name}"),
            timeout=60,
            what=f"lab nodes {name} to go away",
        )


def lab_nodes(kube: Kube, lab: str, group: str) -> list[NodeTopology]:
    return [NodeTopology.from_node(node) for node in kube.nodes(f"{LAB_LABEL}={lab},{GROUP_LABEL}={group}")]


def place_pod(
    kube: Kube,
    namespace: str,
    name: str,
    lab: tuple[str, str],
    placement: Placement,
    pod_labels: dict[str, str] | None = None,
) -> str | None:
    """Create one pod with the placement's affinity and GPU count; its node, or None when Unschedulable."""
    pod: dict[str, Any] = {
        "metadata": {"name": name, "labels": pod_labels or {}},
        "spec": {
            "nodeSelector": {LAB_LABEL: lab[0], GROUP_LABEL: lab[1]},
            "affinity": placement.affinity,
            "containers": [
                {
                    "name": "engine",
                    "image": IMAGE,
                    "resources": {"limits": {labels.GPU_RESOURCE: str(placement.gpus_per_node)}},
                }
            ],
        },
    }
    kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)

    def verdict() -> tuple[str | None] | None:
        current = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        if current["spec"].get("nodeName"):
            return (str(current["spec"]["nodeName"]),)
        for condition in current.get("status", {}).get("conditions", []):
            if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                return (None,)
        return None

    return wait_for(verdict, timeout=30, what=f"a scheduling decision for {name}")[0]


def test_tp2_required_fills_nvlink_pairs_and_never_lands_on_l40s(
    kube: Kube, namespace: str, lab: str
) -> None:
    nodes = lab_nodes(kube, lab, "islands")
    placement = plan(ReplicaShape(tensor=2), nodes, "Required")
    assert placement.feasible and not placement.multi_node
    # The NVSwitch node and the bridged-pair node hold 8 pairs; the L40S node has 8 free GPUs throughout.
    bound = [place_pod(kube, namespace, f"tp2-{i}", (lab, "islands"), placement) for i in range(10)]
    assert all(bound[:8]), bound
    assert bound[8:] == [None, None], "once the NVLink nodes are full, TP=2 waits rather than use L40S"
    assert not [node for node in bound if node and node.endswith("pcie-0")]
    # Best fit: the bridged pairs (islands of 2) fill before the NVSwitch node's island of 8 is broken.
    assert [node.rsplit("-", 2)[-2] for node in bound[:4] if node] == ["pairs"] * 4


def test_tp8_goes_only_to_a_whole_nvswitch_node(kube: Kube, namespace: str, lab: str) -> None:
    nodes = lab_nodes(kube, lab, "islands")
    placement = plan(ReplicaShape(tensor=8), nodes, "Required")
    assert placement.hosts == (f"{lab}-nvswitch-0",)
    assert place_pod(kube, namespace, "tp8-a", (lab, "islands"), placement) == f"{lab}-nvswitch-0"
    # 8 free GPUs remain on the bridged-pair node and on the L40S node: neither is one island.
    assert place_pod(kube, namespace, "tp8-b", (lab, "islands"), placement) is None
    pod = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/tp8-b")
    message = next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "node affinity" in message


def test_tp8_pp2_replica_lands_on_two_nodes_of_one_clique(kube: Kube, namespace: str, lab: str) -> None:
    nodes = lab_nodes(kube, lab, "cliques")
    placement = plan(ReplicaShape(tensor=8, pipeline=2, product=H200), nodes, "Required")
    assert (placement.gpus_per_node, placement.nodes_per_replica) == (8, 2)
    assert placement.topology_key == labels.GPU_CLIQUE
    cliques = {node.name: node.clique for node in nodes}

    def pod(group: str, index: int) -> str | None:
        name = f"{group}-{index}"
        group_label = {placement.group_label_key: group}
        return place_pod(kube, namespace, name, (lab, "cliques"), placement, group_label)

    first = [pod("r0", 0), pod("r0", 1)]
    assert None not in first and first[0] != first[1]
    assert cliques[first[0]] == cliques[first[1]]  # type: ignore[index]
    # A third pod of the same group must stay in that clique: it is full, so it waits, although the
    # other clique has 16 free GPUs.
    assert pod("r0", 2) is None
    second = [pod("r1", 0), pod("r1", 1)]
    assert None not in second
    assert cliques[second[0]] == cliques[second[1]] != cliques[first[0]]  # type: ignore[index]


def test_topology_agent_publishes_on_the_node(
    kube: Kube, local_cluster: LocalCluster, tmp_path: Path
) -> None:
    """`kiln topology-agent --once` patches its Node through the API server (a recorded discovery
    stands in for NVML); GPU Feature Discovery's labels are left alone."""
    name = f"agent-{uuid.uuid4().hex[:6]}"
    kube.request(
        "POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": {labels.GPU_PRODUCT: "From-GFD"}}}
    )
    try:
        gpus = [
            GpuInfo(
                index=i,
                name="NVIDIA A100 80GB PCIe",
                uuid=f"GPU-{i}",
                pci_bus_id=f"00000000:{i + 16:02x}:00.0",
                memory_mib=81920,
            )
            for i in range(4)
        ]
        pairs = [
            PairLink(a=a, b=b, p2p_nvlink=b == a + 1 and a % 2 == 0)
            for a in range(4)
            for b in range(a + 1, 4)
        ]
        recorded = tmp_path / "discovery.json"
        recorded.write_text(Discovery(gpus=gpus, pairs=pairs).model_dump_json())
        env = {**os.environ, "KUBECONFIG": str(local_cluster.kubeconfig), "NODE_NAME": name}
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "kiln"),
                "topology-agent",
                "--once",
                "--discovery",
                str(recorded),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        node = kube.request("GET", f"/api/v1/nodes/{name}")
        node_labels = node["metadata"]["labels"]
        assert node_labels[labels.NVLINK_MAX_ISLAND] == "2"
        assert node_labels[labels.NVLINK_ISLAND_COUNT] == "2"
        assert node_labels[labels.GPU_PRODUCT] == "From-GFD"
        assert node_labels[labels.GPU_MEMORY_MIB] == "81920"
        assert json.loads(node["metadata"]["annotations"][labels.NVLINK_ISLANDS]) == [[0, 1], [2, 3]]
        parsed = NodeTopology.from_node(node)
        assert parsed.islands == ((0, 1), (2, 3))
    finally:
        kube.request("DELETE", f"/api/v1/nodes/{name}")


def test_lab_topology_is_valid_yaml() -> None:
    assert yaml.safe_load(lab_topology("labx"))["pools"][3]["gpu"]["clique"] == "labx.a"
