"""RMSNorm, optionally fused with the residual add that precedes it (one Triton kernel when `fused`),
and Gemma's (1 + w) variant."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.fused = False  # set by the model runner: Triton kernel instead of the torch reference

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kiln_engine.layers.fused import rms_norm

            return rms_norm(x, self.weight, self.eps)[0]
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual): the next sublayer's input and residual."""
        if self.fused:
            from kiln_engine.layers.fused import rms_norm

            out, res = rms_norm(x, self.weight, self.eps, residual)
            assert res is not None
            return out, res
        residual = x + residual
        return self._norm(residual), residual


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the checkpoint's weight w scales by (1 + w), in float32 before the cast.

    The parameter holds 1 + w (added as it loads, so random "dummy" weights of 1 are a plain
    norm), kept in float32 as transformers computes it; the Triton kernel (`fused`) takes the
    same order.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32), requires_grad=False)
        self.fused = False  # set by the model runner: Triton kernel instead of the torch reference

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        if tensor.shape != self.weight.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.data.copy_(1.0 + tensor.float())

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kiln_engine.layers.fused import rms_norm

            return rms_norm(x, self.weight, self.eps, weight_in_fp32=True)[0]
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual), the sum in x's dtype as transformers adds."""
        if self.fused:
            from kiln_engine.layers.fused import rms_norm

            out, res = rms_norm(x, self.weight, self.eps, residual, weight_in_fp32=True)
            assert res is not None
            return out, res
        residual = x + residual
        return self._norm(residual), residual
