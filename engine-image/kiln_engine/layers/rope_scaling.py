"""RoPE scaling for long contexts that changes frequencies per dimension: YaRN and LongRoPE.

Each returns (inverse frequencies [head_dim/2], attention factor): cos and sin are multiplied by the
factor, exactly as transformers' `_compute_yarn_parameters` / `_compute_longrope_parameters` do.
"""

from __future__ import annotations

import math

import torch

from kiln_engine.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _scaling_factor(rope: RopeConfig, original: int, max_position_embeddings: int) -> float:
    return rope.factor if rope.factor is not None else max_position_embeddings / original


def yarn(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp linearly in between."""
    original = rope.original_max_position_embeddings or max_position_embeddings
    factor = _scaling_factor(rope, original, max_position_embeddings)
    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    dim, base = head_dim, rope.theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def longrope(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-dimension rescale factors, `short_factor` within the pretraining length.

    transformers switches to `long_factor` (for every position) once a sequence grows past
    `original_max_position_embeddings`; a server batches sequences of all lengths, so (as vLLM does
    per context size) the choice is fixed by the served context: short when it fits, long otherwise.
    """
    original = rope.original_max_position_embeddings or max_position_embeddings
    factor = _scaling_factor(rope, original, max_position_embeddings)
    attention = rope.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope.long_factor if max_positions > original else rope.short_factor
    if len(ext) != head_dim // 2:
        raise ValueError(
            f"longrope factors have {len(ext)} entries, head_dim {head_dim} needs {head_dim // 2}"
        )
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (torch.tensor(ext, dtype=torch.float32) * rope.theta**shape)
    return inv_freq, float(attention)
