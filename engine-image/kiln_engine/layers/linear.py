"""Linear layers split across tensor-parallel ranks: column-parallel (merged q/k/v, gate/up) and row-parallel.

Each layer holds only its rank's slice. `load(name, tensor, shard)` accepts either that slice (a
pre-sharded Kiln artifact) or the full checkpoint tensor (a Hugging Face checkpoint), telling them
apart by size, and places a merged layer's sub-projection (`shard` = "q", "k", "v", 0, 1) at its
offset. The matmul itself belongs to the quantization's `LinearMethod`; a layer that LoRA adapters
target adds their per-token delta to it (`kiln_engine.lora_layers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kiln_engine.config import QuantConfig
from kiln_engine.layers.parallel import TPGroup, divide
from kiln_engine.quantization import LinearMethod, linear_method

if TYPE_CHECKING:
    from kiln_engine.lora_layers import LoraLinear


def load_slice(
    dst: torch.Tensor, src: torch.Tensor, dim: int | None, index: int, count: int, what: str
) -> None:
    """Copy `src` into `dst`: as is, or its `index`-th of `count` equal parts along `dim`."""
    if src.numel() == 1 and dst.numel() > 1:  # a per-tensor scale broadcast to per-channel
        dst.fill_(src.reshape(()).item())
        return
    if dim is not None and src.dim() == dst.dim() and src.shape[dim] != dst.shape[dim]:
        if src.shape[dim] != dst.shape[dim] * count:
            raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        src = src.narrow(dim, index * dst.shape[dim], dst.shape[dim])
    if src.shape != dst.shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} != expected {tuple(dst.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        self.method: LinearMethod = linear_method(quant)
        self.method.create_weights(self, in_features, out_features, dtype)
        self.specs = self.method.param_specs()
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.fused = False  # set by the model runner: small batches through `small_m_linear`
        self.lora: LoraLinear | None = None  # set by the model runner when it serves LoRA adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        begun = None if lora is None else lora.begin(x)
        out = self.matmul(x, self.bias)
        return out if lora is None else lora.add_delta(x, out, begun)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fused:
            from kiln_engine.layers import gemv  # Triton: imported only where the fast path runs

            rows = x.numel() // x.shape[-1]
            streamed = self.method.streamed_weight(self) if rows <= gemv.MAX_ROWS else None
            if streamed is not None and (streamed[1] is not None or gemv.streams_dense(rows, streamed[0])):
                return gemv.small_m_linear(x, streamed[0], streamed[1], bias)
        return self.method.apply(self, x, bias)


class ColumnParallelLinear(LinearBase):
    """Y = X W^T with W's output rows split across ranks; no communication."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        tp: TPGroup,
    ) -> None:
        super().__init__(in_features, divide(out_features, tp.size), bias, quant, dtype, tp)

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        param: torch.Tensor = getattr(self, name)
        dim = 0 if name == "bias" else self.specs[name].output_dim
        load_slice(param.data, tensor, dim, self.tp.rank, self.tp.size, name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one (gate/up)."""

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        tp: TPGroup,
    ) -> None:
        self.local_sizes = [divide(s, tp.size) for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, quant, dtype, tp)

    def shard_layout(self, shard: str | int | None) -> tuple[int, int, int, int]:
        """(offset, size, index, count) of one sub-projection in this rank's output channels."""
        assert isinstance(shard, int)
        return sum(self.local_sizes[:shard]), self.local_sizes[shard], self.tp.rank, self.tp.size

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        param: torch.Tensor = getattr(self, name)
        spec = self.specs.get(name)
        out_dim = 0 if name == "bias" else (spec.output_dim if spec else None)
        if out_dim is None:  # shared by all sub-projections (g_idx)
            load_slice(param.data, tensor, spec.input_dim if spec else None, 0, 1, name)
            return
        pack = spec.pack_factor if spec and name != "bias" else 1
        offset, size, index, count = self.shard_layout(shard)
        dst = param.data.narrow(out_dim, offset // pack, size // pack)
        load_slice(dst, tensor, out_dim, index, count, f"{name}[{shard}]")


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections fused; k/v heads are replicated when there are fewer than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        tp: TPGroup,
    ) -> None:
        self.num_heads = divide(num_heads, tp.size)
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size)
            self.kv_index, self.kv_count = tp.rank, tp.size
        else:
            divide(tp.size, num_kv_heads)
            self.num_kv_heads = 1
            self.kv_index, self.kv_count = tp.rank // (tp.size // num_kv_heads), num_kv_heads
        self.head_dim = head_dim
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.local_sizes = [q, kv, kv]
        LinearBase.__init__(self, hidden_size, q + 2 * kv, bias, quant, dtype, tp)

    def shard_layout(self, shard: str | int | None) -> tuple[int, int, int, int]:
        q, kv = self.local_sizes[0], self.local_sizes[1]
        if shard == "q":
            return 0, q, self.tp.rank, self.tp.size
        if shard == "k":
            return q, kv, self.kv_index, self.kv_count
        if shard == "v":
            return q + kv, kv, self.kv_index, self.kv_count
        raise ValueError(f"unknown qkv shard {shard!r}")


class RowParallelLinear(LinearBase):
    """Y = X W^T with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        tp: TPGroup,
    ) -> None:
        super().__init__(divide(in_features, tp.size), out_features, bias, quant, dtype, tp)

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        param: torch.Tensor = getattr(self, name)
        dim = None if name == "bias" else self.specs[name].input_dim
        load_slice(param.data, tensor, dim, self.tp.rank, self.tp.size, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None
        lora = self.lora
        begun = None if lora is None else lora.begin(x)
        out = self.matmul(x, bias)
        if lora is not None:  # a partial product of this rank's input slice, like `out`
            out = lora.add_delta(x, out, begun)
        return self.tp.all_reduce(out)
