"""Batched LoRA for decode graphs (Punica's BGMV, in Triton): each token's delta through its own
adapter slot only, in two kernels per projection, with base-model tokens costing nothing.

The masked form (every token through every slot's A and B, masked to its own) is three library
kernels per projection whose cost grows with the number of slots; on an H100 it took a batch of 64
mixed over 8 adapters to 0.67x the base model, and LoRA slots with no adapter in the batch to 0.79x
(bench/results-committed/lora-h100.json). Here:

* shrink: h[t] = x[t] @ A[slot(t)]^T, one program per (token, share of the input channels), reading
  only its slot's A rows (a base-model token's programs loop zero times); the shares' partial sums
  go to separate rows, so the result does not depend on the order programs finish;
* expand: out[t] += h[t] @ B[:, slot(t)]^T, one program per (token, block of output channels): it
  sums the token's partial h, rounds it as the eager path does, and applies its slot's B tile
  (tokens of one slot read the same tiles, which stay in L2). The first version had one program per
  (slot, block) walking all tokens in turn; that serial walk made it slower than the masked form on
  an H100 (bench/results-committed/lora-h100-run2-kernels.json).

Slots are int32 per token, -1 for the base model (and for a graph's padding rows). A is
[slots * k, in], B is [out, slots * k], as `LoraLinear` stacks them.

Numerics: the kernels sum in fp32 in another order than cuBLAS does, so their outputs agree with the
eager path's to bf16 rounding, not bit for bit (the masked form, on cuBLAS, did agree bit for bit).
On random weights at batch 64 that was enough to change 54 of 64 greedy sequences over 32 tokens
(bench/results-committed/lora-h100-run3-per-token-expand.json): each 1-ulp difference can flip a
near-tie among random logits, and every later token follows. They serve small graphs only
(KERNELS_UP_TO_TOKENS), where they are faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The shrink splits a token's input channels into shares of at least SHARE_MIN_WIDTH, at most
# MAX_SHARES of them: one program per token would leave most of a GPU idle on a batch of 64 and
# walk a 14,336-wide down projection serially.
SHARE_MIN_WIDTH = 512
MAX_SHARES = 16

# Decode graphs of up to this many rows use the kernels, larger ones the masked form. On an H100,
# per Llama-3-8B layer, the kernels took 0.12-0.77x the masked form's time at 1 and 16 tokens (8 and
# 32 slots; bench/results-committed/lora_kernels-h100-run1.json), 0.54-0.97x at 24 and 32 tokens,
# but 1.07x at 48 and 1.23x at 64 tokens on 8 slots (lora_kernels-h100-run2-gap.json), 1.7-2.9x at
# 256: the masked form's two GEMMs grow slowly with tokens, while every token re-reads its slot's B.
KERNELS_UP_TO_TOKENS = 32


@triton.jit
def _shrink_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    a_ptr,
    slot_ptr,
    h_ptr,
    IN,
    K,
    CHUNK,  # input channels per share, a multiple of BLOCK_IN
    stride_x,
    stride_a,
    stride_h_split,
    stride_h,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    t = tl.program_id(0)
    share = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    offs_k = tl.arange(0, BLOCK_K)
    rows = slot * K + offs_k
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    start = share * CHUNK
    end = tl.where(slot >= 0, tl.minimum(start + CHUNK, IN), start)  # a base-model token reads nothing
    for i in range(start, end, BLOCK_IN):
        offs_i = i + tl.arange(0, BLOCK_IN)
        in_mask = offs_i < IN
        x = tl.load(x_ptr + t * stride_x + offs_i, mask=in_mask, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + offs_i[None, :],
            mask=(offs_k < K)[:, None] & in_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + share * stride_h_split + t * stride_h + offs_k, acc, mask=offs_k < K)


@triton.jit
def _expand_kernel(  # type: ignore[no-untyped-def]
    h_ptr,
    b_ptr,
    slot_ptr,
    out_ptr,
    N,
    K,
    SHARES,
    stride_h_split,
    stride_h,
    stride_b,
    stride_out,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # a base-model (or padding) token's programs end here
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        h = tl.zeros([BLOCK_K], dtype=tl.float32)
        for share in range(0, SHARES):
            h += tl.load(h_ptr + share * stride_h_split + t * stride_h + offs_k, mask=k_mask, other=0.0)
        # Rounded to the activations' dtype as the eager path's x @ A is, so that a token's output
        # does not depend on whether its step ran eager or in a graph.
        h = h.to(out_ptr.dtype.element_ty).to(tl.float32)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_b + (slot * K + offs_k)[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        delta = tl.sum(b * h[None, :], axis=1)
        ptrs = out_ptr + t * stride_out + offs_n
        y = tl.load(ptrs, mask=n_mask, other=0.0).to(tl.float32) + delta
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def add_lora_delta(
    x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, k: int
) -> torch.Tensor:
    """`out` [T, N] += each token's LoRA delta of `x` [T, IN] through its slot (`slots` [T] int32,
    -1: none), in place. `a` [S * k, IN] and `b` [N, S * k] hold S slots of width k."""
    return lora_expand(lora_shrink(x, a, slots, k), out, b, slots, k)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, k: int) -> torch.Tensor:
    """The kernels' first half: each token's x @ A[slot]^T, as fp32 partial sums [shares, T, k]."""
    tokens, width = x.shape
    block_in = 128
    shares = max(1, min(MAX_SHARES, width // SHARE_MIN_WIDTH))
    chunk = triton.cdiv(triton.cdiv(width, shares), block_in) * block_in
    shares = triton.cdiv(width, chunk)
    h = torch.empty(shares, tokens, k, dtype=torch.float32, device=x.device)
    _shrink_kernel[(tokens, shares)](
        x, a, slots, h, width, k, chunk, x.stride(0), a.stride(0), h.stride(0), h.stride(1),
        BLOCK_K=_block_k(k), BLOCK_IN=block_in,
    )  # fmt: skip
    return h


def lora_expand(
    h: torch.Tensor, out: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, k: int
) -> torch.Tensor:
    """The kernels' second half: `out` += each token's summed `h` (from `lora_shrink`) @ B[slot]^T."""
    tokens, n = out.shape
    block_n = 128
    _expand_kernel[(tokens, triton.cdiv(n, block_n))](
        h, b, slots, out, n, k, h.shape[0], h.stride(0), h.stride(1), b.stride(0), out.stride(0),
        BLOCK_K=_block_k(k), BLOCK_N=block_n,
    )  # fmt: skip
    return out


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def slot_mask(slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, num_slots, 1]: 1 where a token uses the slot (`slots` [T], -1 for none), else 0."""
    return F.one_hot(slots.long() + 1, num_slots + 1)[:, 1:, None].to(dtype)


def add_masked_lora_delta(
    x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, k: int
) -> torch.Tensor:
    """`add_lora_delta` in library kernels: every token through every slot's A, masked to its own
    slot (`mask` from `slot_mask`, made once per step), then through B (the CPU path, and the
    reference the kernels are checked against)."""
    return out.addmm_(masked_shrink(x, a, mask, k), b.t())


def masked_shrink(x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The masked form's first half: x @ A^T of every slot, zero outside each token's own [T, S * k]."""
    return ((x @ a.t()).view(x.shape[0], mask.shape[1], k) * mask).view(x.shape[0], -1)


def check_lora_kernels(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot serve on `device` (they fail to run, or disagree with the masked form
    on a small batch), or None. Run once at startup: a Triton or driver problem then costs speed,
    reported, instead of every LoRA request's output."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens, width, n, num_slots, k = 24, 1024, 384, 4, 32
    x = torch.randn(tokens, width, generator=gen).to(device, dtype)
    a = (torch.randn(num_slots * k, width, generator=gen) / width**0.5).to(device, dtype)
    b = torch.randn(n, num_slots * k, generator=gen).to(device, dtype)
    out = torch.randn(tokens, n, generator=gen).to(device, dtype)
    slots = torch.tensor([i % (num_slots + 1) - 1 for i in range(tokens)], dtype=torch.int32, device=device)
    try:
        got = add_lora_delta(x, out.clone(), a, b, slots, k).float()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    mask = slot_mask(slots, num_slots, torch.float32)
    want = add_masked_lora_delta(x.float(), out.float(), a.float(), b.float(), mask, k)
    err = ((got - want).norm() / want.norm()).item()
    return None if err < CHECK_TOLERANCE else f"relative error {err:.2e} against the masked form"


CHECK_TOLERANCE = 2e-2  # bf16 outputs: rounding alone is ~4e-3
