"""Phi-3 (Phi3ForCausalLM): the Llama decoder with q/k/v and gate/up fused in the checkpoint.

`unfuse` splits `qkv_proj` into q/k/v and `gate_up_proj` into gate/up under the Llama names, so the
Llama layers, tensor-parallel sharding and quantization apply unchanged; the build converts
through it (artifacts hold the split tensors), the model loads raw checkpoints through it. Phi-3's
LongRoPE lives in `layers.rope_scaling`; its sliding window is `ModelConfig.sliding_window`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from kiln_engine.config import ModelConfig
from kiln_engine.models.llama import LlamaForCausalLM


def unfuse(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One checkpoint tensor -> the Llama-named tensors it holds (itself when not fused)."""
    if name.endswith("self_attn.qkv_proj.weight"):
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        if tensor.shape[0] != q + 2 * kv:
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected q {q} + k/v 2 x {kv}")
        prefix = name.removesuffix("qkv_proj.weight")
        for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True):
            yield f"{prefix}{part}.weight", rows.contiguous()
    elif name.endswith("mlp.gate_up_proj.weight"):
        prefix = name.removesuffix("gate_up_proj.weight")
        gate, up = tensor.chunk(2, dim=0)  # gate first, as Phi3MLP splits it
        yield f"{prefix}gate_proj.weight", gate.contiguous()
        yield f"{prefix}up_proj.weight", up.contiguous()
    else:
        yield name, tensor


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(pair for n, t in weights for pair in unfuse(n, t, self.config))
