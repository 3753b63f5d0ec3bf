"""Paged flash attention in Triton: one kernel for decode, prefill chunks over a cached prefix, and mixes.

Each program handles one (sequence, KV head, tile of BLOCK_M rows), a row being one query token
under one of the query heads sharing that KV head (GQA), so K/V are read once per group. It walks
the sequence's keys in tiles of BLOCK_N positions, gathering each position's cache slot through
the block table (so any KV block size works), applies the causal / sliding-window mask by
absolute position, and keeps an online softmax in float32 (q·k and p·v run in the cache dtype on
tensor cores with fp32 accumulators). An fp8 cache is converted to the query's dtype as it is
loaded (exact), and its per-head scales fold into the softmax scale (K) and the output (V), so
dequantizing costs two multiplies per program. Only the visible key range is read: keys after the tile's
last query and before its window are skipped.

It runs on CUDA (the GPU path of issue 6) and, with TRITON_INTERPRET=1, on CPU, which is how the
unit tests check it against `TorchAttentionBackend`. Decode fills GROUP of the BLOCK_M rows; when
a decode batch has too few (sequence, KV head) programs to fill the GPU and long contexts, the key
range is split across programs (split-K) and the partial softmax states are merged afterwards.
Gemma 2's score soft-cap (softcap * tanh(s / softcap)) applies before the mask when given;
gpt-oss's per-head sink logits join the softmax denominator when the output is normalised (in the
split-K merge when the key range was split).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln_engine.layers import pdl
from kiln_engine.layers.attention import AttentionMetadata
from kiln_engine.layers.pdl import wait_then_release


@triton.jit
def _paged_attention_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    sinks_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    block_tables_ptr,
    query_start_ptr,
    seq_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    window,
    softcap,
    num_q_heads,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,
    KV_SCALED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_then_release(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # position of the first query token

    # Row r of the tile is query token r // GROUP under query head r % GROUP of this KV head, so a
    # KV tile is loaded once for all the query heads that share it (decode fills GROUP rows).
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = tok < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = ctx + tok
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )

    qk_scale = scale
    if KV_SCALED:  # per KV head: one scalar for this program
        qk_scale = scale * tl.load(k_scale_ptr + kv_head)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = ctx + tl.minimum(((tile + 1) * BLOCK_M - 1) // GROUP + 1, q_len)  # past the tile's last query
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, ctx + (tile * BLOCK_M) // GROUP - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    if SPLITS > 1:  # split-K: this program takes one contiguous share of the key range
        share = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * share
        hi = tl.minimum(hi, lo + share)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + offs_n // KV_BLOCK, mask=mask_n, other=0)
        slot = block.to(tl.int64) * stride_cb + (offs_n % KV_BLOCK) * stride_cs + kv_head * stride_ch
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + slot[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if USE_SOFTCAP:  # softcap * tanh(s / softcap), tanh written with exp (saturates at +-1)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if KV_SCALED:  # the output is linear in V: scale once, not every tile
        acc = acc * tl.load(v_scale_ptr + kv_head)

    if SPLITS == 1:
        if USE_SINKS:  # exp(sink - m) joins the denominator; the sink attends to nothing
            sink = tl.load(sinks_ptr + head, mask=mask_m, other=float("-inf")).to(tl.float32)
            l_i = l_i + tl.exp(sink - tl.where(m_i == float("-inf"), 0.0, m_i))
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )
    else:  # partial results [token, head, split], merged by `_merge_splits_kernel`
        part = ((q_start + tok) * num_q_heads + head) * SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=mask_m)
        tl.store(part_l_ptr + part, l_i, mask=mask_m)
        tl.store(
            part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
            acc,
            mask=mask_m[:, None] & mask_d[None, :],
        )


@triton.jit
def _merge_splits_kernel(  # type: ignore[no-untyped-def]
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    sinks_ptr,
    out_ptr,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    USE_SINKS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One (token, head): combine its SPLITS partial softmax states; one launch, not a dozen ops."""
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # token * num_heads + head
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    m = tl.load(part_m_ptr + row * SPLITS + s)
    denom = tl.load(part_l_ptr + row * SPLITS + s)
    acc = tl.load(part_acc_ptr + (row * SPLITS + s)[:, None] * BLOCK_D + d[None, :])
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)  # empty splits: m = -inf -> weight 0
    total = tl.sum(w * denom, axis=0)
    tok = row // num_heads
    head = row % num_heads
    if USE_SINKS:
        total += tl.exp(tl.load(sinks_ptr + head).to(tl.float32) - top)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.maximum(total, 1e-30)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )


class TritonAttentionBackend:
    """`AttentionBackend` running `_paged_attention_kernel`; no per-step preparation is needed."""

    name = "triton"

    def __init__(
        self,
        block_m: int = 16,
        block_n: int = 64,
        max_splits: int = 8,
        split_min_keys: int = 512,
        prefill_block_m: int | None = 64,
        prefill_block_n: int | None = 64,
    ) -> None:
        self.block_m = block_m  # decode: GROUP rows of a tile are used, so keep it small
        self.block_n = block_n
        self.max_splits = max_splits
        self.split_min_keys = split_min_keys
        # Prefill tiles hold BLOCK_M / GROUP query tokens: larger tiles keep the tensor cores fed.
        self.prefill_block_m = prefill_block_m or block_m
        self.prefill_block_n = prefill_block_n or block_n

    def num_splits(self, meta: AttentionMetadata, kv_heads: int) -> int:
        """Split-K only for decode batches too small to fill the GPU with (sequence, KV head) programs."""
        if meta.max_query_len != 1 or meta.seq_lens.shape[0] * kv_heads >= 256:
            return 1
        n = max(1, min(self.max_splits, meta.max_seq_len // self.split_min_keys))
        return 1 << (n.bit_length() - 1)  # a power of two: the merge kernel loads all splits at once

    def prepare(self, meta: AttentionMetadata) -> None:
        return None

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
        _, num_heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
        assert (k_scale is None) == (v_scale is None), "an fp8 cache has both scales"
        out = torch.empty_like(q)
        num_seqs = meta.seq_lens.shape[0]
        group = num_heads // kv_heads
        splits = self.num_splits(meta, kv_heads)
        block_d = triton.next_power_of_2(head_dim)
        decode = meta.max_query_len == 1
        block_m = self.block_m if decode else max(self.prefill_block_m, triton.next_power_of_2(group))
        block_n = self.block_n if decode else self.prefill_block_n
        tiles = triton.cdiv(meta.max_query_len * group, block_m)
        if splits > 1:
            num_tokens = q.shape[0]
            part_m = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty(
                num_tokens, num_heads, splits, block_d, dtype=torch.float32, device=q.device
            )
        else:
            part_m = part_l = part_acc = out  # unused
        _paged_attention_kernel[(num_seqs, kv_heads, tiles * splits)](
            q,
            k_cache,
            v_cache,
            out if k_scale is None else k_scale,  # unused when the cache is not scaled
            out if v_scale is None else v_scale,
            out if sinks is None else sinks,  # unused without sinks
            out,
            part_m,
            part_l,
            part_acc,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            meta.block_tables.stride(0),
            sliding_window or 0,
            softcap or 1.0,
            num_heads,
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            KV_BLOCK=meta.block_size,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            USE_WINDOW=sliding_window is not None,
            USE_SOFTCAP=softcap is not None,
            USE_SINKS=sinks is not None,
            # bf16/fp16 run on tensor cores with fp32 accumulation; fp32 stays exact (no tf32).
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            SPLITS=splits,
            KV_SCALED=k_scale is not None,
            num_warps=8 if block_m >= 128 else 4,
            **pdl.launch_args(q),
        )
        if splits > 1:
            _merge_splits_kernel[(q.shape[0] * num_heads,)](
                part_m,
                part_l,
                part_acc,
                out if sinks is None else sinks,
                out,
                num_heads,
                out.stride(0),
                out.stride(1),
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                SPLITS=splits,
                USE_SINKS=sinks is not None,
                num_warps=4,
                **pdl.launch_args(q),
            )
        return out
