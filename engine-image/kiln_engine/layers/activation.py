"""Gated activations over a fused gate/up projection: SwiGLU (Llama family) and GeGLU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fused = False  # set by the model runner: one Triton pass instead of three

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kiln_engine.layers.fused import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """GeGLU (Gemma): gelu(gate) * up over a fused gate/up projection; `approximate` as in F.gelu."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate
        self.fused = False  # set by the model runner: one Triton pass (tanh approximation only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.approximate == "tanh":
            from kiln_engine.layers.fused import silu_and_mul

            return silu_and_mul(x, gelu_tanh=True)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
