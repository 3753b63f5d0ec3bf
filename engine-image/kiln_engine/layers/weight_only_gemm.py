"""Weight-only quantized matrix products (W4A16 and W8A16) read straight from the stored weights.

The torch references build a dense copy of the weight every forward (`quantization.unpack_awq` /
`unpack_gptq` for int4, `weight.to(dtype)` for int8): the weight's bytes written and read again in
16 bits before the GEMM starts. Here each program loads its tile of the stored weight, converts it
in registers (int4: takes the nibbles out, subtracts the zero point, multiplies by the scale of each
input row's group) and feeds the tile to `tl.dot`; nothing dense reaches memory. Int4 layouts
(quantization.py says where they come from):

* AWQ: qweight [K, N/8], column n of a word in nibble AWQ_REVERSE_ORDER[n % 8]; qzeros [K/G, N/8]
  the same way; scales [K/G, N]; input row k is in group k // G.
* GPTQ (v1): qweight [K/8, N], input row k in nibble k % 8 of word k // 8; qzeros [K/G, N/8] in
  plain nibble order, stored minus one; scales [K/G, N]; input row k's group is g_idx[k] (act-order
  checkpoints permute it).

Int4 tiles: the packed words are loaded once and spread over the columns (AWQ) or rows (GPTQ) they
hold with `tl.interleave`; where groups follow the input rows (AWQ, GPTQ without act-order) one row
of zeros and scales serves each K tile. Batches of up to 64 rows also split K across programs
(`split_k`), so that a decode step has enough programs to stream the weight; the parts' fp32 sums
are added in a fixed order after. (A one-row GEMV kernel without tl.dot was tried and removed: on an
H100 it was slower than this kernel for AWQ at all four Llama-3-8B shapes and for GPTQ at two,
`bench/results-committed/weight-only-gemm-h100-run4-gemv-vs-dot.json`.) On CUDA the tile shape is
autotuned per shape and row bucket on first use (the model runner's warm-up, before any graph capture).

Int8: weight [N, K] with one float32 scale per output channel, applied to the fp32 sums. Batches of
up to 16 rows stream the int8 weight through `layers/gemv.py` instead; this kernel serves larger ones.

Runs on CUDA, and with TRITON_INTERPRET=1 on CPU, which is how the tests check it against the
references. The model runner turns it on with the other Triton fast paths (`LinearBase.fused`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_gemm_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # only the autotuner's key and pruning read it
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    stride_os,
    stride_om,
    GROUP: tl.constexpr,
    GPTQ: tl.constexpr,
    ORDERED: tl.constexpr,  # input row k is in group k // GROUP, and no tile crosses a group
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # words packed along N
    in_m, in_n, in_w = rm < M, rn < N, rw < N // 8
    if GPTQ:  # noqa: SIM108 (Triton folds a constexpr if; a conditional expression it may not)
        n_shift = (rn % 8) * 4
    else:  # AWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7 into nibbles 0..7
        n_shift = ((rn % 8) // 2 + (rn % 2) * 4) * 4
    # Decode-sized batches split K across programs too, so that enough of them stream the weight.
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(2) * span
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + span, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0
        )
        if GPTQ:  # words [BLOCK_K / 8, BLOCK_N], eight input rows each
            rkw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(
                qweight_ptr + rkw[:, None] * stride_qw + rn[None, :],
                mask=(rkw < K // 8)[:, None] & in_n[None, :],
                other=0,
            )
            q = tl.trans((_spread8(tl.trans(words)) >> ((rk % 8) * 4)[None, :]) & 0xF)
        else:  # words [BLOCK_K, BLOCK_N / 8], eight output columns each
            words_at = qweight_ptr + rk[:, None] * stride_qw + rw[None, :]
            words = tl.load(words_at, mask=in_k[:, None] & in_w[None, :], other=0)
            q = (_spread8(words) >> n_shift[None, :]) & 0xF
        if ORDERED:  # one row of zeros and scales serves the whole tile
            group = k0 // GROUP
            zeros = _spread8(tl.load(qzeros_ptr + group * stride_qz + rw, mask=in_w, other=0))[None, :]
            s = tl.load(scales_ptr + group * stride_s + rn, mask=in_n, other=0.0)[None, :]
        else:  # act-order GPTQ: each input row names its group
            groups = tl.load(g_idx_ptr + rk, mask=in_k, other=0)
            tile = in_k[:, None] & in_n[None, :]
            zeros = tl.load(qzeros_ptr + groups[:, None] * stride_qz + (rn // 8)[None, :], mask=tile, other=0)
            s = tl.load(scales_ptr + groups[:, None] * stride_s + rn[None, :], mask=tile, other=0.0)
        z = (zeros >> n_shift[None, :]) & 0xF
        if GPTQ:
            z = z + 1
        # (q - z) is exact in any float type; one rounding at the product, as the reference's.
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(s.dtype).to(x.dtype)
        acc = tl.dot(x, w, acc)
    if HAS_BIAS:  # only without a split: the split's partial sums get it after their sum
        acc += tl.load(bias_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + tl.program_id(2) * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _spread8(words):  # type: ignore[no-untyped-def]
    """Each packed word eight times along the last axis, [..., W] -> [..., 8 W]: the tile lines up
    with the unpacked columns (or, transposed, rows), and the shifts pick each one's nibble."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    return tl.interleave(words, words)


def _int4_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


_INT4_CONFIGS = [
    _int4_config(*c)
    for c in [
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 256, 64, 8, 3),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 256, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),
    ]
]


def _prune_int4(
    configs: list[triton.Config], named_args: dict[str, object], **constexprs: object
) -> list[triton.Config]:
    """Row tiles no taller than twice the batch; with ordered groups no K tile crossing a group."""
    given = {**named_args, **constexprs}  # Triton passes the launch's keyword arguments apart
    rows = int(given["M_BUCKET"])  # type: ignore[call-overload]
    group = int(given["GROUP"])  # type: ignore[call-overload]
    ordered = bool(given["ORDERED"])
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, 2 * rows) and (not ordered or group % c.kwargs["BLOCK_K"] == 0)
    ]
    return kept or [_int4_config(16, 64, 16, 4, 2)]


_tuned_int4 = triton.autotune(
    configs=_INT4_CONFIGS,
    key=["N", "K", "M_BUCKET", "GROUP", "GPTQ", "ORDERED", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_int4},
)(_int4_gemm_kernel)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    gptq: bool = False,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T with W stored int4 in GPTQ's layout or AWQ's; `g_idx`: GPTQ's act-order
    groups, None where input row k is in group k // G. Returns [..., N] in x's dtype."""
    n = scales.shape[1]
    k = qweight.shape[0] * 8 if gptq else qweight.shape[0]
    group = k // qzeros.shape[0]
    x2, out = _flat(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    ordered = g_idx is None and group % 16 == 0
    if g_idx is None and not ordered:
        g_idx = (torch.arange(k, device=x.device) // group).to(torch.int32)
    split = split_k(m, n, k)
    partial = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    unread = qweight  # stands for g_idx when the groups are ordered, for the bias when there is none
    args = (x2, qweight, qzeros, scales, unread if g_idx is None else g_idx, unread if bias is None else bias)
    dims = (m, n, k, _row_bucket(m), x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0))
    strides = (partial.stride(0) if split > 1 else 0, partial.stride(-2))
    flags = {"GROUP": group, "GPTQ": gptq, "ORDERED": ordered, "HAS_BIAS": bias is not None and split == 1}
    if x.is_cuda:
        tuned_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        _tuned_int4[tuned_grid](*args, partial, *dims, *strides, **flags, SPLIT_K=split)
    else:  # Triton's interpreter: one fixed tile shape
        block_m, block_n, _ = _blocks(m)
        block_k = min(32, group & -group) if ordered else 32  # a power of two that divides the group
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
        _int4_gemm_kernel[grid](*args, partial, *dims, *strides, **flags, SPLIT_K=split,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)  # fmt: skip
    if split > 1:
        _sum_parts(partial, bias, out)
    return out.reshape(*x.shape[:-1], n)


def _sum_parts(partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] = the split-K parts [SPLIT, M, N] summed in order, plus the bias."""
    size, block = out.numel(), 1024
    _sum_parts_kernel[(triton.cdiv(size, block),)](
        partial, partial if bias is None else bias, out, size, out.shape[-1],
        PARTS=partial.shape[0], HAS_BIAS=bias is not None, BLOCK=block,
    )  # fmt: skip


@triton.jit
def _sum_parts_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    partial_ptr, bias_ptr, out_ptr, SIZE, N, PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """out = the split-K parts' fp32 sums [PARTS, M, N] added in part order (+ bias), in out's dtype:
    one launch where torch took a sum, an add and a cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for part in tl.static_range(PARTS):
        acc += tl.load(partial_ptr + part * SIZE + offs, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def split_k(rows: int, n: int, k: int) -> int:
    """Programs per output tile along K: 1 above 64 rows (the row tiles give enough programs);
    below, doubled while 128-wide column tiles number fewer than 256 programs and each part keeps
    256 input rows at least. Each part writes fp32 partial sums, added in a fixed order after, so a
    result does not depend on which program finishes first."""
    split = 1
    tiles = -(-n // 128)
    while rows <= 64 and tiles * split < 256 and k // (2 * split) >= 256:
        split *= 2
    return split


def _row_bucket(rows: int) -> int:
    """The autotuner's row key: powers of two up to 256, then one bucket."""
    return min(256, 1 << (rows - 1).bit_length())


@triton.jit
def _int8_gemm_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=in_k[:, None] & in_n[None, :], other=0
        )
        acc += tl.dot(x, w.to(x.dtype))  # int8 values are exact in 16-bit floats
    acc *= tl.load(scale_ptr + rn, mask=in_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])  # fmt: skip


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] int8 * scale [N])^T (+ bias); [..., N] in x's dtype."""
    n, k = weight.shape
    x2, out = _flat(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    block_m, block_n, block_k = _blocks(m)
    _int8_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x2,
        weight,
        scale,
        bias if bias is not None else scale,  # unread without a bias
        out,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out.reshape(*x.shape[:-1], n)


def _flat(x: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as [rows, K] with unit stride along K, and the [rows, N] output to fill."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)


def _blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): row tiles no taller than the batch needs (tl.dot takes 16 at least)."""
    return (16 if m <= 16 else 32 if m <= 32 else 64), 64, 32
