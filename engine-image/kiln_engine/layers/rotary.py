"""Rotary position embeddings (RoPE) with Hugging Face's scaling variants: linear, dynamic NTK, llama3,
YaRN and LongRoPE (the last two in `layers.rope_scaling`).

cos/sin are precomputed once for every position up to `max_positions` and gathered per token, so a
step costs one index_select regardless of batch shape (and is CUDA-graph friendly).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln_engine.config import RopeConfig
from kiln_engine.layers import rope_scaling


def rope_inv_freq(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_positions: int
) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], computed exactly as transformers' ROPE_INIT_FUNCTIONS do.

    Dynamic NTK in transformers depends on the longest sequence of the current batch; a server
    cannot reproduce that per request, so here (as in vLLM) the base is fixed: unscaled when the
    served context fits in `max_position_embeddings` (identical to transformers), otherwise scaled
    for `max_positions`.
    """
    dim = head_dim
    base = rope.theta
    factor = rope.factor if rope.factor is not None else 1.0
    if rope.rope_type == "dynamic" and max_positions > max_position_embeddings:
        base = base * ((factor * max_positions / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Applies RoPE (the rotate-half layout of Llama/Qwen checkpoints) to q and k in place of copies.

    `head_dim` is the number of dimensions rotated: all of a head's, or with a partial rotary
    factor (Phi-4-mini) its first ones, the others passing through unchanged.
    """

    cos_sin: torch.Tensor

    def __init__(
        self, rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_positions: int
    ) -> None:
        super().__init__()
        self.rotary_dim = head_dim
        scale = 1.0
        if rope.rope_type == "yarn":
            inv_freq, scale = rope_scaling.yarn(rope, head_dim, max_position_embeddings)
        elif rope.rope_type == "longrope":
            inv_freq, scale = rope_scaling.longrope(rope, head_dim, max_position_embeddings, max_positions)
        else:
            inv_freq = rope_inv_freq(rope, head_dim, max_position_embeddings, max_positions)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos_sin = torch.stack((emb.cos() * scale, emb.sin() * scale))  # yarn/longrope scale cos and sin
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D], positions [T] -> rotated q, k."""
        cos = self.cos_sin[0].index_select(0, positions).unsqueeze(1).to(q.dtype)
        sin = self.cos_sin[1].index_select(0, positions).unsqueeze(1).to(q.dtype)
        if self.rotary_dim == q.shape[-1]:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return _rotate_part(q, cos, sin, self.rotary_dim), _rotate_part(k, cos, sin, self.rotary_dim)


def _rotate_part(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    rotated, passed = x[..., :dim], x[..., dim:]
    return torch.cat((rotated * cos + _rotate_half(rotated) * sin, passed), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
