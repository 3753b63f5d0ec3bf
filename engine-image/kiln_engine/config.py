"""Engine and model configuration: `EngineConfig` (how to serve) and `ModelConfig` (what config.json says).

Plain Python, no torch: the scheduler and block manager read `EngineConfig` in unit tests without tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GptOssForCausalLM",
)

# Architectures near a supported one that are refused with a pointer to what is served instead.
UNSUPPORTED_HINTS: dict[str, str] = {
    "Gemma3ForConditionalGeneration": "Gemma 3 vision-language checkpoints are not supported; "
    "serve a text-only Gemma3ForCausalLM checkpoint",
    "Gemma3nForConditionalGeneration": "Gemma 3n is not supported",
    "Gemma3nForCausalLM": "Gemma 3n is not supported",
}

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")

QUANTIZATION_METHODS: tuple[str, ...] = ("none", "fp8", "int8", "awq", "gptq", "mxfp4")
# Set in an artifact's quantization_config by `kiln-engine build --quantization mxfp4`: its gpt-oss
# experts are stored packed and served so (OpenAI's own checkpoints are dequantized as they load).
MXFP4_PACKED_KEY = "kiln_packed_experts"

KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp8")


SPECULATIVE_METHODS = ("ngram", "draft", "eagle")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are not something this runtime can serve."""


@dataclass
class EngineConfig:
    """How the serving core batches, caches and where it runs.

    `num_kv_blocks` fixes the KV cache size; when it is None the model runner sizes the cache from
    `gpu_memory_utilization` on CUDA, or from `cpu_kv_cache_bytes` on CPU.
    """

    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_tokens_per_step: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 256 * 1024 * 1024
    prefix_caching: bool = True
    chunked_prefill: bool = True
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on CUDA) | "float32" | "bfloat16" | "float16"
    # The KV cache's element type: "auto" (the model dtype) | "bf16" | "fp16" | "fp8" (e4m3 with a
    # float32 scale per layer, K/V and KV head: half the bytes of bf16, twice the blocks).
    kv_cache_dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0  # within this rank's pipeline stage
    pipeline_parallel_size: int = 1
    pipeline_parallel_rank: int = 0  # global rank = pipeline_parallel_rank * tp + tensor_parallel_rank
    # A mixture-of-experts checkpoint's experts spread whole over the tensor-parallel ranks (E / tp a
    # rank) instead of sliced; an artifact's manifest says how it was built, and that wins.
    expert_parallel: bool = False
    pipeline_microbatches: int = 0  # per step, so stages overlap; 0: one per stage
    attention_backend: str = "auto"  # "auto" | "torch" (reference) | "triton"
    load_format: str = "auto"  # "auto": safetensors weights | "dummy": random weights (benchmarks)
    cuda_graphs: bool = False  # decode steps padded to fixed sizes; captured as CUDA graphs on GPU
    # With decode graphs and one rank: enqueue the next decode step before reading this one's
    # tokens, so the host's bookkeeping overlaps the device's work (LLMEngine.step). On the H200 it
    # took the host's share of a batch-1 step from 0.35-0.75 ms to under 0.1 ms
    # (docs/engine-speed.md, run 6); the CPU tests run it both ways.
    lookahead_decode: bool = True
    # Speculative decoding: None (off) | "ngram" (prompt lookup: kiln_engine.speculative) | "draft"
    # (a smaller model with the same tokenizer at `draft_model`: kiln_engine.draft) | "eagle" (an
    # EAGLE head at `draft_model` over the model's own hidden states: kiln_engine.eagle). With CUDA
    # graphs, a verify step replays a decode graph with a row per token (DecodeGraphs.run_tails,
    # captured up to max_num_seqs * (1 + K) rows); speculation turns lookahead decode off.
    speculative: str | None = None
    num_speculative_tokens: int = 4
    draft_model: str | None = None  # a local checkpoint directory (a draft model or an EAGLE head)
    # The share of the GPU the draft engine may fill (weights and its KV cache); it loads first and
    # the target's gpu_memory_utilization then counts it as used.
    draft_gpu_memory_utilization: float = 0.15
    # Multi-LoRA (kiln_engine.lora): adapters (name, PEFT directory) served next to the base model in
    # `max_loras` device slots of rank up to `max_lora_rank`; 0 slots: LoRA off.
    lora_modules: list[tuple[str, str]] = field(default_factory=list)
    max_loras: int = 0
    max_lora_rank: int = 16
    # Decode graphs run LoRA through the batched kernels (layers/lora_kernels.py) once they pass
    # their startup check; False keeps the masked form (bench/lora.py times both).
    lora_kernels: bool = True
    # In decode graphs of the masked form (and of one adapter) each projection's x @ A runs on a
    # second stream beside its base GEMM, which leaves SMs idle at decode sizes, and only B's product
    # waits for both (bench/results-committed/lora-h100-run7-side-stream.json); False: after the GEMM.
    lora_side_stream: bool = True

    def validate(self) -> None:
        """Reject configurations the scheduler could never serve."""
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_tokens_per_step <= 0:
            raise ValueError("block_size, max_num_seqs and max_tokens_per_step must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        if (
            not self.chunked_prefill
            and self.max_model_len is not None
            and self.max_tokens_per_step < self.max_model_len
        ):
            raise ValueError(
                "without chunked prefill, max_tokens_per_step must be at least max_model_len "
                f"({self.max_tokens_per_step} < {self.max_model_len})"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")
        if not 0 <= self.pipeline_parallel_rank < self.pipeline_parallel_size:
            raise ValueError(
                f"pipeline_parallel_rank {self.pipeline_parallel_rank} is outside "
                f"pipeline_parallel_size {self.pipeline_parallel_size}"
            )
        if self.expert_parallel and self.tensor_parallel_size < 2:
            raise ValueError("expert parallelism spreads experts over tensor-parallel ranks: at least 2")
        if self.pipeline_parallel_size > 1 and self.cuda_graphs:
            raise ValueError("decode CUDA graphs cover the whole model: off under pipeline parallelism")
        if self.speculative not in (None, *SPECULATIVE_METHODS):
            raise ValueError(
                f"speculative must be ngram, draft or eagle (or unset), not {self.speculative!r}"
            )
        if (self.speculative in ("draft", "eagle")) != (self.draft_model is not None):
            raise ValueError(
                "draft_model (a draft model's or EAGLE head's directory) goes with speculative='draft' "
                "or 'eagle', which need it"
            )
        if not 0.0 < self.draft_gpu_memory_utilization < 1.0:
            raise ValueError("draft_gpu_memory_utilization must be between 0 and 1")
        if self.speculative is not None:
            if self.num_speculative_tokens < 1:
                raise ValueError(
                    f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}"
                )
            if self.pipeline_parallel_size > 1 or self.tensor_parallel_size > 1:
                raise ValueError(
                    "speculative decoding runs on one rank only: not with tensor or pipeline parallelism"
                )
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be non-negative and max_lora_rank positive")
        if self.lora_modules and not self.max_loras:
            raise ValueError("LoRA adapters need max_loras of at least 1")
        if self.max_loras and self.pipeline_parallel_size > 1:
            raise ValueError("LoRA adapters are not served under pipeline parallelism")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, not {self.load_format!r}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalized from `rope_theta`/`rope_scaling` or `rope_parameters`."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3 | yarn | longrope
    factor: float | None = 1.0  # yarn/longrope: None means max_position_embeddings / original
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn (defaults as in transformers) and longrope; see kiln_engine.layers.rope_scaling
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclass(frozen=True)
class QuantConfig:
    """How Linear weights are stored: none, fp8, int8 (weight-only), awq or gptq (int4); mxfp4: the
    experts only (gpt-oss), every other Linear unquantized."""

    method: str = "none"
    bits: int = 16
    group_size: int = -1
    zero_point: bool = True  # awq
    desc_act: bool = False  # gptq
    sym: bool = True  # gptq


@dataclass(frozen=True)
class MoeConfig:
    """A sparse mixture-of-experts MLP: `top_k` of `num_experts` SwiGLU experts per token."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    renormalize: bool  # top-k weights divided by their sum (Mixtral always; Qwen3-MoE: norm_topk_prob)
    sparse_layers: tuple[int, ...]  # decoder layers with the expert block; the others keep a dense MLP
    # gpt-oss: biased router and experts, and its clamped SwiGLU on the experts' gate/up
    # (gate clamped above at `swiglu_limit`, up on both sides; gate * sigmoid(alpha * gate) * (up + 1)).
    biased: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
    # How the experts lie over the tensor-parallel ranks (set by the loader, not read from config.json):
    # False, a slice of every expert on every rank; True, num_experts / tp whole experts a rank.
    expert_parallel: bool = False

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers


@dataclass(frozen=True)
class GemmaConfig:
    """Gemma 2/3 specifics: query scaling, tanh soft-capping, which layers slide, the local rope."""

    query_pre_attn_scalar: float  # scores are scaled by its inverse square root, not head_dim's
    attn_logit_softcapping: float | None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None  # the same on the LM head's logits
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" | "full_attention"
    local_rope: RopeConfig  # the sliding layers' rope (Gemma 3 gives them their own base)
    gelu_approximate: str  # "tanh" (gelu_pytorch_tanh) | "none" (exact gelu)


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Hugging Face config.json the runtime needs, with defaults applied."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    max_window_layers: int
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quant: QuantConfig = field(default_factory=QuantConfig)
    moe: MoeConfig | None = None
    gemma: GemmaConfig | None = None
    # Per layer "sliding_attention" | "full_attention" where the window alternates (gpt-oss).
    layer_types: tuple[str, ...] = ()
    attention_sinks: bool = False  # a learned per-head logit in every softmax's denominator (gpt-oss)
    # The share of each head's dimensions RoPE rotates (the first ones; the rest pass through):
    # Phi-4-mini rotates 3/4.
    partial_rotary_factor: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer (Qwen applies it only from `max_window_layers` on,
        Gemma on the layers its `layer_types` call sliding)."""
        if self.sliding_window is None:
            return None
        if self.gemma is not None and self.gemma.layer_types[layer] != "sliding_attention":
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe") and layer < self.max_window_layers:
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            hint = f"{UNSUPPORTED_HINTS[arch]}; " if arch in UNSUPPORTED_HINTS else ""
            raise UnsupportedModelError(
                f"unsupported architecture {arch or '(none in config.json)'!r}: {hint}"
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        model_type = cfg.get("model_type", arch.removesuffix("ForCausalLM").lower())
        rotary = float(
            cfg.get(
                "partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
            )
        )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        gemma = parse_gemma(arch, cfg)
        head_dim = cfg.get("head_dim") or (256 if gemma else hidden // heads)  # Gemma's default
        _check_partial_rotary(arch, rotary, int(head_dim))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        is_qwen3 = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        if is_qwen2 or is_qwen3:
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        else:
            sliding = cfg.get("sliding_window", 4096 if gemma else None)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=parse_gemma_rope(cfg)[0] if arch == "Gemma3ForCausalLM" else parse_rope(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma is not None)),
            # Qwen2 always has q/k/v biases; Llama/Mistral/Qwen3 say so with attention_bias.
            attention_bias=True if is_qwen2 else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=is_qwen3 or arch == "Gemma3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            max_window_layers=int(cfg.get("max_window_layers", 0) or 0),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quant=parse_quant(_served_quantization(arch, cfg.get("quantization_config"))),
            moe=parse_moe(arch, cfg),
            gemma=gemma,
            layer_types=parse_layer_types(cfg) if arch == "GptOssForCausalLM" else (),
            attention_sinks=arch == "GptOssForCausalLM",
            partial_rotary_factor=rotary,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_partial_rotary(arch: str, factor: float, head_dim: int) -> None:
    """Partial RoPE as transformers applies it: only its Phi-3 attention rotates part of a head."""
    if factor == 1.0:
        return
    if arch != "Phi3ForCausalLM":
        raise UnsupportedModelError(
            f"partial rotary embeddings (partial_rotary_factor {factor}) are supported for "
            f"Phi3ForCausalLM checkpoints (Phi-4-mini) only, not {arch}"
        )
    rotary_dim = int(head_dim * factor)
    if not 0.0 < factor < 1.0 or rotary_dim % 2:
        raise UnsupportedModelError(
            f"partial_rotary_factor {factor} of head_dim {head_dim} gives {rotary_dim} rotated "
            f"dimensions; it must be in (0, 1] and give an even number"
        )


def parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    """Normalize both the classic (`rope_theta` + `rope_scaling`) and the newer `rope_parameters` form."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = str(merged.get("rope_type", merged.get("type", "default")))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    # Phi-3-style configs keep the pretraining length at the top level; transformers prefers it.
    orig = cfg.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
    factor = merged.get("factor")
    if factor is None and rope_type not in ("yarn", "longrope"):
        factor = 1.0

    def opt(key: str) -> float | None:
        value = merged.get(key)
        return float(value) if value is not None else None

    if rope_type == "longrope" and not (merged.get("short_factor") and merged.get("long_factor")):
        raise UnsupportedModelError("longrope rope scaling needs short_factor and long_factor")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(factor) if factor is not None else None,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig is not None else None,
        attention_factor=opt("attention_factor"),
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(merged.get("truncate", True)),
        short_factor=tuple(float(f) for f in merged.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in merged.get("long_factor") or ()),
    )


def parse_layer_types(cfg: dict[str, Any], pattern: int = 2) -> tuple[str, ...]:
    """Which layers slide: config.json's `layer_types`, else every `pattern`-th layer is full."""
    layers = int(cfg["num_hidden_layers"])
    default_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    types = tuple(cfg.get("layer_types") or default_types)
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(
            f"layer_types must name sliding_attention or full_attention for each of {layers} layers"
        )
    return types


def parse_gemma(arch: str, cfg: dict[str, Any]) -> GemmaConfig | None:
    """Gemma 2/3's options with transformers' defaults where config.json leaves them out."""
    if arch not in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return None
    gemma2 = arch == "Gemma2ForCausalLM"
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{arch} with use_bidirectional_attention (an embedding model)")
    types = parse_layer_types(cfg, 2 if gemma2 else int(cfg.get("sliding_window_pattern", 6)))
    act = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh")
    approximate = {"gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh", "gelu": "none"}.get(act)
    if approximate is None:
        raise UnsupportedModelError(f"{arch} with hidden_activation {act!r} is not supported")

    def cap(key: str, default: float | None) -> float | None:
        value = cfg.get(key, default)
        return float(value) if value is not None else None

    return GemmaConfig(
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_logit_softcapping=cap("attn_logit_softcapping", 50.0 if gemma2 else None),
        final_logit_softcapping=cap("final_logit_softcapping", 30.0 if gemma2 else None),
        layer_types=types,
        local_rope=parse_gemma_rope(cfg)[1] if not gemma2 else parse_rope(cfg),
        gelu_approximate=approximate,
    )


def parse_gemma_rope(cfg: dict[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """Gemma 3's (global, local) ropes: `rope_parameters` keyed by layer type, or the older
    `rope_theta` (default 1e6) + `rope_scaling` for global layers and `rope_local_base_freq` (1e4)."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        return (
            parse_rope({"rope_parameters": {"rope_theta": 1_000_000.0, **full}}),
            parse_rope({"rope_parameters": {"rope_theta": 10_000.0, **local}}),
        )
    scaling = cfg.get("rope_scaling")
    return (
        parse_rope(
            {
                "rope_theta": cfg.get("rope_theta", 1_000_000.0),
                "rope_scaling": scaling,
                "rope_parameters": params,
            }
        ),
        parse_rope({"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}),
    )


def with_expert_parallel(cfg: ModelConfig, expert_parallel: bool, tp: int) -> ModelConfig:
    """`cfg` with its experts spread whole over `tp` ranks, when asked (and checked that they can)."""
    if not expert_parallel:
        return cfg
    if cfg.moe is None:
        raise ValueError(f"expert parallelism needs a mixture-of-experts model, not {cfg.architecture}")
    if cfg.moe.num_experts % tp:
        raise ValueError(f"{cfg.moe.num_experts} experts do not split over {tp} expert-parallel ranks")
    return replace(cfg, moe=replace(cfg.moe, expert_parallel=True))


def parse_moe(arch: str, cfg: dict[str, Any]) -> MoeConfig | None:
    """The expert block of Mixtral, Qwen3-MoE and gpt-oss configs; None for dense architectures."""
    if arch not in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM"):
        return None
    quant = str((cfg.get("quantization_config") or {}).get("quant_method", "none")).lower()
    if quant in ("awq", "gptq"):
        raise UnsupportedModelError(
            f"{quant} mixture-of-experts checkpoints are not supported; use fp8, int8-weight or none"
        )
    layers = int(cfg["num_hidden_layers"])
    if arch == "GptOssForCausalLM":  # softmax over the top k logits: the renormalised top k
        return MoeConfig(
            num_experts=int(cfg.get("num_local_experts", 128)),
            top_k=int(cfg.get("num_experts_per_tok", 4)),
            intermediate_size=int(cfg["intermediate_size"]),
            renormalize=True,
            sparse_layers=tuple(range(layers)),
            biased=True,
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
        )
    if arch == "MixtralForCausalLM":
        return MoeConfig(
            num_experts=int(cfg.get("num_local_experts", 8)),
            top_k=int(cfg.get("num_experts_per_tok", 2)),
            intermediate_size=int(cfg["intermediate_size"]),
            renormalize=True,
            sparse_layers=tuple(range(layers)),
        )
    experts = int(cfg["num_experts"])
    step = int(cfg.get("decoder_sparse_step", 1))
    dense = set(cfg.get("mlp_only_layers") or [])
    return MoeConfig(
        num_experts=experts,
        top_k=int(cfg.get("num_experts_per_tok", 8)),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        sparse_layers=tuple(
            i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0
        ),
    )


def _served_quantization(arch: str, qcfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """gpt-oss's MXFP4 experts are dequantized as they load (`models.gpt_oss`): served unquantized,
    unless a Kiln build kept them packed (MXFP4_PACKED_KEY)."""
    method = str((qcfg or {}).get("quant_method", "")).lower()
    if method != "mxfp4":
        return qcfg
    if arch != "GptOssForCausalLM":
        raise UnsupportedModelError(f"mxfp4 quantization is supported for GptOssForCausalLM only, not {arch}")
    return qcfg if (qcfg or {}).get(MXFP4_PACKED_KEY) else None


def parse_quant(qcfg: dict[str, Any] | None) -> QuantConfig:
    """Read an HF `quantization_config` (awq, gptq, fp8) or our own {"quant_method": "int8"}."""
    if not qcfg:
        return QuantConfig()
    method = str(qcfg.get("quant_method", "none")).lower()
    if method in ("none", ""):
        return QuantConfig()
    if method not in QUANTIZATION_METHODS:
        raise UnsupportedModelError(
            f"unsupported quantization {method!r}; supported: {', '.join(QUANTIZATION_METHODS)}"
        )
    if method == "fp8" and qcfg.get("weight_block_size"):
        raise UnsupportedModelError(
            "block-wise fp8 (weight_block_size) is not supported; use per-channel fp8"
        )
    if method == "mxfp4":
        return QuantConfig(method=method, bits=4, group_size=32)
    bits = int(qcfg.get("bits", qcfg.get("w_bit", {"fp8": 8, "int8": 8}.get(method, 4))))
    if method in ("awq", "gptq") and bits != 4:
        raise UnsupportedModelError(f"{method} with {bits} bits is not supported (only 4-bit)")
    return QuantConfig(
        method=method,
        bits=bits,
        group_size=int(qcfg.get("group_size", qcfg.get("q_group_size", -1))),
        zero_point=bool(qcfg.get("zero_point", True)),
        desc_act=bool(qcfg.get("desc_act", False)),
        sym=bool(qcfg.get("sym", True)),
    )
