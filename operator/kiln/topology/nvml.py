"""Reading a node's GPUs and their NVLink links through NVML (nvidia-ml-py): the agent's only GPU I/O."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pynvml

from kiln.topology.discovery import Discovery, FabricInfo, GpuInfo, PairLink

T = TypeVar("T")

_ANCESTORS = {
    pynvml.NVML_TOPOLOGY_INTERNAL: "internal",
    pynvml.NVML_TOPOLOGY_SINGLE: "single-switch",
    pynvml.NVML_TOPOLOGY_MULTIPLE: "multiple-switches",
    pynvml.NVML_TOPOLOGY_HOSTBRIDGE: "hostbridge",
    pynvml.NVML_TOPOLOGY_NODE: "numa-node",
    pynvml.NVML_TOPOLOGY_SYSTEM: "system",
}
_FABRIC_STATES = {0: "not-supported", 1: "not-started", 2: "in-progress", 3: "completed"}


class NvmlUnavailable(RuntimeError):
    """NVML could not be loaded or initialized: no NVIDIA driver on this machine (or not mounted)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def normalize_bus_id(bus_id: bytes | str) -> str:
    """Canonical PCI bus id "dddddddd:bb:dd.f" (NVML mixes 4- and 8-digit domains and letter case)."""
    text = _text(bus_id).strip().rstrip("\x00").lower()
    domain, bus, device_function = text.split(":")
    device, function = device_function.split(".")
    return f"{int(domain, 16):08x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"


def _maybe(call: Callable[..., T], *args: Any) -> T | None:
    """The call's result, or None when NVML says the query is unsupported on this GPU/driver."""
    try:
        return call(*args)
    except pynvml.NVMLError:
        return None


@contextmanager
def nvml_session() -> Iterator[None]:
    """Initialize NVML for the duration of the block, translating load failures into NvmlUnavailable."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        raise NvmlUnavailable(
            f"NVML is not available on this machine ({error}). The topology agent needs the NVIDIA "
            "driver (libnvidia-ml.so.1) and GPUs visible to its container: run it on GPU nodes with "
            "the NVIDIA container runtime (runtimeClassName: nvidia) or NVIDIA_VISIBLE_DEVICES=all."
        ) from error
    try:
        yield
    finally:
        pynvml.nvmlShutdown()


def _links(handle: Any, bus_ids: dict[str, int]) -> tuple[int, int, dict[int, int]]:
    """(links up, links to an NVSwitch, {peer GPU index: direct links}) for one GPU."""
    up = to_switch = 0
    direct: dict[int, int] = {}
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            state = pynvml.nvmlDeviceGetNvLinkState(handle, link)
        except pynvml.NVMLError:
            continue  # link absent on this GPU (NotSupported / InvalidArgument)
        if state != pynvml.NVML_FEATURE_ENABLED:
            continue
        up += 1
        kind = _maybe(pynvml.nvmlDeviceGetNvLinkRemoteDeviceType, handle, link)
        if kind == pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
            to_switch += 1
            continue
        remote = _maybe(pynvml.nvmlDeviceGetNvLinkRemotePciInfo, handle, link)
        if remote is None:
            continue
        peer = bus_ids.get(normalize_bus_id(remote.busId))
        if peer is not None:
            direct[peer] = direct.get(peer, 0) + 1
    return up, to_switch, direct


def _fabric(handle: Any) -> FabricInfo | None:
    info = pynvml.c_nvmlGpuFabricInfo_t()
    # The wrapper hands its argument straight to C, which expects a pointer to the struct.
    if _maybe(pynvml.nvmlDeviceGetGpuFabricInfo, handle, pynvml.byref(info)) is None:
        return None
    if info.state == pynvml.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED:
        return None
    return FabricInfo(
        cluster_uuid="-".join(f"{byte:02x}" for byte in bytes(info.clusterUuid)),
        clique_id=int(info.cliqueId),
        state=_FABRIC_STATES.get(int(info.state), str(info.state)),
    )


def discover() -> Discovery:
    """Read every GPU on this machine: product, memory, NVLink links, and pairwise P2P/NVLink status.

    Raises NvmlUnavailable when there is no NVIDIA driver.
    """
    with nvml_session():
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        bus_ids = {normalize_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId): i for i, h in enumerate(handles)}
        link_reports = [_links(handle, bus_ids) for handle in handles]
        gpus = [
            GpuInfo(
                index=i,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                pci_bus_id=normalize_bus_id(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                memory_mib=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024),
                nvlinks_up=link_reports[i][0],
                nvswitch_links=link_reports[i][1],
                fabric=_fabric(handle),
            )
            for i, handle in enumerate(handles)
        ]
        pairs = []
        for a in range(count):
            for b in range(a + 1, count):
                status = _maybe(
                    pynvml.nvmlDeviceGetP2PStatus, handles[a], handles[b], pynvml.NVML_P2P_CAPS_INDEX_NVLINK
                )
                ancestor = _maybe(pynvml.nvmlDeviceGetTopologyCommonAncestor, handles[a], handles[b])
                pairs.append(
                    PairLink(
                        a=a,
                        b=b,
                        p2p_nvlink=None if status is None else status == pynvml.NVML_P2P_STATUS_OK,
                        direct_links=link_reports[a][2].get(b, 0),
                        pcie_common_ancestor=None if ancestor is None else _ANCESTORS.get(ancestor),
                    )
                )
        driver = _maybe(pynvml.nvmlSystemGetDriverVersion)
        nvml_version = _maybe(pynvml.nvmlSystemGetNVMLVersion)
        cuda = _maybe(pynvml.nvmlSystemGetCudaDriverVersion)
        return Discovery(
            hostname=socket.gethostname(),
            driver_version=None if driver is None else _text(driver),
            nvml_version=None if nvml_version is None else _text(nvml_version),
            cuda_driver_version=cuda,
            gpus=gpus,
            pairs=pairs,
        )
