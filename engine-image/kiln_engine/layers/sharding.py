"""How each checkpoint tensor splits across tensor-parallel ranks and layers across pipeline stages.

Pure functions of Hugging Face tensor names, used by `kiln-engine build` to write `rank-<r>/`
shards and by the loader to slice a full checkpoint at load time. The layout matches the parallel
layers: column-parallel projections (q/k/v, gate/up) split their output channels, row-parallel ones
(o, down) their input channels, embeddings and the LM head their vocabulary rows; norms are whole.
k/v projections of a model with fewer KV heads than ranks are replicated, one head per rank group.
"""

from __future__ import annotations

import re

import torch

# w1/w3/w2: Mixtral experts' gate/up/down; every rank holds a slice of every expert (routers whole)
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3")
ROW_PARALLEL = ("o_proj", "down_proj", "w2")
VOCAB_PARALLEL = ("embed_tokens", "lm_head")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# A down projection's bias is added once after the all-reduce, for every expert a token chose: with
# expert parallelism every rank keeps every expert's.
_EVERY_RANK = ("down_proj.bias", "w2.bias")


def tp_shard_dim(name: str, ndim: int = 1) -> int | None:
    """The dimension of checkpoint tensor `name` (of `ndim` dimensions) split across TP ranks; None
    when every rank has it whole.

    Covers plain weights [out, in], biases, fp8/int8 `weight_scale` [out], MXFP4 `weight_scale`
    [out, in/32], and AWQ/GPTQ `qweight`/`qzeros`/`scales` (output channels on dim 1, inputs on
    dim 0) and GPTQ `g_idx` [in].
    """
    parts = name.split(".")
    if len(parts) < 2:
        return None
    module, param = parts[-2], parts[-1]
    if module in VOCAB_PARALLEL:
        return 0
    if module in COLUMN_PARALLEL:
        if param in ("weight", "bias", "weight_scale"):
            return 0
        if param in ("qweight", "qzeros", "scales"):
            return 1
        return None  # g_idx: indexes inputs, same on every rank
    if module in ROW_PARALLEL:
        if param == "weight":
            return 1
        if param in ("qweight", "qzeros", "scales", "g_idx"):
            return 0
        if param == "weight_scale" and ndim == 2:
            return 1  # MXFP4 exponents [out, in/32] split with the inputs
        return None  # bias (added once after the all-reduce), per-output-channel weight_scale
    return None


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> torch.Tensor:
    """Rank `rank`'s slice of checkpoint tensor `name` for tensor-parallel size `tp_size`."""
    if tp_size == 1:
        return tensor
    dim = tp_shard_dim(name, tensor.dim())
    if dim is None or tensor.dim() == 0 or tensor.numel() == 1:
        return tensor
    module = name.split(".")[-2]
    index, count = rank, tp_size
    if module in ("k_proj", "v_proj") and num_kv_heads < tp_size:
        if tp_size % num_kv_heads:
            raise ValueError(
                f"tensor-parallel size {tp_size} must divide or be a multiple of {num_kv_heads} KV heads"
            )
        index, count = rank // (tp_size // num_kv_heads), num_kv_heads
    size = tensor.shape[dim]
    if module in VOCAB_PARALLEL:  # padded split: ceil(vocab / tp) rows per rank
        per = -(-size // count)
        start = min(index * per, size)
        return tensor.narrow(dim, start, min(per, size - start)).contiguous()
    if size % count:
        raise ValueError(f"{name}: dim {dim} of size {size} does not split into {count} parts")
    part = size // count
    return tensor.narrow(dim, index * part, part).contiguous()


def expert_owner(name: str, num_experts: int, tp_size: int) -> int | None:
    """Under expert parallelism, the one rank that holds checkpoint tensor `name` (whole): expert e
    lies on rank e // (num_experts / tp_size). None for tensors that are no single expert's."""
    m = _EXPERT.search(name)
    if m is None or name.endswith(_EVERY_RANK):
        return None
    if num_experts % tp_size:
        raise ValueError(f"{num_experts} experts do not split over {tp_size} expert-parallel ranks")
    return int(m.group(1)) // (num_experts // tp_size)


def rank_tensor(
    name: str, tensor: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int, parallel_experts: int = 0
) -> torch.Tensor | None:
    """What rank `rank` holds of checkpoint tensor `name`: `shard_tensor`'s slice; or, with expert
    parallelism over `parallel_experts` experts, an expert's tensor whole on its rank and None on
    the others."""
    if parallel_experts and tp_size > 1:
        owner = expert_owner(name, parallel_experts, tp_size)
        if owner is not None:
            return tensor if owner == rank else None
        if _EXPERT.search(name):
            return tensor  # every expert's down bias on every rank
    return shard_tensor(name, tensor, rank, tp_size, num_kv_heads)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None for embeddings, final norm, LM head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Decoder layers of pipeline stage `pp_rank`: contiguous, earlier stages take the remainder."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} out of range for size {pp_size}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def in_pp_stage(
    name: str, num_layers: int, pp_rank: int, pp_size: int, tied_embeddings: bool = False
) -> bool:
    """Whether tensor `name` lives on pipeline stage `pp_rank` (embeddings first, norm and head last).

    With tied embeddings the last stage also holds `embed_tokens`, which is its LM head.
    """
    layer = layer_index(name)
    if layer is not None:
        return layer in pp_layer_range(num_layers, pp_rank, pp_size)
    if "embed_tokens" in name:
        return pp_rank == 0 or (tied_embeddings and pp_rank == pp_size - 1)
    return pp_rank == pp_size - 1
