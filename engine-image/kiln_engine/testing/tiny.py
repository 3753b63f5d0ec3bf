"""Tiny random checkpoints in Hugging Face format, with a real BPE tokenizer trained in-process.

`make_tiny_checkpoint(path, arch)` writes config.json, safetensors weights (optionally sharded with
an index), generation_config.json, tokenizer.json and tokenizer_config.json (chat template
included) for Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE, Phi-3, Gemma 2 or Gemma 3 (text).
transformers can load the result, so tests compare our engine token for token against
`AutoModelForCausalLM`; the local demo serves it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

CHAT_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
Kiln compiles an engine for the target GPU once, caches it, and places serving pods where their
tensor-parallel group shares an NVLink domain. The quick brown fox jumps over the lazy dog.
A paged key-value cache stores attention keys and values in fixed-size blocks; prefix caching
shares the blocks of a common prompt between requests. Continuous batching admits new requests
while others are still decoding, and chunked prefill splits a long prompt across several steps.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 2048. Symbols: + - * / = ( ) [ ] { } < > : ; , .
Once upon a time there was a little kernel that wanted to run fast on every accelerator it met.
Café, naïve, über, 東京, 😀 — unicode text must round-trip through the byte-level tokenizer.
"""

ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "add_bos": True},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "add_bos": True},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "add_bos": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "add_bos": False},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "add_bos": True},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "add_bos": False},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "add_bos": True},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "add_bos": True},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "add_bos": True},
    "gpt_oss": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "add_bos": True},
}


@lru_cache(maxsize=4)
def build_tokenizer_json(vocab_size: int = 384, add_bos: bool = True) -> str:
    """Train a byte-level BPE on a small corpus; returns tokenizer.json contents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return str(tok.to_str())


def _id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    assert i is not None, token
    return int(i)


def _config(arch: str, vocab: int, bos: int, eos: int, **overrides: Any) -> dict[str, Any]:
    base = {k: v for k, v in ARCHS[arch].items() if k != "add_bos"}
    cfg: dict[str, Any] = {
        **base,
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "mistral":
        cfg["sliding_window"] = None
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    if arch in ("qwen3", "qwen3_moe"):
        cfg["attention_bias"] = False
    if arch == "mixtral":
        cfg.update(sliding_window=None, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    if arch == "phi3":
        cfg.update(sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=eos)
    if arch == "qwen3_moe":
        cfg.update(
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
        )
    if arch.startswith("gemma"):
        # head_dim != hidden / heads, a query scale other than head_dim's, a window shorter than the
        # test prompts, soft-caps and rope bases small enough that each one changes the outputs
        del cfg["hidden_act"]
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=8,
            final_logit_softcapping=5.0,
            tie_word_embeddings=True,
            pad_token_id=eos,
        )
    if arch == "gpt_oss":
        # a window shorter than the test prompts on every other layer, YaRN as its checkpoints
        # have it, and a SwiGLU clamp small enough to bite with these weights
        cfg.update(
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            attention_bias=True,
            swiglu_limit=0.3,
            pad_token_id=eos,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 128,
            },
        )
    if arch == "gemma2":
        cfg.update(attn_logit_softcapping=3.0)  # layer_types left to the default (every other layer)
    if arch == "gemma3":
        cfg.update(
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_local_base_freq=100.0,
        )
    cfg.update(overrides)
    return cfg


def random_weights(cfg: dict[str, Any], seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random tensors under Hugging Face names for a Llama-family (or its MoE variants') config."""
    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    arch = cfg["architectures"][0]
    qkv_bias = arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False)
    gemma = arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

    def rnd(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(n: int) -> torch.Tensor:  # Gemma's norms scale by (1 + weight)
        return (0.0 if gemma else 1.0) + rnd(n, scale=0.1)

    # Gemma multiplies embeddings by sqrt(hidden): small rows, or the tied head repeats the input token
    embed_std = 0.4 * h**-0.5 if gemma else 1.0
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(v, h, scale=embed_std)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(heads * d, h)
        w[p + "self_attn.k_proj.weight"] = rnd(kv * d, h)
        w[p + "self_attn.v_proj.weight"] = rnd(kv * d, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, heads * d)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = rnd(heads * d)
            w[p + "self_attn.k_proj.bias"] = rnd(kv * d)
            w[p + "self_attn.v_proj.bias"] = rnd(kv * d)
        if arch == "GptOssForCausalLM":
            w[p + "self_attn.o_proj.bias"] = rnd(h)
            w[p + "self_attn.sinks"] = rnd(heads, scale=2.0)  # large enough to change the outputs
        if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"):
            w[p + "self_attn.q_norm.weight"] = norm(d)
            w[p + "self_attn.k_norm.weight"] = norm(d)
        w.update(_mlp_weights(cfg, i, rnd))
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm(h)
            w[p + "post_feedforward_layernorm.weight"] = norm(h)
    w["model.norm.weight"] = norm(h)
    if arch == "Phi3ForCausalLM":  # Phi-3 checkpoints fuse q/k/v and gate/up
        w = _fuse_phi3(w, cfg["num_hidden_layers"])
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = rnd(v, h)
    return w


def _fuse_phi3(w: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        w[a + "qkv_proj.weight"] = torch.cat([w.pop(a + f"{x}_proj.weight") for x in "qkv"])
        w[m + "gate_up_proj.weight"] = torch.cat([w.pop(m + "gate_proj.weight"), w.pop(m + "up_proj.weight")])
    return w


def _mlp_weights(
    cfg: dict[str, Any], layer: int, rnd: Callable[..., torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One layer's MLP under its checkpoint names: dense, or a router and experts (Mixtral, Qwen3-MoE)."""
    h, p = cfg["hidden_size"], f"model.layers.{layer}."
    arch = cfg["architectures"][0]
    qwen_sparse = arch == "Qwen3MoeForCausalLM" and (
        layer not in cfg.get("mlp_only_layers", []) and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0
    )
    if arch == "GptOssForCausalLM":
        return _gpt_oss_experts(cfg, layer, rnd)
    if arch == "MixtralForCausalLM":
        block, names, experts, inter = "block_sparse_moe", ("w1", "w3", "w2"), cfg["num_local_experts"], None
    elif qwen_sparse:
        block, names, experts = "mlp", ("gate_proj", "up_proj", "down_proj"), cfg["num_experts"]
        inter = cfg["moe_intermediate_size"]
    else:
        i = cfg["intermediate_size"]
        return {
            p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
        }
    inter = inter or cfg["intermediate_size"]
    # A router with a larger spread than the experts, so each token's top-k choice is clear-cut.
    w = {f"{p}{block}.gate.weight": rnd(experts, h, scale=0.5)}
    for e in range(experts):
        gate, up, down = names
        w[f"{p}{block}.experts.{e}.{gate}.weight"] = rnd(inter, h)
        w[f"{p}{block}.experts.{e}.{up}.weight"] = rnd(inter, h)
        w[f"{p}{block}.experts.{e}.{down}.weight"] = rnd(h, inter)
    return w


def _gpt_oss_experts(
    cfg: dict[str, Any], layer: int, rnd: Callable[..., torch.Tensor]
) -> dict[str, torch.Tensor]:
    """gpt-oss's biased router and its experts stacked, gate/up interleaved, [E, in, out]."""
    h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    p = f"model.layers.{layer}.mlp."
    return {
        p + "router.weight": rnd(e, h, scale=0.5),
        p + "router.bias": rnd(e),
        p + "experts.gate_up_proj": rnd(e, h, 2 * i),
        p + "experts.gate_up_proj_bias": rnd(e, 2 * i),
        p + "experts.down_proj": rnd(e, i, h),
        p + "experts.down_proj_bias": rnd(e, h),
    }


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    shards: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint with tokenizer to `path`; returns `path`.

    `config_overrides` replace config.json entries, e.g. `rope_scaling={...}`,
    `tie_word_embeddings=True`, `num_hidden_layers=3`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(ARCHS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    add_bos = bool(ARCHS[arch]["add_bos"])
    tok_json = build_tokenizer_json(add_bos=add_bos)
    tok = Tokenizer.from_str(tok_json)
    bos, eos, im_end = (_id(tok, t) for t in (BOS, EOS, IM_END))
    cfg = _config(arch, tok.get_vocab_size(), bos, eos, **config_overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": [eos, im_end]}, indent=2)
    )
    (out / "tokenizer.json").write_text(tok_json)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": IM_END if arch.startswith("qwen") else EOS,
                "pad_token": PAD,
                "add_bos_token": add_bos,
                "model_max_length": cfg["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE.replace("add_bos", "true" if add_bos else "false"),
            },
            indent=2,
        )
    )
    weights = random_weights(cfg, seed=seed)
    for old in out.glob("*.safetensors"):
        old.unlink()
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(weights)
        index: dict[str, str] = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n].contiguous() for n in names[s::shards]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            index.update(dict.fromkeys(part, fname))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
        )
    return out


def make_tiny_artifact(
    checkpoint: str | Path,
    out: str | Path,
    *,
    quantization: str = "none",
    per_channel: bool = True,
    tensor_parallel_size: int = 1,
) -> Path:
    """Write a Kiln artifact (manifest, config, tokenizer, rank-<r>/model.safetensors) from a checkpoint.

    A test double of `kiln-engine build`'s conversion step, using the same pure functions
    (`quantize_state_dict`, `shard_tensor`) and the layout constants of `kiln_engine.loader`.
    """
    import shutil

    from kiln_engine.layers.sharding import shard_tensor
    from kiln_engine.loader import (
        CONFIG_FILE,
        MANIFEST_FILE,
        MANIFEST_QUANT,
        MANIFEST_TP,
        TOKENIZER_FILES,
        iter_weights,
        rank_weights_path,
        weight_files,
    )
    from kiln_engine.quantization import quantize_state_dict

    src, dst = Path(checkpoint), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / CONFIG_FILE).read_text())
    for name in (CONFIG_FILE, *TOKENIZER_FILES):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    weights = dict(iter_weights(weight_files(src)))
    if quantization in ("fp8", "int8"):
        weights = quantize_state_dict(weights, quantization, per_channel)
    for rank in range(tensor_parallel_size):
        part = {
            n: shard_tensor(n, t, rank, tensor_parallel_size, cfg["num_key_value_heads"]).contiguous()
            for n, t in weights.items()
        }
        path = rank_weights_path(dst, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(part, str(path), metadata={"format": "pt"})
    manifest = {MANIFEST_TP: tensor_parallel_size, MANIFEST_QUANT: quantization, "dtype": "float32"}
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return dst


def main(argv: list[str] | None = None) -> None:
    """`python -m kiln_engine.testing.tiny OUT_DIR [--arch llama|mistral|qwen2|qwen3] [--seed N]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random checkpoint with a real tokenizer.")
    parser.add_argument("out")
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_checkpoint(args.out, args.arch, seed=args.seed))


if __name__ == "__main__":
    main()


def make_tiny_mxfp4_checkpoint(path: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """A tiny gpt-oss checkpoint whose expert weights are MXFP4 blocks and exponents, as OpenAI's
    (`*_blocks` [E, out, in/32, 16], `*_scales` [E, out, in/32]); hidden and expert sizes of 64, so
    every input dimension holds whole groups of 32 (at two tensor-parallel ranks too)."""
    from safetensors.torch import load_file

    sizes = {"hidden_size": 64, "intermediate_size": 64, **config_overrides}
    out = make_tiny_checkpoint(path, "gpt_oss", **sizes)
    weights = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = weights.pop(name).shape
        shape = (experts, outputs, inputs // 32)
        weights[name + "_blocks"] = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.uint8)
        weights[name + "_scales"] = torch.randint(119, 124, shape, generator=g, dtype=torch.uint8)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_tiny_eagle_head(
    path: str | Path, target: str | Path, seed: int = 0, input_norm: bool = False
) -> Path:
    """A random EAGLE-1 head for the tiny checkpoint at `target`, as EAGLE's checkpoints are laid
    out: config.json of a one-layer Llama of the target's sizes, `fc.weight` [hidden, 2 * hidden],
    `layers.0.*` without `input_layernorm` (unless `input_norm`), and a copy of the target's
    embedding (which the engine does not load: the target's serves)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = json.loads((Path(target) / "config.json").read_text())
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    eos = tcfg["eos_token_id"]
    cfg = _config("llama", tcfg["vocab_size"], tcfg["bos_token_id"], eos, num_hidden_layers=1)
    cfg.update({k: tcfg[k] for k in (*sizes, "max_position_embeddings", "rope_theta")})
    weights = random_weights(cfg, seed=seed)
    head = {n.removeprefix("model."): t for n, t in weights.items() if n.startswith("model.layers.0.")}
    if not input_norm:
        del head["layers.0.input_layernorm.weight"]
    h = cfg["hidden_size"]
    head["fc.weight"] = torch.randn(h, 2 * h, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    from kiln_engine.loader import iter_weights, weight_files

    embed = dict(iter_weights(weight_files(target)))["model.embed_tokens.weight"]
    head["embed_tokens.weight"] = embed
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(head, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_tiny_eagle3_head(
    path: str | Path, target: str | Path, seed: int = 0, draft_vocab_size: int = 96
) -> Path:
    """A random EAGLE-3 head for the tiny checkpoint at `target`, as EAGLE-3's checkpoints are laid
    out: `fc.weight` [hidden, 3 * hidden], `midlayer.*` (attention over 2 * hidden inputs, a
    `hidden_norm`), `norm.weight`, its own `lm_head.weight` [draft vocabulary, hidden] and `d2t`
    (model id = draft id + d2t[draft id]) over a random sorted subset of the model's vocabulary."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = json.loads((Path(target) / "config.json").read_text())
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    vocab = tcfg["vocab_size"]
    cfg = _config("llama", vocab, tcfg["bos_token_id"], tcfg["eos_token_id"], num_hidden_layers=1)
    cfg.update({k: tcfg[k] for k in (*sizes, "max_position_embeddings", "rope_theta")})
    cfg.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab_size)
    g = torch.Generator().manual_seed(seed)
    h, heads, kv, d = (cfg[k] for k in sizes[:1] + sizes[2:])

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    prefix = "model.layers.0."
    layer = {
        n.removeprefix(prefix): t for n, t in random_weights(cfg, seed=seed).items() if n.startswith(prefix)
    }
    for name, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
        layer[f"self_attn.{name}.weight"] = rnd(rows, 2 * h)  # over (embedding, state) side by side
    layer["hidden_norm.weight"] = 1.0 + rnd(h)
    kept = torch.randperm(vocab, generator=g)[:draft_vocab_size].sort().values
    weights = {f"midlayer.{n}": t for n, t in layer.items()}
    weights.update(
        {"fc.weight": rnd(h, 3 * h), "norm.weight": 1.0 + rnd(h), "lm_head.weight": rnd(draft_vocab_size, h)}
    )
    weights["d2t"] = kept - torch.arange(draft_vocab_size)
    weights["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, kept, True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
