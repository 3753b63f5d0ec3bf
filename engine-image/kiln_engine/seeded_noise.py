"""Exp(1) sampling noise for requests with a seed, counter-based: each row's noise is a pure function
of (the request's seed, how many rows it has drawn before), so its tokens do not depend on the rest
of the batch, and every seeded row of a step is drawn by one Triton kernel (Philox, `tl.rand`).

A torch.Generator per request needs one kernel launch per seeded row per step: at 128 seeded rows
that was the sampler's largest host cost on an H100 (bench/results-committed/
structured_outputs-h100-run2-cprofile.txt). On CPU the sampler keeps its generators (sampler.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK64 = (1 << 64) - 1
BLOCK = 1024


def _splitmix64(value: int) -> int:
    """One step of splitmix64's output function: a bijection that spreads every input bit."""
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def draw_key(seed: int, draw: int) -> int:
    """The Philox key of a request's `draw`-th row: distinct draws of one seed get unrelated keys
    (non-negative, so it fits the int64 tensor the kernel reads)."""
    return _splitmix64(_splitmix64(seed & MASK64) ^ draw) >> 1


def available(device: torch.device) -> bool:
    """True where `fill_rows` runs compiled (Triton's interpreter runs it on CPU tensors, for tests)."""
    return device.type == "cuda"


def fill_rows(noise: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
    """Overwrite `noise[rows[i]]` ([N, V] float32, contiguous) with Exp(1) noise keyed by `keys[i]`."""
    assert noise.dtype == torch.float32 and noise.is_contiguous()
    if rows.numel() == 0:
        return
    vocab = noise.shape[1]
    block = min(BLOCK, triton.next_power_of_2(vocab))
    grid = (rows.numel(), triton.cdiv(vocab, block))
    _exponential_rows[grid](noise, rows, keys, vocab, noise.stride(0), BLOCK=block)


@triton.jit
def _exponential_rows(  # type: ignore[no-untyped-def]
    noise_ptr, rows_ptr, keys_ptr, vocab, stride, BLOCK: tl.constexpr
):
    index = tl.program_id(0)
    row = tl.load(rows_ptr + index)
    key = tl.load(keys_ptr + index)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    uniform = tl.rand(key, offsets)  # [0, 1): a 0 gives infinite noise, so that token is never picked
    tl.store(noise_ptr + row * stride + offsets, -tl.log(uniform), mask=offsets < vocab)
