"""Placement's plain values: a replica's shape, a node's GPU topology (from a Node), and a placement."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kiln import labels

if TYPE_CHECKING:
    from kiln.api.v1alpha1 import LLMDeploymentSpec

NVLinkPolicy = Literal["Required", "Preferred", "Ignore"]
NVLINK_POLICIES: tuple[NVLinkPolicy, ...] = ("Required", "Preferred", "Ignore")
NVLinkDomainPolicy = Literal["Required", "Preferred"]
NVLINK_DOMAIN_POLICIES: tuple[NVLinkDomainPolicy, ...] = ("Required", "Preferred")

# LeaderWorkerSet's names (sigs.k8s.io/lws): the per-group label on every pod of one replica, and the
# annotation that gives each group a topology domain of its own.
LWS_GROUP_KEY = "leaderworkerset.sigs.k8s.io/group-key"
LWS_EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
HOSTNAME_LABEL = "kubernetes.io/hostname"


@dataclass(frozen=True)
class ReplicaShape:
    """One serving replica: `tensor` x `pipeline` GPUs of one product (any product when None)."""

    tensor: int = 1
    pipeline: int = 1
    product: str | None = None
    memory_mib: int | None = None

    def __post_init__(self) -> None:
        if self.tensor < 1 or self.pipeline < 1:
            raise ValueError(f"tensor and pipeline must be >= 1, got {self.tensor} x {self.pipeline}")

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline

    @classmethod
    def from_spec(cls, spec: LLMDeploymentSpec) -> ReplicaShape:
        """The shape an LLMDeployment spec asks for."""
        gpu = spec.gpu
        return cls(
            tensor=spec.parallelism.tensor,
            pipeline=spec.parallelism.pipeline,
            product=gpu.product if gpu else None,
            memory_mib=gpu.memory_mib if gpu else None,
        )

    def describe(self) -> str:
        text = f"TP={self.tensor}" + (f" x PP={self.pipeline}" if self.pipeline > 1 else "")
        of = f" of {self.product}" if self.product else ""
        return f"{text} ({self.gpus} GPU{'s' if self.gpus != 1 else ''}{of})"


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def parse_islands(annotation: str | None) -> tuple[tuple[int, ...], ...] | None:
    """The `kiln.dev/nvlink-islands` annotation as index tuples; None when absent or malformed."""
    if not annotation:
        return None
    try:
        data = json.loads(annotation)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, list) or not all(
        isinstance(island, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in island)
        for island in data
    ):
        return None
    return tuple(tuple(sorted(island)) for island in data if island)


@dataclass(frozen=True)
class NodeTopology:
    """What placement needs to know about one Node: GPUs, product, NVLink islands, clique, labels.

    `islands` is None when no topology agent has published the node (then `max_island` may still come
    from the label). `free` is the set of GPU indices not allocated right now, when the caller knows it;
    None means "unknown" and only static capacity is judged.
    """

    name: str
    gpus: int
    product: str | None = None
    memory_mib: int | None = None
    islands: tuple[tuple[int, ...], ...] | None = None
    max_island_label: int | None = None
    clique: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    free: frozenset[int] | None = None

    @classmethod
    def from_node(cls, node: Mapping[str, Any], free: Sequence[int] | None = None) -> NodeTopology:
        """Parse a Node (a dict as the API returns it): allocatable `nvidia.com/gpu`, GFD labels, Kiln's
        NVLink labels and islands annotation."""
        metadata = node.get("metadata") or {}
        status = node.get("status") or {}
        node_labels: dict[str, str] = dict(metadata.get("labels") or {})
        annotations = metadata.get("annotations") or {}
        gpus = _int((status.get("allocatable") or {}).get(labels.GPU_RESOURCE))
        if gpus is None:
            gpus = _int((status.get("capacity") or {}).get(labels.GPU_RESOURCE))
        if gpus is None:
            gpus = _int(node_labels.get(labels.GPU_COUNT)) or 0
        return cls(
            name=str(metadata.get("name", "")),
            gpus=gpus,
            product=node_labels.get(labels.GPU_PRODUCT),
            memory_mib=_int(node_labels.get(labels.GPU_MEMORY_MIB)),
            islands=parse_islands(annotations.get(labels.NVLINK_ISLANDS)),
            max_island_label=_int(node_labels.get(labels.NVLINK_MAX_ISLAND)),
            clique=node_labels.get(labels.GPU_CLIQUE) or None,
            labels=node_labels,
            free=None if free is None else frozenset(free),
        )

    @property
    def topology_known(self) -> bool:
        return self.islands is not None or self.max_island_label is not None

    @property
    def max_island(self) -> int:
        """Largest NVLink island (0 when unknown)."""
        if self.islands is not None:
            return max((len(island) for island in self.islands), default=0)
        return self.max_island_label or 0

    def group_slots(self, size: int, *, now: bool = False) -> int:
        """How many disjoint groups of `size` GPUs, each inside one island, the node can hold.

        With `now`, only free GPUs count. Without the islands annotation, the max-island label is taken as
        one island (a lower bound of what the node holds).
        """
        if size <= 1:
            return len(self.free_gpus()) if now else self.gpus
        if self.islands is not None:
            islands = [set(island) for island in self.islands]
        elif self.max_island_label:
            islands = [set(range(self.max_island_label))]
        else:
            return 0
        if now:
            free = self.free_gpus()
            islands = [island & free for island in islands]
        return sum(len(island) // size for island in islands)

    def free_gpus(self) -> frozenset[int]:
        """GPU indices free now (all of them when unknown)."""
        return self.free if self.free is not None else frozenset(range(self.gpus))


@dataclass(frozen=True)
class Placement:
    """Where a replica may run, as Kubernetes scheduling terms for its pod template(s).

    `affinity` drops into `pod.spec.affinity`. A multi-node replica (`nodes_per_replica` > 1) runs as
    `nodes_per_replica` pods of `gpus_per_node` GPUs each (a LeaderWorkerSet group of that size); its pods
    must carry `group_label_key` with one value per replica (LeaderWorkerSet sets it), so the pod affinity
    keeps them in one `topology_key` domain (an NVLink clique or a network block).
    """

    feasible: bool
    reason: str
    reason_code: str
    affinity: dict[str, Any] = field(default_factory=dict)
    gpus_per_node: int = 0
    nodes_per_replica: int = 1
    topology_key: str | None = None
    group_label_key: str = LWS_GROUP_KEY
    lws_annotations: dict[str, str] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()
    schedulable_now: bool | None = None

    @property
    def multi_node(self) -> bool:
        return self.nodes_per_replica > 1

    def condition(self) -> dict[str, str]:
        """The `Unschedulable` condition this placement implies (status "True" when infeasible)."""
        return {
            "type": "Unschedulable",
            "status": "False" if self.feasible else "True",
            "reason": self.reason_code,
            "message": self.reason,
        }
