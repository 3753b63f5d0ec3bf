"""The Llama family as one module tree: Llama 2/3/3.1, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

Parameter names mirror Hugging Face's, except that q/k/v and gate/up are fused (`qkv_proj`,
`gate_up_proj`); `load_weights` maps checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from kiln_engine.config import ModelConfig
from kiln_engine.layers.activation import SiluAndMul
from kiln_engine.layers.attention import Attention, AttentionMetadata
from kiln_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln_engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    load_slice,
)
from kiln_engine.layers.moe import SparseMoeBlock
from kiln_engine.layers.norm import RMSNorm
from kiln_engine.layers.parallel import PPStage, TPGroup
from kiln_engine.layers.rotary import RotaryEmbedding

PACKED_MODULES: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def packed_target(name: str) -> tuple[str, str, str | int | None]:
    """(module path, parameter, shard) that tensor `name` loads into, q/k/v and gate/up fused."""
    module_path, param = name.rsplit(".", 1)
    parent, _, leaf = module_path.rpartition(".")
    if leaf in PACKED_MODULES:
        fused, shard = PACKED_MODULES[leaf]
        return f"{parent}.{fused}", param, shard
    return module_path, param, None


def load_into(
    module: nn.Module, param: str, tensor: torch.Tensor, shard: str | int | tuple[int, int] | None
) -> None:
    """Copy a checkpoint tensor into `module`'s `param`, through the module's own `load` where it has
    one (fused, sharded or quantized parameters)."""
    loader = getattr(module, "load", None)
    if loader is not None:
        loader(param, tensor, shard)
    else:
        getattr(module, param).data.copy_(tensor)


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype, tp: TPGroup
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.attention_bias,
            cfg.quant,
            dtype,
            tp,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim,
            cfg.hidden_size,
            cfg.attention_bias and cfg.model_type not in ("qwen2",),
            cfg.quant,
            dtype,
            tp,
        )
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.rotary_emb = rotary
        self.tp = tp
        # gpt-oss: each of this rank's heads has a learned logit in its softmax's denominator
        self.sinks: nn.Parameter | None = None
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=dtype), requires_grad=False)
        self.fused = False  # set by the model runner: RoPE and the K/V store in one Triton kernel
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            cfg.head_dim**-0.5,
            cfg.layer_sliding_window(layer),
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # The fused kernel rotates whole heads; a partial rotary (Phi-4-mini) takes the torch path.
        if self.fused and self.rotary_emb.rotary_dim == self.head_dim:
            from kiln_engine.layers.fused import rope_and_store_kv

            attn = self.attn
            q = rope_and_store_kv(
                positions, q, k, v, self.rotary_emb.cos_sin, attn.k_cache, attn.v_cache, meta.slot_mapping,
                attn.k_scale, attn.v_scale,
            )  # fmt: skip
            out = attn.attend(q, meta, self.sinks)
        else:
            q, k = self.rotary_emb(positions, q, k)
            out = self.attn(q, k, v, meta, self.sinks)
        return self.o_proj(out.reshape(-1, self.q_size))

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | tuple[int, int] | None) -> None:
        """The checkpoint's `self_attn.sinks` [heads], whole or this rank's heads."""
        if name != "sinks" or self.sinks is None:
            raise ValueError(f"checkpoint tensor self_attn.{name} does not belong to this model")
        load_slice(self.sinks.data, tensor, 0, self.tp.rank, self.tp.size, "self_attn.sinks")


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [i, i], cfg.mlp_bias, cfg.quant, dtype, tp
        )
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, cfg.mlp_bias, cfg.quant, dtype, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype, tp: TPGroup
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer, rotary, dtype, tp)
        sparse = cfg.moe is not None and cfg.moe.is_sparse(layer)
        self.mlp: nn.Module = SparseMoeBlock(cfg, dtype, tp) if sparse else LlamaMLP(cfg, dtype, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """A pipeline stage holds its own decoder layers (the others are `PPMissing`), the embedding
    when first (or last with tied embeddings) and the final norm when last."""

    def __init__(
        self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, tp: TPGroup, pp: PPStage | None = None
    ) -> None:
        super().__init__()
        pp = pp or PPStage(end_layer=cfg.num_hidden_layers)
        self.pp = pp
        keep_embed = pp.is_first or (pp.is_last and cfg.tie_word_embeddings)
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp) if keep_embed else PPMissing()
        )
        rotary = RotaryEmbedding(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings, max_positions)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, rotary, dtype, tp) if pp.holds_layer(i) else PPMissing()
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if pp.is_last else PPMissing()
        # An EAGLE-3 head reads the residual stream entering these layers (kiln_engine.eagle); each
        # forward pass then leaves them side by side in `aux_hidden` [tokens, len(aux_layers) * hidden].
        self.aux_layers: tuple[int, ...] = ()
        self.aux_hidden: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last stage returns the normed hidden states; earlier stages return the residual
        stream after their layers, which the next stage takes as `hidden_in`."""
        x = self.embed_tokens(input_ids) if hidden_in is None else hidden_in
        residual: torch.Tensor | None = None
        aux: dict[int, torch.Tensor] = {}
        for i in range(self.pp.first_layer, self.pp.end_layer):
            if i in self.aux_layers:
                aux[i] = x if residual is None else x + residual
            x, residual = self.layers[i](positions, x, residual, meta)
        if aux:
            self.aux_hidden = torch.cat([aux[i] for i in self.aux_layers], dim=-1)
        assert residual is not None
        if not self.pp.is_last:
            return x + residual
        norm = self.norm
        assert isinstance(norm, RMSNorm)
        x, _ = norm.add_forward(x, residual)
        return x


class PPMissing(nn.Module):
    """Stands in for a module another pipeline stage holds: no parameters, never called."""


class LlamaForCausalLM(nn.Module):
    supports_pipeline = True  # takes `pp`, and `hidden_in` in forward

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int,
        dtype: torch.dtype,
        tp: TPGroup | None = None,
        pp: PPStage | None = None,
    ) -> None:
        super().__init__()
        tp = tp or TPGroup()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions, dtype, tp, pp)
        last = pp is None or pp.is_last
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp) if last else PPMissing()
        if cfg.tie_word_embeddings and last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta, hidden_in)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def checkpoint_target(self, name: str) -> tuple[str, str, str | int | tuple[int, int] | None]:
        """(module path, parameter, shard) that checkpoint tensor `name` loads into."""
        return packed_target(name)

    @staticmethod
    def split_checkpoint_tensor(
        name: str, tensor: torch.Tensor, config: ModelConfig, pending: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One checkpoint tensor as the tensors this class loads and the build shards and quantizes:
        itself here; families whose checkpoints fuse or stack tensors split them. A tensor that needs
        another one first waits in `pending` (one dict per pass over a checkpoint) and yields nothing."""
        yield name, tensor

    @classmethod
    def checkpoint_tensors(
        cls, weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """A pass over checkpoint tensors, each split by `split_checkpoint_tensor`; fails at its end if
        a tensor still waits for its other half."""
        pending: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            yield from cls.split_checkpoint_tensor(name, tensor, config, pending)
        if pending:
            raise ValueError(f"checkpoint tensors without their other half: {sorted(pending)[:4]}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint tensors by their Hugging Face names; fail on unknown or missing ones."""
        expected = {n for n, _ in self.named_parameters()}
        loaded: set[str] = set()
        for name, tensor in self.checkpoint_tensors(weights, self.config):
            if "rotary_emb." in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith(".input_scale") and self.config.quant.method == "fp8":
                continue  # static activation scales: activations are quantized dynamically per token
            module_path, param, shard = self.checkpoint_target(name)
            try:
                module = self.get_submodule(module_path)
            except AttributeError:
                raise ValueError(
                    f"checkpoint tensor {name!r} does not belong to {self.config.architecture}"
                ) from None
            load_into(module, param, tensor, shard)
            loaded.add(f"{module_path}.{param}")
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(n for n in expected - loaded if not n.endswith("g_idx"))
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
