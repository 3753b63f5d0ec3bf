"""Phi-3 (Phi3ForCausalLM): the Llama decoder with q/k/v and gate/up fused in the checkpoint.

`unfuse` splits `qkv_proj` into q/k/v and `gate_up_proj` into gate/up under the Llama names, so the
Llama layers, tensor-parallel sharding and quantization apply unchanged; the build converts
through it (artifacts hold the split tensors), the model loads raw checkpoints through it. Phi-3's
LongRoPE lives in `layers.rope_scaling`; its sliding window is `ModelConfig.sliding_window`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln_engine.config import ModelConfig
from kiln_engine.models.llama import LlamaForCausalLM

# Where each tensor of a linear layer holds its output features: (dimension, features per element).
# AWQ packs 8 output features into each int32 of qweight, both int4 formats into each of qzeros;
# GPTQ's qweight packs input rows instead, and its g_idx (per input row) is every part's.
_OUTPUT_AXIS = {"weight": (0, 1), "bias": (0, 1), "scales": (1, 1), "qzeros": (1, 8)}


def unfuse(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One checkpoint tensor -> the Llama-named tensors it holds (itself when not fused).

    Float and AWQ/GPTQ int4 checkpoints alike: each part is a slice of the output features.
    """
    module, _, param = name.rpartition(".")
    if module.endswith("self_attn.qkv_proj"):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        parts = {"q_proj": q, "k_proj": kv, "v_proj": kv}
    elif module.endswith("mlp.gate_up_proj"):
        parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}  # gate first
    else:
        yield name, tensor
        return
    prefix = module.rpartition(".")[0]
    if param == "g_idx":
        for part in parts:
            yield f"{prefix}.{part}.{param}", tensor.clone()  # own storage: safetensors refuses shared
        return
    if param == "qweight":
        axis, per_element = (1, 8) if cfg.quant.method == "awq" else (1, 1)
    elif param in _OUTPUT_AXIS:
        axis, per_element = _OUTPUT_AXIS[param]
    else:
        raise ValueError(f"{name}: a fused layer's {param!r} tensor is not supported")
    sizes = [features // per_element for features in parts.values()]
    if tensor.shape[axis] != sum(sizes) or any(f % per_element for f in parts.values()):
        layout = " + ".join(f"{part} {features}" for part, features in parts.items())
        raise ValueError(
            f"{name}: {tensor.shape[axis]} entries on dimension {axis}, expected ({layout}) / {per_element}"
        )
    for part, piece in zip(parts, tensor.split(sizes, dim=axis), strict=True):
        yield f"{prefix}.{part}.{param}", piece.contiguous()


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def split_checkpoint_tensor(
        name: str, tensor: torch.Tensor, config: ModelConfig, pending: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return unfuse(name, tensor, config)
