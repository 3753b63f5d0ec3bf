"""Model architectures the runtime serves, keyed by the `architectures` entry of config.json."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln_engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from kiln_engine.models.gemma import GemmaForCausalLM
from kiln_engine.models.gpt_oss import GptOssForCausalLM, split_experts
from kiln_engine.models.llama import LlamaForCausalLM
from kiln_engine.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from kiln_engine.models.phi3 import Phi3ForCausalLM, unfuse

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def checkpoint_tensors(
    name: str, tensor: torch.Tensor, config: ModelConfig, pending: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint tensor as the tensors the loader and the build handle: Phi-3's fused q/k/v and
    gate/up split, gpt-oss's stacked (or MXFP4) experts one per expert and projection, others as
    they are. `pending` holds tensors waiting for their other half; empty after a whole pass."""
    if config.architecture == "Phi3ForCausalLM":
        return unfuse(name, tensor, config)
    if config.architecture == "GptOssForCausalLM":
        return split_experts(name, tensor, config, pending)
    return iter(((name, tensor),))


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
