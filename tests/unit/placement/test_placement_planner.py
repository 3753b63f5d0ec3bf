"""The planner over Kiln's shipped topologies: who may host which replica shape, and why not."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from kiln import labels
from kiln.api.v1alpha1 import LLMDeploymentSpec
from kiln.local.topology import load_topology, topology_names
from kiln.placement import LWS_EXCLUSIVE_TOPOLOGY, NodeTopology, PlacementPolicy, ReplicaShape, plan
from kiln.placement.planner import cpu_placement
from kiln.placement.simulate import SimCluster, node_matches, preference_score, within_one_island

H100 = "NVIDIA-H100-80GB-HBM3"
L40S = "NVIDIA-L40S"
A100 = "NVIDIA-A100-80GB-PCIe"
GB200 = "NVIDIA-GB200"


def nodes(name: str) -> list[NodeTopology]:
    return [NodeTopology.from_node(node) for node in load_topology(name)]


def matching_nodes(affinity: dict[str, Any], cluster: list[NodeTopology], gpus: int) -> list[str]:
    """Nodes the scheduler's NodeAffinity filter and GPU fit would accept."""
    return sorted(node.name for node in cluster if node.gpus >= gpus and node_matches(affinity, node.labels))


def required_expressions(affinity: dict[str, Any]) -> list[dict[str, Any]]:
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 1
    return terms[0]["matchExpressions"]


def test_from_node_reads_gfd_labels_islands_and_allocatable() -> None:
    by_name = {node.name: node for node in nodes("mixed")}
    a100 = by_name["a100-0"]
    assert (a100.gpus, a100.product, a100.memory_mib) == (8, A100, 81920)
    assert a100.islands == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert (a100.max_island, a100.group_slots(2), a100.group_slots(4)) == (2, 4, 0)
    assert by_name["gb200-3"].clique == "4f8a1c2e-7b3d-4e6f-9a0b-1c2d3e4f5a6b.32766"
    assert by_name["l40s-1"].max_island == 1
    assert by_name["system-0"].gpus == 0


def test_from_node_tolerates_missing_and_malformed_topology() -> None:
    node = {
        "metadata": {
            "name": "n",
            "labels": {labels.NVLINK_MAX_ISLAND: "4"},
            "annotations": {labels.NVLINK_ISLANDS: "not json"},
        },
        "status": {"capacity": {labels.GPU_RESOURCE: "8"}},
    }
    parsed = NodeTopology.from_node(node)
    assert (parsed.gpus, parsed.islands, parsed.max_island, parsed.topology_known) == (8, None, 4, True)
    assert parsed.group_slots(4) == 1
    bare = NodeTopology.from_node({"metadata": {"name": "bare"}})
    assert (bare.gpus, bare.topology_known, bare.max_island) == (0, False, 0)


@pytest.mark.parametrize("topology", sorted(set(topology_names()) - {"cpu"}))
def test_single_node_affinity_selects_exactly_the_planned_hosts(topology: str) -> None:
    """Whatever the planner says may host a replica is what its node affinity lets the scheduler pick."""
    cluster = nodes(topology)
    products = sorted({node.product for node in cluster if node.product})
    for product in [None, *products]:
        for tp in (1, 2, 4, 8):
            placement = plan(ReplicaShape(tensor=tp, product=product), cluster)
            if not placement.feasible or placement.multi_node:
                continue
            assert matching_nodes(placement.affinity, cluster, tp) == list(placement.hosts), (product, tp)
            for name in placement.hosts:
                node = next(node for node in cluster if node.name == name)
                assert node.max_island >= tp


def test_tp2_required_never_on_l40s() -> None:
    cluster = nodes("mixed")
    placement = plan(ReplicaShape(tensor=2), cluster, "Required")
    assert placement.feasible
    assert not [host for host in placement.hosts if host.startswith(("l40s", "system"))]
    assert {"key": labels.NVLINK_MAX_ISLAND, "operator": "Gt", "values": ["1"]} in required_expressions(
        placement.affinity
    )
    l40s = plan(ReplicaShape(tensor=2, product=L40S), cluster, "Required")
    assert not l40s.feasible
    assert l40s.reason_code == "NoNVLinkIsland"
    assert "largest island on NVIDIA-L40S nodes is 1" in l40s.reason
    assert "gpu.nvlink: Preferred" in l40s.reason
    assert l40s.condition() == {
        "type": "Unschedulable",
        "status": "True",
        "reason": "NoNVLinkIsland",
        "message": l40s.reason,
    }


def test_tp8_only_on_full_nvswitch_nodes() -> None:
    cluster = nodes("mixed")
    placement = plan(ReplicaShape(tensor=8), cluster)
    assert placement.hosts == ("h100-0", "h100-1")
    assert matching_nodes(placement.affinity, cluster, 8) == ["h100-0", "h100-1"]


def test_best_fit_prefers_the_smallest_island_that_holds_the_group() -> None:
    cluster = nodes("mixed")
    by_name = {node.name: node for node in cluster}

    def ranking(tp: int) -> list[str]:
        placement = plan(ReplicaShape(tensor=tp), cluster)
        scores = {
            host: preference_score(placement.affinity, by_name[host].labels) for host in placement.hosts
        }
        return sorted({host.rsplit("-", 1)[0] for host in scores}, key=lambda pool: -scores[f"{pool}-0"])

    # Single GPUs go to nodes without NVLink first; pairs to bridged A100s; quads to GB200 trays; 8 to H100.
    assert ranking(1) == ["l40s", "a100", "gb200", "h100"]
    assert ranking(2) == ["a100", "gb200", "h100"]
    assert ranking(4) == ["gb200", "h100"]
    assert ranking(8) == ["h100"]


def test_preferred_turns_the_island_into_a_preference() -> None:
    cluster = nodes("mixed")
    placement = plan(ReplicaShape(tensor=2), cluster, "Preferred")
    expressions = placement.affinity["nodeAffinity"].get("requiredDuringSchedulingIgnoredDuringExecution")
    assert expressions is None
    assert "l40s-0" in placement.hosts
    by_name = {node.name: node for node in cluster}
    assert preference_score(placement.affinity, by_name["a100-0"].labels) > preference_score(
        placement.affinity, by_name["h100-0"].labels
    )
    assert preference_score(placement.affinity, by_name["h100-0"].labels) > preference_score(
        placement.affinity, by_name["l40s-0"].labels
    )
    l40s = plan(ReplicaShape(tensor=2, product=L40S), cluster, "Preferred")
    assert l40s.feasible
    assert matching_nodes(l40s.affinity, cluster, 2) == ["l40s-0", "l40s-1"]


def test_ignore_drops_island_terms_but_keeps_the_product() -> None:
    placement = plan(ReplicaShape(tensor=4, product=L40S), nodes("mixed"), "Ignore")
    assert placement.feasible
    assert placement.affinity == {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": labels.GPU_PRODUCT, "operator": "In", "values": [L40S]}]}
                ]
            }
        }
    }


def test_tp16_spans_gb200_trays_inside_one_clique() -> None:
    placement = plan(ReplicaShape(tensor=16, product=GB200), nodes("mixed"))
    assert placement.feasible
    assert (placement.gpus_per_node, placement.nodes_per_replica) == (4, 4)
    assert placement.topology_key == labels.GPU_CLIQUE
    (term,) = placement.affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == labels.GPU_CLIQUE
    assert term["matchLabelKeys"] == [placement.group_label_key]
    assert term["labelSelector"] == {}  # the API forbids the matchLabelKeys key in the selector too
    assert {"key": labels.GPU_CLIQUE, "operator": "Exists"} in required_expressions(placement.affinity)
    assert len(placement.hosts) == 18


def test_tp8_pp2_on_h100_splits_by_pipeline_stage() -> None:
    placement = plan(ReplicaShape(tensor=8, pipeline=2, product=H100), nodes("mixed"))
    assert placement.feasible
    assert (placement.gpus_per_node, placement.nodes_per_replica) == (8, 2)
    # H100 nodes share no clique: the pipeline hop crosses the network, TP stays on each node's NVSwitch.
    assert placement.topology_key is None
    assert "podAffinity" not in placement.affinity
    assert {"key": labels.NVLINK_MAX_ISLAND, "operator": "Gt", "values": ["7"]} in required_expressions(
        placement.affinity
    )


def test_network_block_keeps_a_cliqueless_replica_in_one_block() -> None:
    policy = PlacementPolicy(network_block_key="topology.kubernetes.io/zone")
    placement = plan(ReplicaShape(tensor=8, pipeline=2, product=H100), nodes("mixed"), policy)
    assert placement.topology_key == "topology.kubernetes.io/zone"
    exclusive = PlacementPolicy(network_block_key="topology.kubernetes.io/zone", exclusive_topology=True)
    placement = plan(ReplicaShape(tensor=8, pipeline=2, product=H100), nodes("mixed"), exclusive)
    assert placement.lws_annotations == {LWS_EXCLUSIVE_TOPOLOGY: "topology.kubernetes.io/zone"}
    # Exclusive: the group's own pods together, and no pod of another group in the block.
    [together] = placement.affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    [apart] = placement.affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    key = exclusive.group_label_key
    assert together["matchLabelKeys"] == [key] == apart["mismatchLabelKeys"]
    assert together["topologyKey"] == apart["topologyKey"] == "topology.kubernetes.io/zone"
    assert apart["labelSelector"] == {"matchExpressions": [{"key": key, "operator": "Exists"}]}


def test_nvlink_domain_required_keeps_a_replica_to_one_clique_or_refuses_it() -> None:
    shape = ReplicaShape(tensor=8, pipeline=2, product=H100)
    required = PlacementPolicy(nvlink_domain="Required", network_block_key="topology.kubernetes.io/zone")
    refused = plan(shape, nodes("mixed"), required)
    assert not refused.feasible and refused.reason_code == "NoNVLinkClique"  # H100 nodes have no clique
    assert plan(shape, nodes("mixed"), PlacementPolicy(nvlink_domain="Preferred")).feasible
    # Stages of TP=8 each fit one H100 node, but Required still wants one clique: on GB200 trays it is.
    gb200 = plan(ReplicaShape(tensor=2, pipeline=2, product=GB200), nodes("mixed"), required)
    assert not gb200.multi_node  # fits one tray: no clique needed at all
    big = plan(ReplicaShape(tensor=4, pipeline=4, product=GB200), nodes("mixed"), required)
    assert big.topology_key == labels.GPU_CLIQUE and big.nodes_per_replica == 4
    assert {"key": labels.GPU_CLIQUE, "operator": "Exists"} in required_expressions(big.affinity)


def test_policy_from_the_api_reaches_the_planner() -> None:
    spec = LLMDeploymentSpec.model_validate(
        {
            "model": {"source": "hf://org/model"},
            "parallelism": {"tensor": 8, "pipeline": 2},
            "gpu": {"product": GB200, "nvlink": "Preferred"},
            "placement": {"nvlinkDomain": "Required", "exclusive": True},
        }
    )
    policy = PlacementPolicy.from_spec(spec, group_label_key="kiln.dev/group")
    assert (policy.nvlink, policy.nvlink_domain, policy.exclusive_topology) == ("Preferred", "Required", True)
    placement = plan(ReplicaShape.from_spec(spec), nodes("mixed"), policy)
    assert placement.topology_key == labels.GPU_CLIQUE and placement.nodes_per_replica == 4
    [apart] = placement.affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert apart["mismatchLabelKeys"] == ["kiln.dev/group"]
    with pytest.raises(ValueError, match="nvlink_domain"):
        PlacementPolicy(nvlink_domain="Ignore")  # type: ignore[arg-type]


def test_tp16_on_h100_has_no_nvlink_domain() -> None:
    placement = plan(ReplicaShape(tensor=16, product=H100), nodes("mixed"))
    assert not placement.feasible
    assert placement.reason_code == "NoNVLinkIsland"
    assert "largest island here has 8 GPUs" in placement.reason
    relaxed = plan(ReplicaShape(tensor=16, product=H100), nodes("mixed"), "Preferred")
    assert relaxed.feasible and relaxed.nodes_per_replica == 2


def test_replica_larger_than_the_clique_is_infeasible_with_the_count() -> None:
    assert plan(ReplicaShape(tensor=64, product=GB200), nodes("gb200")).nodes_per_replica == 16
    placement = plan(ReplicaShape(tensor=64, pipeline=2, product=GB200), nodes("gb200"))
    assert not placement.feasible
    assert placement.reason_code == "NoNVLinkClique"
    assert "needs 32 pods of 4 GPUs in one nvidia.com/gpu.clique domain; at most 18 fit" in placement.reason


def test_tp4_on_bridged_pairs_is_infeasible_and_names_the_layout() -> None:
    placement = plan(ReplicaShape(tensor=4, product=A100), nodes("mixed"))
    assert not placement.feasible
    assert placement.reason_code == "NoNVLinkIsland"
    assert "2 node(s) with islands 2+2+2+2" in placement.reason


def test_pipeline_stages_fill_islands_on_one_node() -> None:
    placement = plan(ReplicaShape(tensor=2, pipeline=4, product=A100), nodes("mixed"))
    assert placement.feasible and not placement.multi_node
    assert placement.gpus_per_node == 8
    assert placement.hosts == ("a100-0", "a100-1")


def test_unknown_product_memory_and_gpu_less_clusters() -> None:
    mixed = nodes("mixed")
    missing = plan(ReplicaShape(tensor=1, product="NVIDIA-B200"), mixed)
    assert missing.reason_code == "NoMatchingGPU"
    assert "NVIDIA-A100-80GB-PCIe, NVIDIA-GB200, NVIDIA-H100-80GB-HBM3, NVIDIA-L40S" in missing.reason
    memory = plan(ReplicaShape(tensor=1, product=L40S, memory_mib=80000), mixed)
    assert memory.reason_code == "NoMatchingGPU" and "46068 MiB" in memory.reason
    assert plan(ReplicaShape(tensor=1), nodes("cpu")).reason_code == "NoGPUNodes"
    roomy = plan(ReplicaShape(tensor=1, memory_mib=100000), mixed)
    assert roomy.hosts == tuple(f"gb200-{i}" for i in sorted(range(18), key=str))


def test_nodes_without_the_agent_are_not_trusted_under_required() -> None:
    bare = []
    for node in load_topology("h100"):
        node["metadata"]["labels"].pop(labels.NVLINK_MAX_ISLAND, None)
        node["metadata"]["annotations"].pop(labels.NVLINK_ISLANDS, None)
        bare.append(NodeTopology.from_node(node))
    placement = plan(ReplicaShape(tensor=4, product=H100), bare)
    assert placement.reason_code == "TopologyUnknown"
    assert plan(ReplicaShape(tensor=1, product=H100), bare).feasible
    assert plan(ReplicaShape(tensor=4, product=H100), bare, "Preferred").feasible


def test_schedulable_now_uses_free_islands_not_free_counts() -> None:
    manifests = {node["metadata"]["name"]: node for node in load_topology("mixed")}
    # Every bridged pair half used: 4 GPUs free per node but no free pair.
    cluster = [
        NodeTopology.from_node(node, free=[0, 2, 4, 6] if name.startswith("a100") else [])
        for name, node in manifests.items()
    ]
    placement = plan(ReplicaShape(tensor=2, product=A100), cluster)
    assert placement.feasible and placement.schedulable_now is False
    assert plan(ReplicaShape(tensor=1, product=A100), cluster).schedulable_now is True
    assert plan(ReplicaShape(tensor=2, product=A100), cluster, "Ignore").schedulable_now is True
    assert plan(ReplicaShape(tensor=2, product=A100), nodes("mixed")).schedulable_now is None


def test_shape_from_an_llmdeployment_spec() -> None:
    spec = LLMDeploymentSpec.model_validate(
        {
            "model": {"source": "hf://meta-llama/Llama-3.1-405B"},
            "parallelism": {"tensor": 8, "pipeline": 2},
            "gpu": {"product": H100, "memory_mib": 80000, "nvlink": "Required"},
        }
    )
    shape = ReplicaShape.from_spec(spec)
    assert (shape.tensor, shape.pipeline, shape.product, shape.memory_mib, shape.gpus) == (
        8,
        2,
        H100,
        80000,
        16,
    )


def test_policy_and_shape_validation() -> None:
    with pytest.raises(ValueError, match="nvlink policy"):
        PlacementPolicy(nvlink="Sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        ReplicaShape(tensor=0)


def test_placement_is_json_ready() -> None:
    placement = plan(ReplicaShape(tensor=16, product=GB200), nodes("gb200"))
    assert json.loads(json.dumps(placement.affinity)) == placement.affinity


def test_relaxed_policies_span_nodes_without_a_clique_and_say_so() -> None:
    mixed = nodes("mixed")
    preferred = plan(ReplicaShape(tensor=16, product=L40S), mixed, "Preferred")
    assert (preferred.feasible, preferred.nodes_per_replica, preferred.topology_key) == (True, 2, None)
    assert "tensor-parallel groups span pods" in preferred.reason and "clique" not in preferred.reason
    ignore = plan(ReplicaShape(tensor=16, product=GB200), mixed, "Ignore")
    assert ignore.topology_key is None and "podAffinity" not in ignore.affinity
    too_big = plan(ReplicaShape(tensor=128, product=GB200), mixed, "Preferred")
    assert too_big.reason_code == "InsufficientCapacity"
    assert "needs 32 pods of 4 GPUs in the cluster; at most 18 fit" in too_big.reason


def _fill(
    arm: str, sizes: list[int], seed: int
) -> tuple[SimCluster, list[tuple[int, str | None, tuple[int, ...]]]]:
    """Place replicas one by one in the scheduler/device-plugin model; ties broken by `seed`."""
    cluster_nodes = nodes("mixed")
    sim = SimCluster(cluster_nodes)
    rng = random.Random(seed)
    placed = []
    for tp in sizes:
        affinity = plan(ReplicaShape(tensor=tp), cluster_nodes).affinity if arm == "kiln" else {}
        bound = sim.schedule(affinity, tp, rng=rng)
        placed.append((tp, *bound) if bound else (tp, None, ()))
    return sim, placed


# Small replicas first, then the big ones that need whole islands: 16 x TP1, 8 x TP2, 4 x TP4, 2 x TP8
# (80 of the mixed cluster's 120 GPUs).
ARRIVALS = [1] * 16 + [2] * 8 + [4] * 4 + [8] * 2


@pytest.mark.parametrize("seed", range(10))
def test_best_fit_packing_keeps_big_islands_whole(seed: int) -> None:
    sim, placed = _fill("kiln", ARRIVALS, seed)
    assert all(node is not None for _, node, _ in placed), "every replica fits"
    for tp, node, gpus in placed:
        assert within_one_island(sim.islands(node), gpus), (tp, node, gpus)  # type: ignore[arg-type]
    # Single GPUs filled the L40S cards, pairs the A100 bridges, quads GB200 trays, TP=8 the H100s.
    pools = {tp: {node.rsplit("-", 1)[0] for t, node, _ in placed if t == tp} for tp in (1, 2, 4, 8)}  # type: ignore[union-attr]
    assert pools == {1: {"l40s"}, 2: {"a100"}, 4: {"gb200"}, 8: {"h100"}}
    assert sim.stranded(2) == 0 and sim.stranded(4) == 0


def test_without_kiln_the_same_arrivals_strand_or_straddle_islands() -> None:
    """The control: with no affinity, some tie-breaks put TP groups across islands or leave TP=8 waiting."""
    outcomes = []
    for seed in range(10):
        sim, placed = _fill("default", ARRIVALS, seed)
        split = sum(1 for _, node, gpus in placed if node and not within_one_island(sim.islands(node), gpus))
        waiting = sum(1 for _, node, _ in placed if node is None)
        outcomes.append(split + waiting)
    assert sum(1 for bad in outcomes if bad) >= 5, outcomes


def test_a_network_block_is_no_substitute_for_a_clique_when_tp_spans_nodes() -> None:
    policy = PlacementPolicy(network_block_key="topology.kubernetes.io/zone")
    placement = plan(ReplicaShape(tensor=16, product=H100), nodes("mixed"), policy)
    assert not placement.feasible and placement.reason_code == "NoNVLinkIsland"
    gb200 = plan(ReplicaShape(tensor=16, product=GB200), nodes("mixed"), policy)
    assert gb200.topology_key == labels.GPU_CLIQUE


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 2), (2, 2), (1, 4)])
def test_a_cpu_replica_is_one_pod_per_pipeline_stage(tensor: int, pipeline: int) -> None:
    placement = cpu_placement(ReplicaShape(tensor=tensor, pipeline=pipeline), "kiln.dev/group")
    assert placement is not None and placement.feasible
    assert placement.multi_node and placement.nodes_per_replica == pipeline
    assert placement.gpus_per_node == 0 and not placement.affinity  # no GPUs, no topology to keep
    assert placement.group_label_key == "kiln.dev/group"


def test_a_cpu_replica_of_one_stage_is_an_ordinary_pod() -> None:
    assert cpu_placement(ReplicaShape(tensor=2, pipeline=1)) is None
