"""The placement planner: replica shape + node topologies -> pod scheduling terms keeping TP on NVLink."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln import labels
from kiln.placement.model import (
    LWS_EXCLUSIVE_TOPOLOGY,
    LWS_GROUP_KEY,
    NVLINK_DOMAIN_POLICIES,
    NVLINK_POLICIES,
    NodeTopology,
    NVLinkDomainPolicy,
    NVLinkPolicy,
    Placement,
    ReplicaShape,
)

if TYPE_CHECKING:
    from kiln.api.v1alpha1 import LLMDeploymentSpec

# Preferred-term weights (the scheduler's 1..100 scale). "Has an island >= TP" outranks every best-fit
# term, so under `Preferred` a fitting node always beats a non-fitting one.
FIT_WEIGHT = 100
BEST_FIT_MAX_WEIGHT = 50


@dataclass(frozen=True)
class PlacementPolicy:
    """How strictly to keep tensor-parallel groups on NVLink, and the cluster's topology conventions.

    `nvlink` keeps each tensor-parallel group on one NVLink island. `nvlink_domain` says whether a
    replica that spans nodes must stay inside one NVLink clique ("Required") or only prefers one
    ("Preferred"). `network_block_key`: a node label naming a network block (rack, spine, ...), used
    to keep a replica that spans nodes without an NVLink clique inside one block. `exclusive_topology`:
    give each multi-node replica a whole clique/block, instead of only keeping it inside one.
    `group_label_key`: the pod label whose value names a replica's pod group (LeaderWorkerSet's
    group key, or Kiln's own for groups of StatefulSets).
    """

    nvlink: NVLinkPolicy = "Required"
    network_block_key: str | None = None
    group_label_key: str = LWS_GROUP_KEY
    exclusive_topology: bool = False
    nvlink_domain: NVLinkDomainPolicy = "Preferred"

    def __post_init__(self) -> None:
        if self.nvlink not in NVLINK_POLICIES:
            raise ValueError(
                f"nvlink policy must be one of {', '.join(NVLINK_POLICIES)}, got {self.nvlink!r}"
            )
        if self.nvlink_domain not in NVLINK_DOMAIN_POLICIES:
            raise ValueError(
                f"nvlink_domain must be one of {', '.join(NVLINK_DOMAIN_POLICIES)}, "
                f"got {self.nvlink_domain!r}"
            )

    @classmethod
    def from_spec(cls, spec: LLMDeploymentSpec, group_label_key: str = LWS_GROUP_KEY) -> PlacementPolicy:
        """The policy an LLMDeployment spec asks for (gpu.nvlink and spec.placement)."""
        placement = spec.placement
        return cls(
            nvlink=spec.gpu.nvlink if spec.gpu is not None else "Ignore",
            network_block_key=placement.network_block_label,
            group_label_key=group_label_key,
            exclusive_topology=placement.exclusive,
            nvlink_domain=placement.nvlink_domain,
        )


def _gpus(count: int) -> str:
    return f"{count} GPU{'' if count == 1 else 's'}"


def _infeasible(code: str, reason: str) -> Placement:
    return Placement(feasible=False, reason=reason, reason_code=code)


def _expr(key: str, operator: str, values: Sequence[str] | None = None) -> dict[str, Any]:
    expression: dict[str, Any] = {"key": key, "operator": operator}
    if values is not None:
        expression["values"] = list(values)
    return expression


def _at_least(key: str, value: int) -> dict[str, Any]:
    """`label >= value` for an integer label (the scheduler has Gt, not Ge)."""
    return _expr(key, "Gt", [str(value - 1)])


def _gpu_expressions(shape: ReplicaShape) -> list[dict[str, Any]]:
    expressions = []
    if shape.product:
        expressions.append(_expr(labels.GPU_PRODUCT, "In", [shape.product]))
    if shape.memory_mib:
        expressions.append(_at_least(labels.GPU_MEMORY_MIB, shape.memory_mib))
    return expressions


def _best_fit_terms(sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Preferred terms ranking nodes by their largest island, smallest first, so big islands stay whole."""
    ordered = sorted(set(sizes))
    count = len(ordered)
    return [
        {
            "weight": max(1, round(BEST_FIT_MAX_WEIGHT * (count - rank) / count)),
            "preference": {"matchExpressions": [_expr(labels.NVLINK_MAX_ISLAND, "In", [str(size)])]},
        }
        for rank, size in enumerate(ordered)
    ]


def _node_affinity(required: list[dict[str, Any]], preferred: list[dict[str, Any]]) -> dict[str, Any]:
    affinity: dict[str, Any] = {}
    if required:
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": required}]
        }
    if preferred:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    return affinity


def _products(nodes: Sequence[NodeTopology]) -> str:
    found = sorted({node.product or "unlabelled" for node in nodes})
    return ", ".join(found)


def _filter_gpu(shape: ReplicaShape, nodes: Sequence[NodeTopology]) -> list[NodeTopology] | Placement:
    """Nodes with GPUs of the requested product and memory, or an infeasible placement saying why not."""
    gpu_nodes = [node for node in nodes if node.gpus > 0]
    if not gpu_nodes:
        return _infeasible("NoGPUNodes", "no node has allocatable nvidia.com/gpu")
    matching = [node for node in gpu_nodes if not shape.product or node.product == shape.product]
    if not matching:
        return _infeasible(
            "NoMatchingGPU",
            f"no node has {labels.GPU_PRODUCT}={shape.product} (GPU products here: {_products(gpu_nodes)})",
        )
    if shape.memory_mib:
        roomy = [node for node in matching if (node.memory_mib or 0) >= shape.memory_mib]
        if not roomy:
            largest = max(node.memory_mib or 0 for node in matching)
            return _infeasible(
                "NoMatchingGPU",
                f"no {shape.product or 'GPU'} node has {shape.memory_mib} MiB per GPU "
                f"(largest {labels.GPU_MEMORY_MIB}: {largest} MiB)",
            )
        matching = roomy
    return matching


def _single_node_hosts(
    shape: ReplicaShape, nodes: Sequence[NodeTopology], strict: bool
) -> list[NodeTopology]:
    if not strict or shape.tensor == 1:
        return [node for node in nodes if node.gpus >= shape.gpus]
    return [node for node in nodes if node.group_slots(shape.tensor) >= shape.pipeline]


def _now(nodes: Sequence[NodeTopology], fits: Any) -> bool | None:
    if any(node.free is None for node in nodes):
        return None
    return any(fits(node) for node in nodes)


def _single_node(shape: ReplicaShape, hosts: Sequence[NodeTopology], policy: PlacementPolicy) -> Placement:
    tp = shape.tensor
    required = _gpu_expressions(shape)
    preferred: list[dict[str, Any]] = []
    sizes = [node.max_island for node in hosts if node.topology_known and node.max_island >= tp]
    if policy.nvlink == "Required":
        if tp > 1:
            required.append(_at_least(labels.NVLINK_MAX_ISLAND, tp))
        preferred = _best_fit_terms(sizes)
        schedulable = _now(hosts, lambda node: node.group_slots(tp, now=True) >= shape.pipeline)
    elif policy.nvlink == "Preferred":
        if tp > 1:
            preferred.append(
                {
                    "weight": FIT_WEIGHT,
                    "preference": {"matchExpressions": [_at_least(labels.NVLINK_MAX_ISLAND, tp)]},
                }
            )
        preferred += _best_fit_terms(sizes)
        schedulable = _now(hosts, lambda node: len(node.free_gpus()) >= shape.gpus)
    else:
        schedulable = _now(hosts, lambda node: len(node.free_gpus()) >= shape.gpus)
    node_affinity = _node_affinity(required, preferred)
    return Placement(
        feasible=True,
        reason=f"{shape.describe()} fits on one node; {len(hosts)} node(s) can host it",
        reason_code="Schedulable",
        affinity={"nodeAffinity": node_affinity} if node_affinity else {},
        gpus_per_node=shape.gpus,
        nodes_per_replica=1,
        group_label_key=policy.group_label_key,
        hosts=tuple(sorted(node.name for node in hosts)),
        schedulable_now=schedulable,
    )


@dataclass(frozen=True)
class _Split:
    """One way to cut a multi-node replica: pods of `per_pod` GPUs, TP inside a pod or spanning pods."""

    per_pod: int
    pods: int
    tp_spans_pods: bool


def _splits(shape: ReplicaShape, nodes: Sequence[NodeTopology]) -> list[_Split]:
    splits = []
    for per_pod in sorted({node.gpus for node in nodes}, reverse=True):
        if shape.gpus % per_pod:
            continue
        if per_pod % shape.tensor == 0:
            splits.append(_Split(per_pod, shape.gpus // per_pod, tp_spans_pods=False))
        elif shape.tensor % per_pod == 0:
            splits.append(_Split(per_pod, shape.gpus // per_pod, tp_spans_pods=True))
    return splits


def _pod_slots(node: NodeTopology, split: _Split, tp: int, strict: bool, *, now: bool = False) -> int:
    """How many of the split's pods this node can hold (under `strict`, each with NVLink-whole groups)."""
    gpus = len(node.free_gpus()) if now else node.gpus
    if not strict:
        return gpus // split.per_pod
    if split.tp_spans_pods:
        # The pod's GPUs join a TP group across nodes: it needs a whole island's worth on a clique node.
        return node.group_slots(split.per_pod, now=now) if node.clique else 0
    if tp == 1:
        return gpus // split.per_pod
    return node.group_slots(tp, now=now) // (split.per_pod // tp)


def _domains(nodes: Sequence[NodeTopology], key: str | None) -> dict[str, list[NodeTopology]]:
    if key is None:
        return {"": list(nodes)}
    grouped: dict[str, list[NodeTopology]] = defaultdict(list)
    for node in nodes:
        value = node.labels.get(key)
        if value:
            grouped[value].append(node)
    return grouped


def _multi_node(shape: ReplicaShape, nodes: Sequence[NodeTopology], policy: PlacementPolicy) -> Placement:
    tp = shape.tensor
    strict = policy.nvlink == "Required"
    reasons: list[tuple[str, str]] = []
    largest_node = max(node.gpus for node in nodes)
    for split in _splits(shape, nodes):
        # Domains to try, tightest first: a TP group spanning pods under Required, or a replica whose
        # nvlinkDomain is Required, has only the clique.
        needs_clique = (strict and split.tp_spans_pods) or policy.nvlink_domain == "Required"
        keys: list[str | None] = []
        if needs_clique or (policy.nvlink != "Ignore" and any(node.clique for node in nodes)):
            keys = [labels.GPU_CLIQUE]
        if not needs_clique:
            keys.append(policy.network_block_key)
        for key in keys:
            domains = _domains(nodes, key)
            capacity = {
                value: sum(_pod_slots(node, split, tp, strict) for node in members)
                for value, members in domains.items()
            }
            fitting = {value for value, slots in capacity.items() if slots >= split.pods}
            if not fitting:
                best = max(capacity.values(), default=0)
                where = f"one {key} domain" if key else "the cluster"
                reasons.append(
                    (
                        "NoNVLinkClique" if key == labels.GPU_CLIQUE else "InsufficientCapacity",
                        f"{shape.describe()} needs {split.pods} pods of {split.per_pod} GPUs in {where}; "
                        f"at most {best} fit",
                    )
                )
                continue
            hosts = [
                node for value in fitting for node in domains[value] if _pod_slots(node, split, tp, strict)
            ]
            return _multi_node_placement(shape, split, key, hosts, domains, fitting, policy)
    if not reasons:
        return _infeasible(
            "NoNodeFits",
            f"{shape.describe()} cannot be split evenly over nodes of {largest_node} GPUs "
            f"(node sizes here: {sorted({node.gpus for node in nodes})})",
        )
    if strict and tp > max(node.max_island for node in nodes) and not any(node.clique for node in nodes):
        return _infeasible(
            "NoNVLinkIsland",
            f"tensor parallelism {tp} needs one NVLink domain of {tp} GPUs; the largest island here has "
            f"{_gpus(max(node.max_island for node in nodes))} and no nodes share an NVLink clique "
            f"({labels.GPU_CLIQUE}); lower tensor parallelism or set gpu.nvlink: Preferred",
        )
    code, reason = reasons[-1]  # the least constrained attempt says best what is missing
    return _infeasible(code, reason)


def _multi_node_placement(
    shape: ReplicaShape,
    split: _Split,
    key: str | None,
    hosts: Sequence[NodeTopology],
    domains: dict[str, list[NodeTopology]],
    fitting: set[str],
    policy: PlacementPolicy,
) -> Placement:
    tp = shape.tensor
    strict = policy.nvlink == "Required"
    required = _gpu_expressions(shape)
    if strict:
        island = split.per_pod if split.tp_spans_pods else tp
        if island > 1:
            required.append(_at_least(labels.NVLINK_MAX_ISLAND, island))
    if key is not None:
        required.append(_expr(key, "Exists"))
    # An empty selector plus matchLabelKeys selects exactly the pods with this pod's group value (the API
    # forbids naming the same key in both, and rejects matchLabelKeys without a selector).
    term: dict[str, Any] = {
        "labelSelector": {},
        "matchLabelKeys": [policy.group_label_key],
        "topologyKey": key,
    }
    affinity: dict[str, Any] = {"nodeAffinity": _node_affinity(required, [])}
    lws_annotations: dict[str, str] = {}
    if key is not None:
        affinity["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
        if policy.exclusive_topology:
            lws_annotations[LWS_EXCLUSIVE_TOPOLOGY] = key
            # No pod of another group in the domain: pods that carry the group label with a value
            # other than this pod's (mismatchLabelKeys), whichever workload made them.
            others = {
                "labelSelector": {"matchExpressions": [_expr(policy.group_label_key, "Exists")]},
                "mismatchLabelKeys": [policy.group_label_key],
                "topologyKey": key,
            }
            affinity["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [others]}
    now = None
    if all(node.free is not None for members in domains.values() for node in members):
        now = any(
            sum(_pod_slots(node, split, tp, strict, now=True) for node in domains[value]) >= split.pods
            for value in fitting
        )
    where = f"inside one {key} domain" if key else "on any nodes"
    if split.tp_spans_pods:
        over = " over the NVLink clique" if key == labels.GPU_CLIQUE else ""
        how = f"tensor-parallel groups span pods{over}"
    else:
        how = "each pod holds whole tensor-parallel groups"
    return Placement(
        feasible=True,
        reason=f"{shape.describe()} runs as {split.pods} pods of {split.per_pod} GPUs {where}; {how}",
        reason_code="Schedulable",
        affinity=affinity,
        gpus_per_node=split.per_pod,
        nodes_per_replica=split.pods,
        topology_key=key,
        group_label_key=policy.group_label_key,
        lws_annotations=lws_annotations,
        hosts=tuple(sorted(node.name for node in hosts)),
        schedulable_now=now,
    )


def cpu_placement(shape: ReplicaShape, group_label_key: str = LWS_GROUP_KEY) -> Placement | None:
    """A CPU replica (no GPUs, no topology): one pod per pipeline stage, each running that stage's
    tensor-parallel ranks; None for a replica of one stage, which is one ordinary pod."""
    if shape.pipeline == 1:
        return None
    return Placement(
        feasible=True,
        reason=f"on CPU: one pod per pipeline stage ({shape.pipeline} pods of {shape.tensor} rank(s))",
        reason_code="Schedulable",
        nodes_per_replica=shape.pipeline,
        group_label_key=group_label_key,
    )


def plan(
    shape: ReplicaShape,
    nodes: Sequence[NodeTopology],
    policy: PlacementPolicy | NVLinkPolicy = "Required",
) -> Placement:
    """Where a replica of `shape` may run among `nodes`, as pod scheduling terms.

    A replica that fits on one node gets required node affinity to nodes of its GPU product whose
    largest NVLink island holds its tensor-parallel group (`Required`; a preference under `Preferred`;
    nothing under `Ignore`), plus best-fit preferences (smallest sufficient island first) so big islands
    stay whole for big replicas. A replica larger than any node is split into equal pods kept inside one
    NVLink clique (or network block) by pod affinity on that topology key. Feasibility is judged on
    static capacity: infeasible means no node (or clique) could ever host the replica, with the reason.
    """
    policy = policy if isinstance(policy, PlacementPolicy) else PlacementPolicy(nvlink=policy)
    matching = _filter_gpu(shape, nodes)
    if isinstance(matching, Placement):
        return matching
    strict = policy.nvlink == "Required"
    hosts = _single_node_hosts(shape, matching, strict)
    if hosts:
        return _single_node(shape, hosts, policy)
    if strict and shape.tensor > 1 and not any(node.topology_known for node in matching):
        return _infeasible(
            "TopologyUnknown",
            f"no {shape.product or 'GPU'} node publishes {labels.NVLINK_MAX_ISLAND}: run the Kiln topology "
            "agent on GPU nodes, or set gpu.nvlink: Preferred",
        )
    if shape.gpus <= max(node.gpus for node in matching) and shape.tensor <= max(
        node.gpus for node in matching
    ):
        largest = max(node.max_island for node in matching)
        if shape.tensor > largest and not any(node.clique for node in matching):
            return _infeasible(
                "NoNVLinkIsland",
                f"tensor parallelism {shape.tensor} needs an NVLink island of {shape.tensor} GPUs; "
                f"the largest island on {shape.product or 'GPU'} nodes is {largest} "
                f"({_islands_summary(matching)}); "
                "lower tensor parallelism or set gpu.nvlink: Preferred",
            )
    return _multi_node(shape, matching, policy)


def _islands_summary(nodes: Sequence[NodeTopology]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for node in nodes:
        if node.islands is not None:
            counts["+".join(str(len(island)) for island in node.islands)] += 1
        else:
            counts[f"max {node.max_island}" if node.topology_known else "unknown"] += 1
    return ", ".join(f"{count} node(s) with islands {layout}" for layout, count in sorted(counts.items()))
