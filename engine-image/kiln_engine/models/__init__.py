"""Model architectures the runtime serves, keyed by the `architectures` entry of config.json."""

from __future__ import annotations

from kiln_engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from kiln_engine.models.gemma import GemmaForCausalLM
from kiln_engine.models.gpt_oss import GptOssForCausalLM
from kiln_engine.models.llama import LlamaForCausalLM
from kiln_engine.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from kiln_engine.models.phi3 import Phi3ForCausalLM

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


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
