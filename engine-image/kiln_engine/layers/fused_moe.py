"""The fused mixture-of-experts path on GPU: tokens sorted by expert, one grouped GEMM per projection.

`align_by_expert` lays the (token, k) pairs out expert by expert, each expert's run padded to the
GEMM's row block, so every program of `_moe_gemm_kernel` multiplies one row block of one expert's
tokens by a tile of that expert's weight. Gate/up is one GEMM ([pairs, 2I]), SwiGLU is the fused
kernel of `layers.fused`, down is a second GEMM that also multiplies each row by its routing weight;
the k rows of a token are then summed. Everything stays on the device with static shapes (no host
sync), so a decode step with experts is captured in a CUDA graph like any other.

fp8/int8 expert weights are converted to the activations' dtype in registers and their
per-output-channel scales applied to the accumulator: a weight-only path that halves the bytes a
decode step streams. On GPUs with fp8 tensor cores (`w8a8`) fp8 experts multiply fp8 activations
instead (each GEMM's input rows quantized per row, as the dense fp8 layers' `torch._scaled_mm` and
TensorRT-LLM's FP8 do), both scales applied to the accumulator: faster at 1 and at 4,096 tokens.
MXFP4 experts (gpt-oss), a quarter of bf16's bytes, go through Triton's
microscaling dot (`tl.dot_scaled`) with bf16 activations; with float16 or float32 ones (CPU tests,
fp16 engines) they are decoded here: each byte's two e2m1 codes become values times two to the power
of their group's exponent, built directly as float bits (integer operations only).
On CPU the kernels run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kiln_engine.layers.fused import clamped_swiglu_and_mul, quant_fp8_per_token, silu_and_mul
from kiln_engine.layers.moe import ClampedSwiGLU


@triton.jit
def _e2m1_bits(code, shift):  # type: ignore[no-untyped-def]
    """4-bit codes (sign, two exponent bits, one mantissa bit) times 2**shift, built as the bits of
    float32 values: e2m1's magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 are 0 and 2**e * (1 + m / 2), so the
    group's exponent adds to the exponent field, with no float arithmetic. Results below the normal
    range (shifts under -125, never seen in checkpoints) flush to zero."""
    magnitude = code & 7
    exponent = tl.where(magnitude >= 2, (magnitude >> 1) + 126, 126) + shift  # 0.5 = 2**-1: 126
    mantissa = tl.where(magnitude >= 2, magnitude & 1, 0)
    zero = (magnitude == 0) | (exponent <= 0)
    bits = ((code & 8) << 28) | (exponent << 23) | (mantissa << 22)
    return tl.where(zero, 0, bits).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_tile(b_ptrs, s_ptrs, b_mask, s_mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """A [BLOCK_K, BLOCK_N] float32 weight tile from [BLOCK_N, BLOCK_K/2] bytes and their exponents
    [BLOCK_N, BLOCK_K/32]; masked-out bytes (rows past N, inputs past K) are zeros."""
    packed = tl.load(b_ptrs, mask=b_mask, other=0).to(tl.int32)
    exponents = tl.load(s_ptrs, mask=s_mask, other=127).to(tl.int32) - 127
    shift = tl.reshape(
        tl.broadcast_to(exponents[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)), (BLOCK_N, BLOCK_K // 2)
    )
    low, high = _e2m1_bits(packed & 15, shift), _e2m1_bits(packed >> 4, shift)
    return tl.trans(tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)))


@triton.jit
def _moe_gemm_kernel(  # type: ignore[no-untyped-def]
    a_ptr,
    b_ptr,
    c_ptr,
    scale_ptr,
    a_scale_ptr,
    bias_ptr,
    weight_ptr,
    sorted_ptr,
    block_expert_ptr,
    total_ptr,
    N,
    K,
    num_pairs,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_se,
    stride_sn,
    stride_bias,
    TOKEN_DIV: tl.constexpr,  # rows of `a` per pair index: top_k for the first GEMM, 1 for the second
    MUL_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    A_SCALED: tl.constexpr,  # fp8 activations (rows of `a` quantized per row, scales at a_scale_ptr)
    HAS_BIAS: tl.constexpr,  # a bias per expert and output channel [E, N] (gpt-oss's gate/up)
    MXFP4: tl.constexpr,  # b: [E, N, K/2] bytes, scale: [E, N, K/32] exponents
    SCALED_DOT: tl.constexpr,  # MXFP4 with bf16 activations: through tl.dot_scaled
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return  # a padding block past the last expert's run
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return  # pairs of another rank's expert (expert parallel)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m).to(tl.int64)
    valid = pair < num_pairs
    row = tl.where(valid, pair // TOKEN_DIV, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MXFP4:
        offs_byte = tl.arange(0, BLOCK_K // 2)
        offs_group = tl.arange(0, BLOCK_K // 32)
        s_ptrs = scale_ptr + expert * stride_se + offs_n[:, None] * stride_sn + offs_group[None, :]
        if SCALED_DOT:
            # Triton's microscaling dot (bf16 activations): e2m1 pairs packed along K with the first
            # input in the low nibble, as in the checkpoint, one e8m0 exponent per 32 inputs; Hopper
            # upcasts them to bf16 in the compiler's own layout. Bytes load as [BLOCK_K / 2, BLOCK_N]
            # (transposed by addressing, as the other weights are), exponents as [BLOCK_N, BLOCK_K / 32].
            b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_byte[:, None]
        else:  # float16 or float32 activations: decoded here, to their precision
            b_ptrs = b_ptr + expert * stride_be + offs_n[:, None] * stride_bn + offs_byte[None, :]
        for k0 in range(0, K, BLOCK_K):
            k_mask = (offs_k + k0) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            byte_ok = (offs_byte + k0 // 2) < K // 2
            group_mask = n_mask[:, None] & ((offs_group + k0 // 32) < K // 32)[None, :]
            if SCALED_DOT:
                b = tl.load(b_ptrs, mask=byte_ok[:, None] & n_mask[None, :], other=0)
                exponents = tl.load(s_ptrs, mask=group_mask, other=127)
                acc = tl.dot_scaled(a, None, "bf16", b, exponents, "e2m1", acc)
            else:
                b = _mxfp4_tile(
                    b_ptrs, s_ptrs, n_mask[:, None] & byte_ok[None, :], group_mask, BLOCK_N, BLOCK_K
                )
                acc = tl.dot(a, b.to(a.dtype), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K // 2
            s_ptrs += BLOCK_K // 32
    else:
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
        for k0 in range(0, K, BLOCK_K):
            k_mask = (offs_k + k0) < K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc)  # fp8 by fp8 on fp8 tensor cores where both are
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    if A_SCALED:
        acc = acc * tl.load(a_scale_ptr + row, mask=valid, other=0.0)[:, None]
    if HAS_SCALE and not MXFP4:
        acc = acc * tl.load(scale_ptr + expert * stride_se + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_bias + offs_n, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def align_by_expert(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [P], expert of each row block [P / block_m], used rows [1]) for ids [T, k].

    Pair p = t * k + j. Each expert's pairs are contiguous, in pair order, padded with the id
    T * k up to a multiple of `block_m`; P is the worst case, so shapes depend only on T. Pairs
    with id -1 (another rank's expert) go last, past the used rows, where no program reads them.
    """
    flat = ids.reshape(-1).to(torch.int64)
    flat = torch.where(flat < 0, num_experts, flat)
    n = flat.numel()
    size = triton.cdiv(n + (num_experts + 1) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    first = torch.cumsum(counts, 0) - counts  # index in `order` of each expert's first pair
    dest = (ends - padded)[expert] + torch.arange(n, device=ids.device) - first[expert]
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=ids.device)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(0, size, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[-2:-1]


def one_block_per_pair(ids: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_by_expert`'s layout with each pair alone in its row block: no sort, four small ops.

    For decode at batch 1 (or a few tokens among many experts) the pairs hit distinct experts, so
    this reads each weight once like the sorted layout, without the sort's dozen kernel launches,
    which otherwise cost more than streaming the experts' weights. A pair with id -1 (another
    rank's expert) keeps -1 as its block's expert, which the kernel skips."""
    flat = ids.reshape(-1)
    n = flat.numel()
    sorted_ids = torch.full((n, block_m), n, dtype=torch.int32, device=ids.device)
    sorted_ids[:, 0] = torch.arange(n, dtype=torch.int32, device=ids.device)
    total = torch.full((1,), n * block_m, dtype=torch.int64, device=ids.device)
    return sorted_ids.view(-1), flat.to(torch.int32), total


Tile = tuple[int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)


def _tiles(rows_per_expert: float, fp8: bool) -> tuple[Tile, Tile]:
    """(gate/up tile, down tile), sharing the row block the layout is padded to.

    From `bench/moe_tune.py` on an H100 (Qwen3-30B-A3B and Mixtral-8x7B shapes, bf16 and fp8;
    `bench/results-committed/moe_tune-h100-run1-*.json`): decode, where experts see a few rows,
    streams weights through long K tiles; prefill fills 128-row blocks and is compute bound, with
    wider N tiles for bf16 weights (fp8 ones are widened in registers, which wants narrower tiles).
    """
    if rows_per_expert <= 8:
        return (16, 64, 256, 4, 3), (16, 32, 128, 4, 3)
    if rows_per_expert <= 32:
        return (32, 128, 128, 4, 3), (32, 64, 128, 4, 4)
    if rows_per_expert <= 96:
        return (64, 128, 64, 4, 4), (64, 128, 64, 4, 4)
    wide = 128 if fp8 else 256
    return (128, wide, 64, 8, 3), (128, wide, 64, 8, 3)


def expert_tiles(rows_per_expert: float, weight_dtype: torch.dtype) -> tuple[Tile, Tile]:
    """(gate/up tile, down tile) for experts stored as `weight_dtype` (uint8: packed MXFP4)."""
    if weight_dtype == torch.uint8:
        return _mxfp4_tiles(rows_per_expert)
    return _tiles(rows_per_expert, weight_dtype.itemsize == 1)


def _mxfp4_tiles(rows_per_expert: float) -> tuple[Tile, Tile]:
    """`_tiles` for MXFP4 experts (K tiles of whole 32-input groups). From the same sweep on an H100
    at the gpt-oss-20b shape (`moe_tune-h100-run3-mxfp4.json`): 1.21-1.34x over the fp8 tiles used
    before at 1, 64, 1,024 and 4,096 tokens. At decode sizes a K tile of 128 beat 256 for gate/up
    and an N tile of 64 beat 32 for down; at prefill sizes 4 warps beat 8. Between 8 and 96 rows per
    expert nothing was swept, so the fp8 tiles stay there."""
    if rows_per_expert <= 8:
        return (16, 64, 128, 4, 3), (16, 64, 128, 4, 3)
    if rows_per_expert <= 96:
        up, down = _tiles(rows_per_expert, fp8=True)
        return _at_least_k(up, 32), _at_least_k(down, 32)
    if rows_per_expert <= 256:
        return (128, 64, 64, 4, 3), (128, 64, 64, 4, 3)
    return (128, 128, 64, 4, 4), (128, 128, 64, 4, 4)


def _at_least_k(tile: Tile, k: int) -> Tile:
    bm, bn, bk, warps, stages = tile
    return bm, bn, max(bk, k), warps, stages


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor | None,
    weights: torch.Tensor | None,
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    token_div: int,
    blocks: Tile,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    sorted_ids, block_expert, total = layout
    bm, bn, bk, warps, stages = blocks
    mxfp4 = b.dtype == torch.uint8
    n, k = b.shape[1], b.shape[2] * (2 if mxfp4 else 1)
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and out.stride(-1) == 1
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    _moe_gemm_kernel[grid](
        a,
        b,
        out,
        scale if scale is not None else b,
        a_scale if a_scale is not None else a,
        bias if bias is not None else a,
        weights if weights is not None else a,
        sorted_ids,
        block_expert,
        total,
        n,
        k,
        out.shape[0],
        a.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        scale.stride(0) if scale is not None else 0,
        scale.stride(1) if scale is not None and scale.dim() == 3 else 0,
        bias.stride(0) if bias is not None else 0,
        TOKEN_DIV=token_div,
        MUL_WEIGHT=weights is not None,
        HAS_SCALE=scale is not None,
        A_SCALED=a_scale is not None,
        HAS_BIAS=bias is not None,
        MXFP4=mxfp4,
        SCALED_DOT=mxfp4 and a.dtype == torch.bfloat16,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )


def fused_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    foreign_pairs: bool = False,
    fp8_activations: bool | None = None,
) -> torch.Tensor:
    """The function of `layers.moe.experts_reference`: x [T, H], weights/ids [T, k] -> [T, H].

    A gate/up bias (gpt-oss) is added in the first GEMM's epilogue, gpt-oss's clamped SwiGLU
    (`ClampedSwiGLU`) has a kernel like SwiGLU's, and any other activation runs as torch ops there:
    static shapes, so graphs still capture it.
    `foreign_pairs`: ids may hold -1 (expert parallel: another rank's expert); their rows, which no
    GEMM writes, are zeros in the sum. `fp8_activations` (fp8 weights only; None: as `w8a8` says)
    quantizes each GEMM's input rows to fp8 too, as `experts_reference(..., fp8_activations=True)`."""
    tokens, hidden = x.shape
    top_k = ids.shape[1]
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    rows_per_expert = tokens * top_k / num_experts
    if fp8_activations is None:
        fp8_activations = w8a8(x, w13)
    # fp8 by fp8 widens nothing in registers: the tiles of 16-bit weights
    up_tile, down_tile = expert_tiles(rows_per_expert, x.dtype if fp8_activations else w13.dtype)
    if tokens * top_k * 4 <= num_experts:  # few pairs among many experts: they rarely share one
        layout = one_block_per_pair(ids, up_tile[0])
    else:
        layout = align_by_expert(ids, num_experts, up_tile[0])
    up = torch.empty(tokens * top_k, two_inter, dtype=x.dtype, device=x.device)
    a, a_scale = quant_fp8_per_token(x) if fp8_activations else (x, None)
    _gemm(a, w13, up, w13_scale, None, layout, top_k, up_tile, a_scale, w13_bias)
    if activation is None:
        act = silu_and_mul(up)
    elif isinstance(activation, ClampedSwiGLU):
        act = clamped_swiglu_and_mul(up, activation.limit, activation.alpha)
    else:
        act = activation(up)
    empty = torch.zeros if foreign_pairs else torch.empty
    down = empty(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    a, a_scale = quant_fp8_per_token(act) if fp8_activations else (act, None)
    _gemm(a, w2, down, w2_scale, weights.reshape(-1).contiguous(), layout, 1, down_tile, a_scale)
    return down.view(tokens, top_k, hidden).sum(dim=1)


def w8a8(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """Whether fp8 experts multiply fp8 activations: 16-bit activations on a GPU with fp8 tensor
    cores (sm89+), at every batch size. On an H100 (bench/results-committed/
    moe-gptoss-h100-run6-w8a8-1k-x1024.log, moe-mixtral-h100-run6-w8a8-x3072.log) one layer took
    67 against weight-only's 70 us at 1 token and 1.68 against 2.48 ms at 4,096 at the gpt-oss-20b
    shape, 166 against 187 us and 3.95 against 6.95 ms at Mixtral-8x7B's: the two quantization kernels
    cost less than widening the weights in registers, even where a step streams the weights."""
    return (
        w13.dtype == torch.float8_e4m3fn
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
    )
