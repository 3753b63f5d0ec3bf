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
    stride_xm,
    stride_qw,
    stride_qz,
    stride_s,
    stride_om,
    GROUP: tl.constexpr,
    GPTQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = rm < M, rn < N
    if GPTQ:  # noqa: SIM108 (Triton folds a constexpr if; a conditional expression it may not)
        zero_shift = (rn % 8) * 4
    else:  # AWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7 into nibbles 0..7
        zero_shift = ((rn % 8) // 2 + (rn % 2) * 4) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0
        )
        tile = in_k[:, None] & in_n[None, :]
        if GPTQ:
            words = tl.load(qweight_ptr + (rk // 8)[:, None] * stride_qw + rn[None, :], mask=tile, other=0)
            q = (words >> ((rk % 8) * 4)[:, None]) & 0xF
            group = tl.load(g_idx_ptr + rk, mask=in_k, other=0)
        else:
            words = tl.load(qweight_ptr + rk[:, None] * stride_qw + (rn // 8)[None, :], mask=tile, other=0)
            q = (words >> zero_shift[None, :]) & 0xF
            group = rk // GROUP
        zeros = tl.load(qzeros_ptr + group[:, None] * stride_qz + (rn // 8)[None, :], mask=tile, other=0)
        z = (zeros >> zero_shift[None, :]) & 0xF
        if GPTQ:
            z = z + 1
        s = tl.load(scales_ptr + group[:, None] * stride_s + rn[None, :], mask=tile, other=0.0)
        # (q - z) is exact in any float type; one rounding at the product, as the reference's.
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(s.dtype).to(x.dtype)
        acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])  # fmt: skip


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T with W stored int4: GPTQ's layout when `g_idx` is given, AWQ's otherwise.
    Returns [..., N] in x's dtype."""
    gptq = g_idx is not None
    n = scales.shape[1]
    k = qweight.shape[0] * 8 if gptq else qweight.shape[0]
    x2, out = _flat(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](
        x2,
        qweight,
        qzeros,
        scales,
        g_idx if g_idx is not None else qweight,  # unread without GPTQ
        bias if bias is not None else scales,  # unread without a bias
        out,
        m,
        n,
        k,
        x2.stride(0),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        out.stride(0),
        GROUP=k // qzeros.shape[0],
        GPTQ=gptq,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out.reshape(*x.shape[:-1], n)


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
