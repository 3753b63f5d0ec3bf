"""The parallel layout a model runs in: its tensor-parallel group (rank, size, collectives) and its
pipeline stage (which decoder layers this rank holds, and its neighbours in the pipeline).

Global rank = stage * tp + tp_rank (the artifact's `rank-<r>/` numbering). With one rank every
collective is the identity and torch.distributed is never touched, so the same model code runs on
one CPU in tests and across GPUs with NCCL (gloo on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kiln_engine.layers.sharding import pp_layer_range


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # the stage's process group; None: the default (world) group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class PPStage:
    """Pipeline stage `rank` of `size`, holding decoder layers [first_layer, end_layer)."""

    rank: int = 0
    size: int = 1
    first_layer: int = 0
    end_layer: int = 0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def holds_layer(self, layer: int) -> bool:
        return self.first_layer <= layer < self.end_layer


def global_rank(pp_rank: int, tp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


def pipeline_stage(num_layers: int, pp_rank: int, pp_size: int) -> PPStage:
    """The default split (earlier stages take the remainder), as `kiln-engine build` writes it."""
    layers = pp_layer_range(num_layers, pp_rank, pp_size)
    return PPStage(pp_rank, pp_size, layers.start, layers.stop)


def init_parallel(tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, device: torch.device) -> TPGroup:
    """Join the process group of tp * pp ranks (env:// rendezvous: MASTER_ADDR, MASTER_PORT) unless
    already joined, and make one tensor-parallel group per stage (every rank creates all of them, in
    order, as torch.distributed requires). NCCL on CUDA, gloo on CPU."""
    world = tp_size * pp_size
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend_for(device), rank=global_rank(pp_rank, tp_rank, tp_size), world_size=world
        )
    group = None
    if pp_size > 1 and tp_size > 1:
        groups = [
            dist.new_group([global_rank(s, t, tp_size) for t in range(tp_size)]) for s in range(pp_size)
        ]
        group = groups[pp_rank]
    return TPGroup(tp_rank, tp_size, group)


def init_tensor_parallel(rank: int, size: int, device: torch.device) -> TPGroup:
    """Tensor parallelism alone (one pipeline stage)."""
    return init_parallel(rank, size, 0, 1, device)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"{n} is not divisible by tensor-parallel size {d}")
    return n // d
