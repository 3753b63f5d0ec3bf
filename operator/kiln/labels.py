"""Node labels and annotations Kiln reads (GPU Feature Discovery) and writes (topology agent)."""

from __future__ import annotations

# Set by NVIDIA GPU Feature Discovery; Kiln reads them and never writes them.
GPU_PRODUCT = "nvidia.com/gpu.product"  # e.g. "NVIDIA-H100-80GB-HBM3"
GPU_COUNT = "nvidia.com/gpu.count"
GPU_MEMORY_MIB = "nvidia.com/gpu.memory"  # per GPU, MiB
GPU_FAMILY = "nvidia.com/gpu.family"  # e.g. "hopper"
GPU_CLIQUE = "nvidia.com/gpu.clique"  # "<clusterUUID>.<cliqueId>" on multi-node NVLink (GB200 NVL72)
GPU_RESOURCE = "nvidia.com/gpu"

# Published by `kiln topology-agent` (the node's NVLink islands as NVML sees them).
NVLINK_MAX_ISLAND = "kiln.dev/nvlink.max-island"  # label: size of the largest fully connected island
NVLINK_ISLAND_COUNT = "kiln.dev/nvlink.islands"  # label: number of islands
NVLINK_ISLANDS = "kiln.dev/nvlink-islands"  # annotation: JSON list of GPU index lists, e.g. [[0,1],[2,3]]

# Labels Kiln puts on the objects it creates.
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "kiln"
DEPLOYMENT_LABEL = "kiln.dev/deployment"
ENGINE_LABEL = "kiln.dev/engine"
COMPONENT_LABEL = "app.kubernetes.io/component"
ROUTER_COMPONENT = "router"  # the component of Kiln router pods (the autoscaler selects them by it)

# The local cluster's real node (kubelet + containerd; `kiln local up --real-node`).
REAL_NODE_LABEL = "kiln.dev/real-node"
