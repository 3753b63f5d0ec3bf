"""Topology files (pools of simulated GPU nodes) and the pure translation into KWOK Node manifests.

A topology file names pools of identical nodes; `node_manifests` turns it into the Node objects a
real cluster would show: GPU Feature Discovery labels (`nvidia.com/gpu.*`), `nvidia.com/gpu`
capacity, and the NVLink islands Kiln's topology agent publishes. Every node is labelled and
annotated as a KWOK node, so KWOK manages it and leaves any other node alone.

    from kiln.local.topology import load_topology
    nodes = load_topology("mixed")  # or a path to a YAML file
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln import labels

TOPOLOGIES_DIR = Path(__file__).resolve().parent / "topologies"

# KWOK manages exactly the nodes that carry this label (see kiln.local.kwok).
KWOK_NODE_LABEL = "type"
KWOK_NODE_LABEL_VALUE = "kwok"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
# The RuntimeClass the NVIDIA GPU Operator registers on a GPU cluster (and the chart's default
# topologyAgent.runtimeClassName).
GPU_RUNTIME_CLASS = "nvidia"


class GpuModel(BaseModel):
    """What GPU Feature Discovery reports for one GPU model."""

    model_config = ConfigDict(frozen=True)

    product: str
    memory_mib: int
    family: str
    compute: tuple[int, int]
    mig_capable: bool


GPU_MODELS: dict[str, GpuModel] = {
    "H100-SXM5-80GB": GpuModel(
        product="NVIDIA-H100-80GB-HBM3", memory_mib=81559, family="hopper", compute=(9, 0), mig_capable=True
    ),
    "H200-SXM5-141GB": GpuModel(
        product="NVIDIA-H200", memory_mib=143771, family="hopper", compute=(9, 0), mig_capable=True
    ),
    "A100-SXM4-80GB": GpuModel(
        product="NVIDIA-A100-SXM4-80GB", memory_mib=81920, family="ampere", compute=(8, 0), mig_capable=True
    ),
    "A100-PCIE-80GB": GpuModel(
        product="NVIDIA-A100-80GB-PCIe", memory_mib=81920, family="ampere", compute=(8, 0), mig_capable=True
    ),
    "L40S": GpuModel(
        product="NVIDIA-L40S", memory_mib=46068, family="ada-lovelace", compute=(8, 9), mig_capable=False
    ),
    "L4": GpuModel(
        product="NVIDIA-L4", memory_mib=23034, family="ada-lovelace", compute=(8, 9), mig_capable=False
    ),
    "GB200": GpuModel(
        product="NVIDIA-GB200", memory_mib=189471, family="blackwell", compute=(10, 0), mig_capable=True
    ),
}


class Taint(BaseModel):
    """A node taint, as in the Node API."""

    model_config = ConfigDict(extra="forbid")

    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class GpuSpec(BaseModel):
    """The GPUs of each node in a pool and how NVLink connects them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    count: int = Field(gt=0)
    # Fully connected NVLink islands as GPU index lists: [[0..7]] for an NVSwitch domain,
    # [[0,1],[2,3],...] for bridged pairs, [[0],[1],...] for no NVLink at all.
    islands: list[list[int]]
    # Multi-node NVLink domain (GB200 NVL72): "<clusterUUID>.<cliqueId>", shared by its nodes.
    clique: str | None = None

    @model_validator(mode="after")
    def _check(self) -> GpuSpec:
        if self.model not in GPU_MODELS:
            raise ValueError(f"unknown GPU model {self.model!r}; known: {', '.join(sorted(GPU_MODELS))}")
        indices = sorted(i for island in self.islands for i in island)
        if indices != list(range(self.count)):
            raise ValueError(
                f"islands {self.islands} must split GPUs 0..{self.count - 1} into disjoint groups"
            )
        if any(not island for island in self.islands):
            raise ValueError("an NVLink island cannot be empty")
        if self.clique is not None and "." not in self.clique:
            raise ValueError(f"clique {self.clique!r} must look like <clusterUUID>.<cliqueId>")
        return self


class Pool(BaseModel):
    """A group of identical nodes, named `<pool>-<index>`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    count: int = Field(default=1, gt=0)
    cpu: str = "16"
    memory: str = "64Gi"
    pods: str = "110"
    ephemeral_storage: str = Field(default="500Gi", alias="ephemeralStorage")
    arch: Literal["amd64", "arm64"] = "amd64"
    machine: str | None = None
    instance_type: str | None = Field(default=None, alias="instanceType")
    zone: str | None = None
    driver: str = "570.133.20"
    cuda: str = "12.8"
    gpu: GpuSpec | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)


class Topology(BaseModel):
    """A named set of node pools."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    pools: list[Pool] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_pools(self) -> Topology:
        names = [pool.name for pool in self.pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(duplicates)}")
        return self


def gpu_labels(pool: Pool, gpu: GpuSpec) -> dict[str, str]:
    """Labels GPU Feature Discovery and Kiln's topology agent would put on a node of this pool."""
    model = GPU_MODELS[gpu.model]
    driver = pool.driver.split(".")
    cuda = pool.cuda.split(".")
    result = {
        GPU_PRESENT_LABEL: "true",
        labels.GPU_PRODUCT: model.product,
        labels.GPU_COUNT: str(gpu.count),
        labels.GPU_MEMORY_MIB: str(model.memory_mib),
        labels.GPU_FAMILY: model.family,
        "nvidia.com/gpu.compute.major": str(model.compute[0]),
        "nvidia.com/gpu.compute.minor": str(model.compute[1]),
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.mode": "compute",
        "nvidia.com/mig.capable": str(model.mig_capable).lower(),
        "nvidia.com/cuda.driver-version.full": pool.driver,
        "nvidia.com/cuda.driver-version.major": driver[0],
        "nvidia.com/cuda.driver-version.minor": driver[1] if len(driver) > 1 else "0",
        "nvidia.com/cuda.driver-version.revision": driver[2] if len(driver) > 2 else "0",
        "nvidia.com/cuda.runtime-version.full": pool.cuda,
        "nvidia.com/cuda.runtime-version.major": cuda[0],
        "nvidia.com/cuda.runtime-version.minor": cuda[1] if len(cuda) > 1 else "0",
        labels.NVLINK_MAX_ISLAND: str(max(len(island) for island in gpu.islands)),
        labels.NVLINK_ISLAND_COUNT: str(len(gpu.islands)),
    }
    if pool.machine:
        result["nvidia.com/gpu.machine"] = pool.machine
    if gpu.clique:
        result[labels.GPU_CLIQUE] = gpu.clique
    return result


def node_manifest(pool: Pool, index: int) -> dict[str, Any]:
    """The Node object for node `index` of `pool`."""
    name = f"{pool.name}-{index}"
    node_labels = {
        KWOK_NODE_LABEL: KWOK_NODE_LABEL_VALUE,
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": pool.arch,
    }
    if pool.instance_type:
        node_labels["node.kubernetes.io/instance-type"] = pool.instance_type
    if pool.zone:
        node_labels["topology.kubernetes.io/zone"] = pool.zone
    annotations = {KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE, "node.alpha.kubernetes.io/ttl": "0"}
    resources = {
        "cpu": pool.cpu,
        "memory": pool.memory,
        "pods": pool.pods,
        "ephemeral-storage": pool.ephemeral_storage,
    }
    if pool.gpu:
        node_labels |= gpu_labels(pool, pool.gpu)
        annotations[labels.NVLINK_ISLANDS] = json.dumps(pool.gpu.islands, separators=(",", ":"))
        resources[labels.GPU_RESOURCE] = str(pool.gpu.count)
    node_labels |= pool.labels
    annotations |= pool.annotations
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels, "annotations": annotations},
        "spec": {"taints": [taint.model_dump() for taint in pool.taints]},
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "nodeInfo": {"architecture": pool.arch, "operatingSystem": "linux"},
        },
    }


def node_manifests(topology: Topology) -> list[dict[str, Any]]:
    """Every Node of the topology, pool by pool, in order."""
    return [node_manifest(pool, index) for pool in topology.pools for index in range(pool.count)]


def gpu_runtime_classes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `nvidia` RuntimeClass when the topology has GPU nodes, as on a GPU cluster: without it
    the API server refuses every pod that names it (the topology agent's, on each GPU node), so
    `helm install --wait` of the chart never ends. Its scheduling keeps such pods on GPU nodes,
    which KWOK simulates: no container runs there, so the handler is never called, and the real
    (CPU) node, whose containerd has no `nvidia` handler, never gets one."""
    if not any((node["metadata"].get("labels") or {}).get(GPU_PRESENT_LABEL) == "true" for node in nodes):
        return []
    return [
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": GPU_RUNTIME_CLASS},
            "handler": GPU_RUNTIME_CLASS,
            "scheduling": {"nodeSelector": {GPU_PRESENT_LABEL: "true"}},
        }
    ]


def topology_names() -> list[str]:
    """Names of the topologies shipped with Kiln."""
    return sorted(path.stem for path in TOPOLOGIES_DIR.glob("*.yaml"))


def topology_path(name_or_path: str | Path) -> Path:
    """The file for a shipped topology name, or the given path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise FileNotFoundError(f"topology file {candidate} does not exist")
        return candidate
    shipped = TOPOLOGIES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise FileNotFoundError(f"no topology named {name_or_path!r}; shipped: {', '.join(topology_names())}")
    return shipped


def parse_topology(text: str) -> Topology:
    """A topology from YAML text; pydantic's ValidationError names any bad field."""
    return Topology.model_validate(yaml.safe_load(text))


def read_topology(name_or_path: str | Path) -> Topology:
    """A shipped topology by name (`h100`, `mixed`, ...) or a topology file by path."""
    return parse_topology(topology_path(name_or_path).read_text())


def load_topology(name_or_path: str | Path) -> list[dict[str, Any]]:
    """The Node manifests of a shipped topology name or a topology file path."""
    return node_manifests(read_topology(name_or_path))


def node_summary(nodes: list[dict[str, Any]]) -> list[str]:
    """One line per kind of node (GPU product, or CPU), with how many there are and how many are Ready.

    What `kiln local status` prints, from the Node objects the API server lists.
    """
    groups: dict[str, list[bool]] = {}
    for node in nodes:
        node_labels = node.get("metadata", {}).get("labels", {})
        product = node_labels.get(labels.GPU_PRODUCT)
        count = node_labels.get(labels.GPU_COUNT)
        if product:
            kind = f"{product} x{count}" if count else product
        elif node_labels.get(labels.REAL_NODE_LABEL) == "true":
            kind = "real node (CPU, pods run in containers)"
        else:
            kind = "CPU"
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        groups.setdefault(kind, []).append(ready)
    lines = [f"{len(flags):5} nodes  {sum(flags):5} Ready  {kind}" for kind, flags in sorted(groups.items())]
    total = sum(len(flags) for flags in groups.values())
    total_ready = sum(sum(flags) for flags in groups.values())
    return [*lines, f"{total:5} nodes  {total_ready:5} Ready  in all"]
