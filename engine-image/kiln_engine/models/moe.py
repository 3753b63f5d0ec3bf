"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE, the Llama decoder with a sparse expert MLP.

Attention, norms, embeddings and the dense MLP are the Llama family's (Qwen3-MoE's q/k RMSNorm
included: `ModelConfig.qk_norm`); `LlamaDecoderLayer` puts `layers.moe.SparseMoeBlock` where
`ModelConfig.moe` marks a layer sparse. What differs per family is here: the checkpoint's names for
the router and experts, mapped onto the fused expert tensors, and the routing normalisation (which
`config.parse_moe` reads: Mixtral always renormalises the top k, Qwen3-MoE when `norm_topk_prob`).

    Mixtral    model.layers.N.block_sparse_moe.gate.weight            router [E, H]
               model.layers.N.block_sparse_moe.experts.E.w1|w3|w2.*   gate | up | down
    Qwen3-MoE  model.layers.N.mlp.gate.weight                         router [E, H]
               model.layers.N.mlp.experts.E.gate_proj|up_proj|down_proj.*
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from kiln_engine.layers.moe import FusedMoE
from kiln_engine.models.llama import LlamaForCausalLM

# expert projection name -> (fused parameter prefix, part: 0 gate, 1 up, 2 down)
EXPERT_PARTS: dict[str, tuple[str, int]] = {
    "w1": ("w13", 0),
    "w3": ("w13", 1),
    "w2": ("w2", 2),
    "gate_proj": ("w13", 0),
    "up_proj": ("w13", 1),
    "down_proj": ("w2", 2),
}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.(weight|weight_scale|bias)$")


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-family decoder whose MLPs are (some or all) sparse expert blocks."""

    block_name = "mlp"  # the checkpoint's name for a layer's expert block

    def checkpoint_target(self, name: str) -> tuple[str, str, str | int | tuple[int, int] | None]:
        name = name.replace(f".{self.block_name}.", ".mlp.") if self.block_name != "mlp" else name
        m = _EXPERT.match(name)
        if m is None:
            return super().checkpoint_target(name)
        experts, expert, proj, param = m.groups()
        if proj not in EXPERT_PARTS:
            raise ValueError(f"checkpoint tensor {name!r}: unknown expert projection {proj!r}")
        fused, part = EXPERT_PARTS[proj]
        return experts, f"{fused}_{param}", (int(expert), part)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """As the Llama loader, and every expert of every sparse layer must have been loaded."""
        super().load_weights(weights)
        missing = [
            f"{path}: {m}"
            for path, module in self.named_modules()
            if isinstance(module, FusedMoE)
            for m in module.missing()
        ]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} expert tensors, e.g. {missing[:5]}")


class MixtralForCausalLM(MoeForCausalLM):
    block_name = "block_sparse_moe"


class Qwen3MoeForCausalLM(MoeForCausalLM):
    block_name = "mlp"
