"""Gemma 2 and Gemma 3 text models (Gemma2ForCausalLM, Gemma3ForCausalLM) on the Llama layers.

What Gemma changes (the math of transformers' modeling_gemma2/modeling_gemma3): embeddings scaled by
sqrt(hidden) in the weight dtype; (1 + w) RMSNorms computed in float32 (`GemmaRMSNorm`); a GeGLU MLP;
"sandwich" norms (after attention and after the MLP too, before each residual add); queries scaled
by `query_pre_attn_scalar`; tanh soft-capping of attention scores (Gemma 2) and of the final logits;
sliding-window attention on the layers `layer_types` marks (every other layer in Gemma 2, five of
six in Gemma 3, whose sliding layers also have their own rope base); q/k norms (Gemma 3). Checkpoint
names, tensor-parallel sharding and quantization are Llama's, so the build needs nothing of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln_engine.config import GemmaConfig, ModelConfig
from kiln_engine.layers.activation import GeluAndMul
from kiln_engine.layers.attention import Attention, AttentionMetadata
from kiln_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln_engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from kiln_engine.layers.norm import GemmaRMSNorm
from kiln_engine.layers.parallel import PPStage, TPGroup
from kiln_engine.layers.rotary import RotaryEmbedding
from kiln_engine.models.llama import LlamaAttention, LlamaForCausalLM, PPMissing


def gemma_options(cfg: ModelConfig) -> GemmaConfig:
    if cfg.gemma is None:
        raise ValueError(f"{cfg.architecture} is not a Gemma architecture")
    return cfg.gemma


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): squashes x into (-cap, cap); identity when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's query scale, score soft-cap and (1 + w) q/k norms."""

    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype, tp: TPGroup
    ) -> None:
        super().__init__(cfg, layer, rotary, dtype, tp)
        g = gemma_options(cfg)
        if cfg.qk_norm:  # replace Llama's norms (same call, Gemma's arithmetic)
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)  # type: ignore[assignment]
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)  # type: ignore[assignment]
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            g.query_pre_attn_scalar**-0.5,
            cfg.layer_sliding_window(layer),
            softcap=g.attn_logit_softcapping,
        )


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], False, cfg.quant, dtype, tp)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, False, cfg.quant, dtype, tp)
        self.act = GeluAndMul(gemma_options(cfg).gelu_approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype, tp: TPGroup
    ) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg, layer, rotary, dtype, tp)
        self.mlp = GemmaMLP(cfg, dtype, tp)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The residual stream in and out; each sublayer's output is normed before it is added."""
        h = self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), meta))
        h, x = self.pre_feedforward_layernorm.add_forward(h, x)  # one kernel for add and norm
        return x + self.post_feedforward_layernorm(self.mlp(h))


class GemmaModel(nn.Module):
    """Decoder stack; under pipeline parallelism a stage holds its own layers, as `LlamaModel` does."""

    def __init__(
        self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, tp: TPGroup, pp: PPStage | None = None
    ) -> None:
        super().__init__()
        g = gemma_options(cfg)
        pp = pp or PPStage(end_layer=cfg.num_hidden_layers)
        self.pp = pp
        keep_embed = pp.is_first or (pp.is_last and cfg.tie_word_embeddings)
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp) if keep_embed else PPMissing()
        )
        # transformers multiplies by sqrt(hidden) rounded to the weight dtype
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size**0.5, dtype=dtype), persistent=False)
        ropes = {
            kind: RotaryEmbedding(rope, cfg.head_dim, cfg.max_position_embeddings, max_positions)
            for kind, rope in (("full_attention", cfg.rope), ("sliding_attention", g.local_rope))
        }
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, ropes[kind], dtype, tp) if pp.holds_layer(i) else PPMissing()
            for i, kind in enumerate(g.layer_types)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if pp.is_last else PPMissing()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last stage returns the normed hidden states, earlier ones the residual stream."""
        x = self.embed_tokens(input_ids) * self.embed_scale if hidden_in is None else hidden_in
        for i in range(self.pp.first_layer, self.pp.end_layer):
            x = self.layers[i](positions, x, meta)
        return self.norm(x) if self.pp.is_last else x


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2/3: `LlamaForCausalLM`'s weight loading and LM head around `GemmaModel`."""

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int,
        dtype: torch.dtype,
        tp: TPGroup | None = None,
        pp: PPStage | None = None,
    ) -> None:
        nn.Module.__init__(self)
        tp = tp or TPGroup()
        self.config = cfg
        self.final_softcap = gemma_options(cfg).final_logit_softcapping
        self.model = GemmaModel(cfg, max_positions, dtype, tp, pp)  # type: ignore[assignment]
        last = pp is None or pp.is_last
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp) if last else PPMissing()
        if cfg.tie_word_embeddings and last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(super().compute_logits(hidden), self.final_softcap)
