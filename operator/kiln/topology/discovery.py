"""What the topology agent found on a node: per-GPU facts, per-pair NVLink evidence, and its islands."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kiln.topology.islands import Islands, islands_from_matrix, max_island


class FabricInfo(BaseModel):
    """A GPU's multi-node NVLink fabric membership (GB200 NVL72 and similar), as NVML reports it."""

    model_config = ConfigDict(frozen=True)

    cluster_uuid: str
    clique_id: int
    state: str  # "not-supported" | "not-started" | "in-progress" | "completed"


class GpuInfo(BaseModel):
    """One GPU as NVML sees it."""

    model_config = ConfigDict(frozen=True)

    index: int
    name: str  # NVML's product name, e.g. "NVIDIA H100 80GB HBM3"
    uuid: str
    pci_bus_id: str  # normalized "dddddddd:bb:dd.f"
    memory_mib: int
    nvlinks_up: int = 0  # NVLink links in state "enabled"
    nvswitch_links: int = 0  # of those, links whose far end is an NVSwitch
    fabric: FabricInfo | None = None


class PairLink(BaseModel):
    """Evidence about one GPU pair (i < j): NVLink P2P status, direct links, PCIe distance."""

    model_config = ConfigDict(frozen=True)

    a: int
    b: int
    p2p_nvlink: bool | None  # nvmlDeviceGetP2PStatus(NVLINK) == OK; None when NVML could not say
    direct_links: int = 0  # NVLink links from a whose remote PCI bus id is b
    pcie_common_ancestor: str | None = None  # nvmlDeviceGetTopologyCommonAncestor, e.g. "hostbridge"

    @property
    def nvlink(self) -> bool:
        """Whether the pair talks over NVLink.

        NVML's P2P status is trusted when it answered (it accounts for NVSwitch fabrics and for the
        fabric manager being down); otherwise a direct NVLink between the two counts.
        """
        if self.p2p_nvlink is not None:
            return self.p2p_nvlink
        return self.direct_links > 0


class Discovery(BaseModel):
    """A node's GPU topology: what `kiln topology-agent --dry-run` prints and what it publishes."""

    model_config = ConfigDict(frozen=True)

    hostname: str | None = None
    driver_version: str | None = None
    nvml_version: str | None = None
    cuda_driver_version: int | None = None
    gpus: list[GpuInfo] = Field(default_factory=list)
    pairs: list[PairLink] = Field(default_factory=list)

    def nvlink_matrix(self) -> list[list[bool]]:
        """Symmetric boolean matrix: entry [i][j] is True when GPUs i and j share NVLink."""
        n = len(self.gpus)
        matrix = [[i == j for j in range(n)] for i in range(n)]
        for pair in self.pairs:
            if not (0 <= pair.a < n and 0 <= pair.b < n):
                raise ValueError(f"pair ({pair.a}, {pair.b}) names a GPU outside 0..{n - 1}")
            matrix[pair.a][pair.b] = matrix[pair.b][pair.a] = pair.nvlink
        return matrix

    def islands(self) -> Islands:
        """The node's NVLink islands as GPU index lists."""
        return islands_from_matrix(self.nvlink_matrix())

    def max_island(self) -> int:
        return max_island(self.islands())

    def product(self) -> str | None:
        """The GPU product if all GPUs agree, else None."""
        names = {gpu.name for gpu in self.gpus}
        return names.pop() if len(names) == 1 else None

    def memory_mib(self) -> int | None:
        """The smallest per-GPU memory, in MiB (what a replica can rely on)."""
        return min((gpu.memory_mib for gpu in self.gpus), default=None)
