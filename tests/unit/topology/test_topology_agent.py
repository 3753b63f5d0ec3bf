"""The topology agent's discovery model, the patch it publishes, and its command line."""

from __future__ import annotations

import json
from pathlib import Path

import pynvml
import pytest
from click.testing import CliRunner

from kiln import labels
from kiln.cli import main
from kiln.topology.discovery import Discovery, GpuInfo, PairLink
from kiln.topology.nvml import normalize_bus_id
from kiln.topology.publish import node_patch, product_label_value


def gpus(n: int, name: str = "NVIDIA H100 80GB HBM3", memory: int = 81559) -> list[GpuInfo]:
    return [
        GpuInfo(
            index=i, name=name, uuid=f"GPU-{i}", pci_bus_id=f"00000000:{i + 0x18:02x}:00.0", memory_mib=memory
        )
        for i in range(n)
    ]


def a100_pcie_pairs() -> Discovery:
    """Eight PCIe A100s with NVLink bridges on (0,1), (2,3), ...: P2P over NVLink only within a pair."""
    pairs = [
        PairLink(
            a=a,
            b=b,
            p2p_nvlink=(b == a + 1 and a % 2 == 0),
            direct_links=12 if b == a + 1 and a % 2 == 0 else 0,
        )
        for a in range(8)
        for b in range(a + 1, 8)
    ]
    return Discovery(gpus=gpus(8, "NVIDIA A100 80GB PCIe", 81920), pairs=pairs)


def test_discovery_islands_follow_p2p_status() -> None:
    discovery = a100_pcie_pairs()
    assert discovery.islands() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert discovery.max_island() == 2
    assert discovery.product() == "NVIDIA A100 80GB PCIe"


def test_direct_links_count_when_p2p_status_is_unknown() -> None:
    pairs = [PairLink(a=0, b=1, p2p_nvlink=None, direct_links=4), PairLink(a=0, b=2, p2p_nvlink=None)]
    pairs.append(PairLink(a=1, b=2, p2p_nvlink=None))
    assert Discovery(gpus=gpus(3), pairs=pairs).islands() == [[0, 1], [2]]


def test_p2p_status_overrides_links() -> None:
    # NVLink is cabled but the driver refuses P2P over it (e.g. fabric manager down): not an island.
    pairs = [PairLink(a=0, b=1, p2p_nvlink=False, direct_links=4)]
    assert Discovery(gpus=gpus(2), pairs=pairs).islands() == [[0], [1]]


def test_pair_outside_gpus_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        Discovery(gpus=gpus(2), pairs=[PairLink(a=0, b=5, p2p_nvlink=True)]).islands()


def test_patch_without_gfd_publishes_product_and_memory() -> None:
    patch = node_patch(a100_pcie_pairs(), {})
    assert patch["metadata"]["labels"] == {
        labels.NVLINK_MAX_ISLAND: "2",
        labels.NVLINK_ISLAND_COUNT: "4",
        labels.GPU_PRODUCT: "NVIDIA-A100-80GB-PCIe",
        labels.GPU_MEMORY_MIB: "81920",
    }
    assert json.loads(patch["metadata"]["annotations"][labels.NVLINK_ISLANDS]) == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]


def test_patch_leaves_gfd_labels_to_gfd() -> None:
    gfd = {labels.GPU_PRODUCT: "NVIDIA-A100-80GB-PCIe", labels.GPU_MEMORY_MIB: "81920"}
    patch_labels = node_patch(a100_pcie_pairs(), gfd)["metadata"]["labels"]
    assert labels.GPU_PRODUCT not in patch_labels
    assert labels.GPU_MEMORY_MIB not in patch_labels
    assert patch_labels[labels.NVLINK_MAX_ISLAND] == "2"


def test_node_without_gpus_publishes_zero() -> None:
    patch = node_patch(Discovery(), {})
    assert patch["metadata"]["labels"] == {labels.NVLINK_MAX_ISLAND: "0", labels.NVLINK_ISLAND_COUNT: "0"}
    assert patch["metadata"]["annotations"][labels.NVLINK_ISLANDS] == "[]"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA-GeForce-RTX-4090"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"),
        ("Tesla V100 (PCIe) ", "Tesla-V100-PCIe"),
    ],
)
def test_product_label_is_gfd_shaped(name: str, label: str) -> None:
    assert product_label_value(name) == label


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"00000000:18:00.0", "00000000:18:00.0"),
        ("0000:9A:00.0", "00000000:9a:00.0"),
        ("00000001:0b:1f.7", "00000001:0b:1f.7"),
    ],
)
def test_bus_ids_compare_equal_across_formats(raw: bytes | str, normal: str) -> None:
    assert normalize_bus_id(raw) == normal


def test_dry_run_replays_a_recorded_discovery(tmp_path: Path) -> None:
    recorded = tmp_path / "discovery.json"
    recorded.write_text(a100_pcie_pairs().model_dump_json())
    result = CliRunner().invoke(main, ["topology-agent", "--once", "--dry-run", "--discovery", str(recorded)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["islands"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert report["nvlink_matrix"][0][:3] == [1, 1, 0]
    assert report["discovery"]["gpus"][3]["name"] == "NVIDIA A100 80GB PCIe"
    assert report["patch"]["metadata"]["labels"][labels.NVLINK_MAX_ISLAND] == "2"


def _nvml_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_nvml_present(), reason="this machine has NVML; the no-driver path cannot be shown here")
def test_without_nvml_the_agent_fails_clearly() -> None:
    result = CliRunner().invoke(main, ["topology-agent", "--once", "--dry-run"])
    assert result.exit_code != 0
    assert "NVML is not available" in result.output
    assert "NVIDIA driver" in result.output


def test_publishing_needs_a_node_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    recorded = tmp_path / "discovery.json"
    recorded.write_text(Discovery().model_dump_json())
    result = CliRunner().invoke(main, ["topology-agent", "--once", "--discovery", str(recorded)])
    assert result.exit_code != 0
    assert "NODE_NAME" in result.output
