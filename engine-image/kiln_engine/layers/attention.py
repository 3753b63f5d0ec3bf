"""Paged attention: the per-step batch metadata, the backend interface, and the reference torch backend.

A step's tokens are one flattened varlen batch: sequence b contributes `query_lens[b]` new tokens
whose positions end at `seq_lens[b]` (cached prefix + new tokens). Every layer first writes the new
K/V into its cache `[num_blocks, block_size, num_kv_heads, head_dim]` at `slot_mapping`, then attends
over each sequence's blocks (`block_tables`). Decode, prefill chunks over a cached prefix and mixed
batches all take this one path.

An fp8 KV cache (`EngineConfig.kv_cache_dtype="fp8"`) stores e4m3 values with one float32 scale per
(layer, K or V, KV head): the store divides by the scale and saturates at +-448, every reader
multiplies it back (`quantize_kv`, `dequantize_kv`; the scales are None for a float cache).

`TorchAttentionBackend` is the correct-everywhere reference: it gathers each sequence's K/V from
its blocks into a padded batch and calls `scaled_dot_product_attention` with a causal (and
optionally sliding-window) mask. A GPU backend (Triton / FlashInfer paged kernels) implements the
same two methods and is chosen by `EngineConfig.attention_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Tensors (on the model's device) describing one step's batch; built once, read by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] int32: offsets of each sequence's tokens in the batch
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    query_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    block_size: int
    backend_state: dict[str, Any] = field(default_factory=dict)  # what a backend derives, per step


class AttentionBackend(Protocol):
    """Computes paged attention for one layer; `prepare` runs once per step before the layers."""

    name: str

    def prepare(self, meta: AttentionMetadata) -> None: ...

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# EngineConfig.kv_cache_dtype -> the cache's element type (None: the model's dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": FP8_KV_DTYPE,
}


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type for `EngineConfig.kv_cache_dtype`; unknown names are an error."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv cache dtype {name!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name] or model_dtype


def check_fp8_kv_support(backend: str, device_type: str, capability: tuple[int, int] | None) -> None:
    """An fp8 cache read by the Triton kernels needs e4m3 in hardware (compute capability 8.9+:
    Ada, Hopper); say so before loading anything rather than fail compiling the first kernel."""
    if backend == "triton" and device_type == "cuda" and capability is not None and capability < (8, 9):
        raise ValueError(
            f"an fp8 KV cache needs a GPU of compute capability 8.9 or newer (this one: "
            f"{capability[0]}.{capability[1]}); serve with --kv-cache-dtype auto"
        )


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, cache_dtype: torch.dtype) -> torch.Tensor:
    """[T, Hkv, D] in the cache's dtype: divided by the per-head scale and saturated when it is fp8."""
    if scale is None:
        return x.to(cache_dtype)
    return (x.float() / scale[:, None]).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[..., Hkv, D] cache values back in `dtype` (times the per-head scale when there is one)."""
    if scale is None:
        return x.to(dtype)
    return (x.float() * scale[:, None]).to(dtype)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    # CPU torch has no index_copy_ for fp8; the same bytes move as uint8.
    return t.view(torch.uint8) if t.dtype == FP8_KV_DTYPE else t


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter new keys/values [T, Hkv, D] into the paged cache (quantized when it is fp8)."""
    kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    for x, cache, s in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        values = _byte_view(quantize_kv(x, s, cache.dtype))
        _byte_view(cache).view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, values)


class TorchAttentionBackend:
    """Reference paged attention with torch ops only: runs on CPU and GPU, with no host syncs."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.seq_lens.device
        num_seqs = meta.seq_lens.shape[0]
        max_q, max_kv, bs = meta.max_query_len, meta.max_seq_len, meta.block_size
        seq_lens = meta.seq_lens.long()
        query_lens = meta.query_lens.long()
        # Slots of every key position of every sequence: [B, max_kv].
        kpos = torch.arange(max_kv, device=device)
        blocks = meta.block_tables.long().gather(
            1, (kpos // bs).clamp(max=meta.block_tables.shape[1] - 1).expand(num_seqs, -1)
        )
        key_slots = blocks * bs + kpos % bs
        # Absolute position of each padded query row; padding rows repeat the last real position.
        qidx = torch.arange(max_q, device=device)
        qpos = (seq_lens - query_lens)[:, None] + torch.minimum(qidx[None, :], (query_lens - 1)[:, None])
        visible = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < seq_lens[:, None, None])
        # Where each flattened token sits in the padded [B * max_q] layout.
        starts = meta.query_start_loc[:-1].long()
        seq_of_token = torch.repeat_interleave(
            torch.arange(num_seqs, device=device), query_lens, output_size=int(meta.slot_mapping.shape[0])
        )
        pad_index = seq_of_token * max_q + (
            torch.arange(seq_of_token.shape[0], device=device) - starts[seq_of_token]
        )
        meta.backend_state.clear()  # metadata objects may be reused across steps (decode graphs)
        meta.backend_state.update(
            key_slots=key_slots, qpos=qpos, kpos=kpos, visible=visible, pad_index=pad_index
        )

    def _mask(self, meta: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
        st = meta.backend_state
        if sliding_window is None:
            return st["visible"].unsqueeze(1)
        key = f"visible_sw{sliding_window}"
        if key not in st:
            st[key] = st["visible"] & (st["kpos"][None, None, :] > st["qpos"][:, :, None] - sliding_window)
        return st[key].unsqueeze(1)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        st = meta.backend_state
        num_seqs, max_q = meta.seq_lens.shape[0], meta.max_query_len
        _, num_heads, head_dim = q.shape
        kv_heads = k_cache.shape[-2]
        q_pad = q.new_zeros(num_seqs * max_q, num_heads, head_dim)
        q_pad.index_copy_(0, st["pad_index"], q)
        q_pad = q_pad.view(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)
        slots = st["key_slots"]
        k = dequantize_kv(k_cache.view(-1, kv_heads, head_dim)[slots], k_scale, q.dtype).transpose(1, 2)
        v = dequantize_kv(v_cache.view(-1, kv_heads, head_dim)[slots], v_scale, q.dtype).transpose(1, 2)
        mask = self._mask(meta, sliding_window)
        if softcap is None and sinks is None:
            out = F.scaled_dot_product_attention(
                q_pad, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != kv_heads
            )
        else:
            out = eager_attention(q_pad, k, v, mask, scale, softcap, sinks)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)
        return out.index_select(0, st["pad_index"])


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    cap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention as transformers' eager paths compute what SDPA cannot: scores through
    cap * tanh(s / cap) before the mask (Gemma 2), and a learned per-head sink logit [H] that joins
    every softmax's denominator and attends to nothing (gpt-oss). q [B, H, M, D], k/v [B, Hkv, N, D]."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs.to(q.dtype), v)


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend for `EngineConfig.attention_backend`.

    "auto" is the Triton kernels on CUDA (checked against the reference on the GPU by
    `bench/engine_throughput.py --check`) and the torch reference elsewhere; "triton" selects
    `TritonAttentionBackend` anywhere (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from kiln_engine.layers.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: torch, triton")


class Attention(nn.Module):
    """One layer's paged attention: stores new K/V in this layer's cache, then attends."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # [Hkv] float32 dequantization scales of an fp8 cache (set by the model runner), else None.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; `sinks` [Hq]: the heads' sink logits."""
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self.attend(q, meta, sinks)

    def attend(
        self, q: torch.Tensor, meta: AttentionMetadata, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention over the cache alone, for callers that already stored this step's K/V."""
        return self.backend.forward(
            q,
            self.k_cache,
            self.v_cache,
            meta,
            self.scale,
            self.sliding_window,
            self.k_scale,
            self.v_scale,
            softcap=self.softcap,
            sinks=sinks,
        )
