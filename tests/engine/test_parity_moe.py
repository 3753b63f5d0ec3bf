"""Mixtral, Qwen3-MoE, Phi-3 and YaRN/LongRoPE checkpoints: greedy tokens equal transformers'.

The architecture variants run test_parity's whole matrix (mixed prompt lengths, preemption, prefix-cache
hits, chunked prefill, continuous batching with aborts, padded decode steps) against their own
`model` fixture; the rope variants only change positions, so one mixed batch and chunked prefill
cover them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint, make_tiny_mxfp4_checkpoint
from kiln_engine.tokenizer import Tokenizer
from tests.engine.test_parity import (  # noqa: F401 (collected here, run against this module's fixture)
    GREEDY,
    TEXTS,
    hf_greedy,
    test_batch_of_mixed_lengths,
    test_chunked_prefill,
    test_padded_decode_steps,
    test_preemption_under_kv_pressure,
    test_preemption_with_prefix_cache_and_chunking,
    test_prefix_cache_hits,
    test_staggered_arrivals_and_aborts,
)

pytestmark = pytest.mark.engine
transformers = pytest.importorskip("transformers")

MOE_VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {}),
    # top-3 of 8 without renormalising, and a dense MLP in the middle layer (mlp_only_layers)
    "qwen3-moe-unnormalised-mixed-layers": (
        "qwen3_moe",
        {"norm_topk_prob": False, "num_hidden_layers": 3, "mlp_only_layers": [1]},
    ),
    "phi3-sliding-window": ("phi3", {"sliding_window": 8}),  # fused q/k/v and gate/up in the checkpoint
    # sinks, a window on every other layer, YaRN, biased router and experts, the clamped SwiGLU
    "gpt-oss": ("gpt_oss", {}),
}

ROPE_VARIANTS: dict[str, tuple[str, dict, int | None]] = {
    "qwen2-yarn": (
        "qwen2",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
        None,
    ),
    # DeepSeek-style mscale/mscale_all_dim, a narrower ramp (beta_fast)
    "llama-yarn-mscale": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "beta_fast": 16,
            }
        },
        None,
    ),
    # served within the pretraining length, where transformers uses the short factors
    "qwen3-longrope": (
        "qwen3",
        {
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.25 * i for i in range(8)],
                "long_factor": [2.0 + i for i in range(8)],
                "original_max_position_embeddings": 128,
            }
        },
        128,
    ),
    # Phi-4-mini style: 3/4 of each head rotated, LongRoPE factors for those dimensions (its tied
    # embeddings left out: a tiny random model with them repeats its input whatever RoPE does)
    "phi4-mini-partial-rotary": (
        "phi3",
        {
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 128,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0 + 0.4 * i for i in range(6)],
                "long_factor": [4.0] * 6,
            },
        },
        128,
    ),
    # Phi-3 style: the pretraining length at the top level of config.json
    "phi3-longrope": (
        "phi3",
        {
            "original_max_position_embeddings": 128,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0 + 0.3 * i for i in range(8)],
                "long_factor": [3.0] * 8,
            },
        },
        128,
    ),
}


def _references(path: Path) -> dict:
    tok = Tokenizer.from_dir(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    prompts = [tok.encode(t) for t in TEXTS]
    prompts.append(prompts[3][:-2] + prompts[0])  # shares a long prefix with prompt 3
    return {"prompts": prompts, "refs": {tuple(p): hf_greedy(hf, p) for p in prompts}}


@pytest.fixture(scope="module", params=list(MOE_VARIANTS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    arch, overrides = MOE_VARIANTS[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)
    data = _references(path)
    # Routing must matter: the prompts' continuations differ (a model stuck on one token hides bugs).
    assert len({tuple(r) for r in data["refs"].values()}) > 2
    return path, data


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_scaling_parity(variant: str, tmp_path: Path) -> None:
    arch, overrides, max_model_len = ROPE_VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path, arch, **overrides)
    data = _references(path)
    for budget in (2048, 7):  # one mixed batch, then chunked prefill
        cfg = EngineConfig(
            num_kv_blocks=128, block_size=4, max_tokens_per_step=budget, max_model_len=max_model_len
        )
        outs = LLMEngine(path, cfg).generate(data["prompts"], GREEDY)
        for p, got in zip(data["prompts"], outs, strict=True):
            assert got == data["refs"][tuple(p)], f"{variant}: prompt of {len(p)} tokens diverged"


def test_expert_weights_decide_the_output(tmp_path: Path) -> None:
    """A checkpoint whose experts differ from the reference's changes the tokens: the experts are used."""
    path = make_tiny_checkpoint(tmp_path / "a", "qwen3_moe")
    other = make_tiny_checkpoint(tmp_path / "b", "qwen3_moe", seed=1)
    prompts = [Tokenizer.from_dir(path).encode(TEXTS[0])]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = LLMEngine(path, EngineConfig(num_kv_blocks=32, block_size=4)).generate(prompts, params)
    second = LLMEngine(other, EngineConfig(num_kv_blocks=32, block_size=4)).generate(prompts, params)
    assert first != second


def _build(model: Path, output: Path, *options: str) -> Any:
    from click.testing import CliRunner

    from kiln_engine.cli import main

    args = ["build", "--model", str(model), "--output", str(output), "--device", "cpu", *options]
    return CliRunner().invoke(main, [*args, "--no-measure-capacity", "--no-progress-bar"])


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(tmp_path: Path) -> None:
    """OpenAI's checkpoint format: expert weights in MXFP4 blocks and exponents. Kiln dequantizes
    them as they load, and in the build, and serves transformers' tokens (its own MXFP4
    dequantization, `Mxfp4Config(dequantize=True)`)."""
    path = make_tiny_mxfp4_checkpoint(tmp_path / "mxfp4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    tok = Tokenizer.from_dir(path)
    prompts = [tok.encode(t) for t in TEXTS[:4]]
    refs = [hf_greedy(hf, p) for p in prompts]
    assert len({tuple(r) for r in refs}) > 2
    cfg = EngineConfig(num_kv_blocks=128, block_size=4)
    assert LLMEngine(path, cfg).generate(prompts, GREEDY) == refs
    result = _build(path, tmp_path / "art")
    assert result.exit_code == 0, result.output
    assert LLMEngine(tmp_path / "art", cfg).generate(prompts, GREEDY) == refs


def test_gpt_oss_mxfp4_experts_kept_packed_serve_the_same_tokens(tmp_path: Path) -> None:
    """`--quantization mxfp4` keeps the experts' MXFP4 bytes and exponents in the artifact (a
    quarter of bf16's bytes) and the engine serves them packed: transformers' tokens still. A
    checkpoint without MXFP4 experts is refused for it."""
    from safetensors.torch import load_file

    from kiln_engine.layers.moe import FusedMoE

    path = make_tiny_mxfp4_checkpoint(tmp_path / "mxfp4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    prompts = [Tokenizer.from_dir(path).encode(t) for t in TEXTS[:4]]
    refs = [hf_greedy(hf, p) for p in prompts]
    result = _build(path, tmp_path / "packed", "--quantization", "mxfp4")
    assert result.exit_code == 0, result.output
    stored = load_file(str(tmp_path / "packed" / "rank-0" / "model.safetensors"))
    blocks = load_file(str(path / "model.safetensors"))["model.layers.0.mlp.experts.down_proj_blocks"]
    assert torch.equal(stored["model.layers.0.mlp.experts.1.down_proj.weight"], blocks[1].flatten(-2))
    engine = LLMEngine(tmp_path / "packed", EngineConfig(num_kv_blocks=128, block_size=4))
    experts = [m for m in engine.runner.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.w13_weight.dtype == torch.uint8 for m in experts)
    assert engine.generate(prompts, GREEDY) == refs
    plain_ckpt = make_tiny_checkpoint(tmp_path / "plain", "gpt_oss")
    plain = _build(plain_ckpt, tmp_path / "no", "--quantization", "mxfp4")
    assert plain.exit_code != 0 and "published in MXFP4" in f"{plain.output}{plain.exception}"


def test_mxfp4_blocks_without_their_scales_are_refused(tmp_path: Path) -> None:
    """A checkpoint missing one half of an MXFP4 pair fails to load and to build, naming the other."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_mxfp4_checkpoint(tmp_path / "mxfp4")
    weights = load_file(str(path / "model.safetensors"))
    lone = next(n for n in sorted(weights) if n.endswith("_scales"))
    del weights[lone]
    save_file(weights, str(path / "model.safetensors"))
    blocks = lone.removesuffix("_scales") + "_blocks"
    with pytest.raises(ValueError, match="without their other half") as refused:
        LLMEngine(path, EngineConfig(num_kv_blocks=32, block_size=4))
    assert blocks in str(refused.value)
    result = _build(path, tmp_path / "art")
    assert result.exit_code != 0 and blocks in f"{result.output}{result.exception}"
