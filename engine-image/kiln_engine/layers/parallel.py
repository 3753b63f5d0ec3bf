"""The tensor-parallel group a model runs in: this process's rank, the group size, and its collectives.

With `size == 1` every collective is the identity and torch.distributed is never touched, so the
same model code runs on one CPU in tests and across NVLink-connected GPUs with NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


def init_tensor_parallel(rank: int, size: int, device: torch.device) -> TPGroup:
    """Join the process group (env:// rendezvous: MASTER_ADDR, MASTER_PORT) unless already joined.

    NCCL on CUDA, gloo on CPU (used by the CPU tests of tensor parallelism).
    """
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
    return TPGroup(rank, size)


def divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"{n} is not divisible by tensor-parallel size {d}")
    return n // d
