"""Topology files become the Node manifests a real GPU cluster would show."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln import labels
from kiln.local.topology import (
    GPU_MODELS,
    load_topology,
    node_manifests,
    node_summary,
    parse_topology,
    topology_names,
)


def by_prefix(nodes: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [node for node in nodes if node["metadata"]["name"].startswith(f"{prefix}-")]


def islands(node: dict[str, Any]) -> list[list[int]]:
    return json.loads(node["metadata"]["annotations"][labels.NVLINK_ISLANDS])


def test_the_required_topologies_ship() -> None:
    assert {"h100", "l40s", "a100", "gb200", "mixed", "cpu"} <= set(topology_names())


@pytest.mark.parametrize("name", topology_names())
def test_every_node_is_a_kwok_node_with_a_unique_name(name: str) -> None:
    nodes = load_topology(name)
    names = [node["metadata"]["name"] for node in nodes]
    assert len(names) == len(set(names))
    for node in nodes:
        assert node["kind"] == "Node"
        assert node["metadata"]["labels"]["type"] == "kwok"
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert node["metadata"]["labels"]["kubernetes.io/hostname"] == node["metadata"]["name"]
        assert node["status"]["capacity"] == node["status"]["allocatable"]


@pytest.mark.parametrize("name", topology_names())
def test_gpu_labels_agree_with_capacity_and_islands(name: str) -> None:
    for node in load_topology(name):
        node_labels = node["metadata"]["labels"]
        gpus = node["status"]["capacity"].get(labels.GPU_RESOURCE)
        if gpus is None:
            assert not any(key.startswith("nvidia.com/") for key in node_labels)
            assert labels.NVLINK_ISLANDS not in node["metadata"]["annotations"]
            continue
        assert node_labels[labels.GPU_COUNT] == gpus
        groups = islands(node)
        assert sorted(i for group in groups for i in group) == list(range(int(gpus)))
        assert node_labels[labels.NVLINK_MAX_ISLAND] == str(max(len(group) for group in groups))
        assert node_labels[labels.NVLINK_ISLAND_COUNT] == str(len(groups))
        assert int(node_labels[labels.GPU_MEMORY_MIB]) > 0
        assert node_labels[labels.GPU_PRODUCT].startswith("NVIDIA-")


def test_h100_nodes_are_one_nvswitch_domain_of_eight() -> None:
    nodes = by_prefix(load_topology("h100"), "h100")
    assert len(nodes) == 2
    for node in nodes:
        assert node["status"]["capacity"][labels.GPU_RESOURCE] == "8"
        assert node["metadata"]["labels"][labels.GPU_PRODUCT] == "NVIDIA-H100-80GB-HBM3"
        assert node["metadata"]["labels"][labels.GPU_FAMILY] == "hopper"
        assert node["metadata"]["labels"][labels.GPU_MEMORY_MIB] == "81559"
        assert islands(node) == [list(range(8))]


def test_l40s_nodes_have_no_nvlink() -> None:
    for node in by_prefix(load_topology("l40s"), "l40s"):
        assert islands(node) == [[i] for i in range(8)]
        assert node["metadata"]["labels"][labels.NVLINK_MAX_ISLAND] == "1"
        assert labels.GPU_CLIQUE not in node["metadata"]["labels"]


def test_a100_nodes_pair_gpus_over_nvlink_bridges() -> None:
    for node in by_prefix(load_topology("a100"), "a100"):
        assert islands(node) == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert node["metadata"]["labels"][labels.NVLINK_MAX_ISLAND] == "2"
        assert node["metadata"]["labels"][labels.NVLINK_ISLAND_COUNT] == "4"


def test_gb200_rack_is_eighteen_trays_of_four_in_one_clique() -> None:
    nodes = by_prefix(load_topology("gb200"), "gb200")
    assert len(nodes) == 18
    cliques = {node["metadata"]["labels"][labels.GPU_CLIQUE] for node in nodes}
    assert len(cliques) == 1
    cluster_uuid, clique_id = cliques.pop().rsplit(".", 1)
    assert cluster_uuid and clique_id.isdigit()
    for node in nodes:
        assert node["status"]["capacity"][labels.GPU_RESOURCE] == "4"
        assert node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"
        assert islands(node) == [[0, 1, 2, 3]]


def test_mixed_has_several_of_each_kind() -> None:
    products = Counter(node["metadata"]["labels"].get(labels.GPU_PRODUCT) for node in load_topology("mixed"))
    assert products["NVIDIA-H100-80GB-HBM3"] >= 2
    assert products["NVIDIA-L40S"] >= 2
    assert products["NVIDIA-A100-80GB-PCIe"] >= 2
    assert products["NVIDIA-GB200"] == 18
    assert products[None] >= 1  # a CPU node for pods that need no GPU


def test_cpu_topology_has_no_gpus() -> None:
    nodes = load_topology("cpu")
    assert nodes
    assert all(labels.GPU_RESOURCE not in node["status"]["capacity"] for node in nodes)


def test_gpu_pools_are_tainted_cpu_pools_are_not() -> None:
    for node in load_topology("mixed"):
        taints = node["spec"]["taints"]
        if labels.GPU_RESOURCE in node["status"]["capacity"]:
            assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in taints
        else:
            assert taints == []


MINIMAL = """
name: tiny
pools:
  - name: gpu
    count: 2
    gpu: {model: L4, count: 2, islands: [[0], [1]]}
    labels: {example.com/team: infra}
"""


def test_pool_fields_flow_into_every_node() -> None:
    nodes = node_manifests(parse_topology(MINIMAL))
    assert [node["metadata"]["name"] for node in nodes] == ["gpu-0", "gpu-1"]
    assert nodes[1]["metadata"]["labels"]["example.com/team"] == "infra"
    assert nodes[1]["metadata"]["labels"][labels.GPU_PRODUCT] == GPU_MODELS["L4"].product
    assert nodes[1]["status"]["capacity"] == {
        "cpu": "16",
        "memory": "64Gi",
        "pods": "110",
        "ephemeral-storage": "500Gi",
        labels.GPU_RESOURCE: "2",
    }


def test_a_topology_loads_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    assert [node["metadata"]["name"] for node in load_topology(path)] == ["gpu-0", "gpu-1"]
    assert load_topology(str(path)) == load_topology(path)


@pytest.mark.parametrize(
    ("gpu", "error"),
    [
        ("{model: L4, count: 2, islands: [[0]]}", "must split GPUs"),
        ("{model: L4, count: 2, islands: [[0, 1], [1]]}", "must split GPUs"),
        ("{model: Z9000, count: 1, islands: [[0]]}", "unknown GPU model"),
        ("{model: L4, count: 1, islands: [[0]], clique: nodot}", "clique"),
        ("{model: L4, count: 1, islands: [[0]], nvlink: yes}", "Extra inputs"),
    ],
)
def test_bad_gpu_specs_are_rejected_with_a_reason(gpu: str, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        parse_topology(f"name: bad\npools:\n  - name: p\n    gpu: {gpu}\n")


def test_duplicate_pools_are_rejected() -> None:
    with pytest.raises(ValidationError, match="repeated: p"):
        parse_topology("name: bad\npools:\n  - name: p\n  - name: p\n")


def test_unknown_topology_names_the_shipped_ones() -> None:
    with pytest.raises(FileNotFoundError, match="mixed"):
        load_topology("nonexistent")


def test_node_summary_counts_nodes_by_gpu_product_and_readiness() -> None:
    nodes = load_topology("mixed")
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    gpu_index = next(i for i, n in enumerate(nodes) if labels.GPU_PRODUCT in n["metadata"]["labels"])
    nodes[gpu_index] = gpu_node = {**nodes[gpu_index], **ready}
    real_node = {"metadata": {"labels": {labels.REAL_NODE_LABEL: "true"}}, **ready}
    lines = node_summary([*nodes, real_node])

    assert lines[-1].split() == [str(len(nodes) + 1), "nodes", "2", "Ready", "in", "all"]
    first_product = gpu_node["metadata"]["labels"][labels.GPU_PRODUCT]
    first_count = gpu_node["metadata"]["labels"][labels.GPU_COUNT]
    same_kind = [
        n
        for n in nodes
        if n["metadata"]["labels"].get(labels.GPU_PRODUCT) == first_product
        and n["metadata"]["labels"].get(labels.GPU_COUNT) == first_count
    ]
    row = next(line for line in lines if line.endswith(f"{first_product} x{first_count}"))
    assert row.split()[:4] == [str(len(same_kind)), "nodes", "1", "Ready"]
    assert any(line.split()[:4] == ["1", "nodes", "1", "Ready"] and "real node" in line for line in lines)
