"""Fused Triton kernels for the work between GEMMs: (add +) RMSNorm, SwiGLU, RoPE + KV store, fp8 quant.

Each replaces a chain of small torch ops with one pass over the data, which matters twice: in
prefill the chain moves the activations through memory several times, and in a decode step (a
CUDA graph of a few hundred kernels) every launch costs a few microseconds. The kernels round
where the torch reference rounds (bf16 after the add, after the normalization, after each product),
so the fast path computes the reference's function, not merely something close to it.

Layers use these only when the model runner turns `fused` on (the "triton" attention backend); the
torch code in each layer stays the reference. On CPU they run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln_engine.layers import pdl
from kiln_engine.layers.pdl import wait_then_release

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@triton.jit
def _rmsnorm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n,
    eps,
    HAS_RES: tl.constexpr,
    WEIGHT_IN_FP32: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    wait_then_release(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # the residual is kept in the model dtype
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n
    if WEIGHT_IN_FP32:  # Gemma: x / rms * w in float32, rounded once
        out = xf * tl.rsqrt(var + eps) * w.to(tl.float32)
    else:  # Llama: x / rms rounded to the model dtype before the weight
        y = (xf * tl.rsqrt(var + eps)).to(dtype)
        out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x [+ residual]) * weight, x [+ residual] or None), each in x's dtype.

    `weight_in_fp32`: Gemma's order (the weight multiplies the float32 normalized value), not
    Llama's (normalized value rounded to x's dtype first)."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, n) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2,
            res2,
            weight,
            out,
            res_out,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            res_out.stride(0),
            n,
            eps,
            HAS_RES=residual is not None,
            WEIGHT_IN_FP32=weight_in_fp32,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
            **pdl.launch_args(x2),
        )
    return out.view(shape), (res_out.view(shape) if residual is not None else None)


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr, GELU_TANH: tl.constexpr
):
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU_TANH:  # GeGLU (Gemma): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh from exp
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = (0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))).to(gate.dtype)
    else:
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(
        out_ptr + row * stride_o + offs, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask
    )


def silu_and_mul(x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (`gelu_tanh`: gelu, tanh approximation)."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            n,
            BLOCK=block,
            GELU_TANH=gelu_tanh,
            num_warps=4,
            **pdl.launch_args(x2),
        )
    return out.view(*x.shape[:-1], n)


@triton.jit
def _clamped_swiglu_kernel(  # type: ignore[no-untyped-def]
    x_ptr, out_ptr, stride_x, stride_o, n, limit, alpha, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    y = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def clamped_swiglu_and_mul(x: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's expert activation (`layers.moe.clamped_swiglu`) on x [M, 2n] (gate, then up) in one
    pass, in fp32, rounded once: the torch ops round after each of their eight steps."""
    n = x.shape[-1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    if x.shape[0]:
        _clamped_swiglu_kernel[(x.shape[0], triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, limit, alpha, BLOCK=block, num_warps=4
        )
    return out


@triton.jit
def _rope_store_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,  # per slot of the flattened [blocks * block_size, kv_heads, head_dim] cache
    stride_ch,
    stride_pos,  # cos_sin[1] - cos_sin[0]
    HQ: tl.constexpr,
    HK: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    KV_SCALED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_then_release(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)
    # The reference multiplies by cos/sin rounded to the model dtype; so do we.
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + d).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + stride_pos + pos * (2 * HALF) + d).to(dtype).to(tl.float32)

    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq < HQ)[:, None]
    qp = q_ptr + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    q1 = tl.load(qp, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=mq, other=0.0).to(tl.float32)
    a1 = (q1 * cos[None, :]).to(dtype).to(tl.float32)
    b1 = (q2 * sin[None, :]).to(dtype).to(tl.float32)
    a2 = (q2 * cos[None, :]).to(dtype).to(tl.float32)
    b2 = (q1 * sin[None, :]).to(dtype).to(tl.float32)
    tl.store(qp, (a1 - b1).to(dtype), mask=mq)
    tl.store(qp + HALF, (a2 + b2).to(dtype), mask=mq)

    hk = tl.arange(0, BLOCK_HK)
    mk = (hk < HK)[:, None]
    kp = k_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
    k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
    c1 = (k1 * cos[None, :]).to(dtype).to(tl.float32)
    e1 = (k2 * sin[None, :]).to(dtype).to(tl.float32)
    c2 = (k2 * cos[None, :]).to(dtype).to(tl.float32)
    e2 = (k1 * sin[None, :]).to(dtype).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cp = slot * stride_cs + hk[:, None] * stride_ch + d[None, :]
    cache_dtype = k_cache_ptr.dtype.element_ty
    k_lo = (c1 - e1).to(dtype)
    k_hi = (c2 + e2).to(dtype)
    vp = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
    v_lo = tl.load(vp, mask=mk, other=0.0)
    v_hi = tl.load(vp + HALF, mask=mk, other=0.0)
    if KV_SCALED:  # fp8: divide by the head's scale and saturate, as `quantize_kv` does
        ks = tl.load(k_scale_ptr + hk, mask=hk < HK, other=1.0)[:, None]
        vs = tl.load(v_scale_ptr + hk, mask=hk < HK, other=1.0)[:, None]
        k_lo = tl.clamp(k_lo.to(tl.float32) / ks, -448.0, 448.0)
        k_hi = tl.clamp(k_hi.to(tl.float32) / ks, -448.0, 448.0)
        v_lo = tl.clamp(v_lo.to(tl.float32) / vs, -448.0, 448.0)
        v_hi = tl.clamp(v_hi.to(tl.float32) / vs, -448.0, 448.0)
    tl.store(k_cache_ptr + cp, k_lo.to(cache_dtype), mask=mk)
    tl.store(k_cache_ptr + cp + HALF, k_hi.to(cache_dtype), mask=mk)
    tl.store(v_cache_ptr + cp, v_lo.to(cache_dtype), mask=mk)
    tl.store(v_cache_ptr + cp + HALF, v_hi.to(cache_dtype), mask=mk)


def rope_and_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q in place ([T, Hq, D], any token/head strides) and write rotated k and v into the cache.

    `cos_sin` is RotaryEmbedding's float32 [2, max_positions, D] table (D = 2 * half, rotate-half
    layout). An fp8 cache comes with per-head float32 scales [Hkv] (`attention.quantize_kv`).
    Returns q.
    """
    assert (k_scale is None) == (v_scale is None), "an fp8 cache has both scales"
    num_tokens, hq, head_dim = q.shape
    hk = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and cos_sin.is_contiguous()
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride() == v_cache.stride()
    if num_tokens:
        _rope_store_kernel[(num_tokens,)](
            q,
            k,
            v,
            positions,
            cos_sin,
            k_cache,
            v_cache,
            q if k_scale is None else k_scale,  # unused when the cache is not scaled
            q if v_scale is None else v_scale,
            slot_mapping,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(1),
            k_cache.stride(2),
            cos_sin.stride(0),
            HQ=hq,
            HK=hk,
            BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HK=triton.next_power_of_2(hk),
            HALF=head_dim // 2,
            KV_SCALED=k_scale is not None,
            num_warps=4,
            **pdl.launch_args(q),
        )
    return q


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]) with x ~= q * scale row-wise."""
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    if m:
        _quant_fp8_kernel[(m,)](
            x, q, scale, x.stride(0), q.stride(0), n, BLOCK=block, num_warps=min(16, max(1, block // 512))
        )
    return q, scale
