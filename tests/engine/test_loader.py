"""Loading: config parsing, unsupported models, sharded checkpoints, artifact layout and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln_engine.config import EngineConfig, ModelConfig, UnsupportedModelError, parse_quant, parse_rope
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.loader import (
    MANIFEST_FILE,
    is_artifact,
    load_model,
    load_model_config,
    rank_weights_path,
    weight_files,
)
from kiln_engine.testing import make_tiny_artifact, make_tiny_checkpoint

pytestmark = pytest.mark.engine
CFG = EngineConfig(num_kv_blocks=32, block_size=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck"), "llama")


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path, ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_model_config(tmp_path)
    for arch in (
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ):
        assert arch in str(e.value)


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model_config(tmp_path)


def test_rope_parameters_and_rope_scaling_forms_agree() -> None:
    classic = {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    v5 = {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
        }
    }
    assert parse_rope(classic) == parse_rope(v5)
    assert parse_rope({"rope_scaling": {"type": "linear", "factor": 2.0}}).rope_type == "linear"
    with pytest.raises(UnsupportedModelError, match="proportional"):
        parse_rope({"rope_scaling": {"type": "proportional", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="short_factor"):
        parse_rope({"rope_scaling": {"type": "longrope", "long_factor": [1.0]}})


def test_partial_rotary_only_where_transformers_applies_it(ckpt: Path) -> None:
    base = json.loads((ckpt / "config.json").read_text())  # llama, head_dim 16
    with pytest.raises(UnsupportedModelError, match=r"Phi3ForCausalLM checkpoints .* not LlamaForCausalLM"):
        ModelConfig.from_dict({**base, "partial_rotary_factor": 0.75})
    phi3 = {**base, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    assert ModelConfig.from_dict({**phi3, "partial_rotary_factor": 0.75}).rotary_dim == 12
    assert ModelConfig.from_dict({**phi3, "rope_parameters": {"partial_rotary_factor": 0.5}}).rotary_dim == 8
    with pytest.raises(UnsupportedModelError, match=r"partial_rotary_factor 0\.3125 .* 5 rotated"):
        ModelConfig.from_dict({**phi3, "partial_rotary_factor": 0.3125})


def test_quantization_configs() -> None:
    assert parse_quant(None).method == "none"
    awq = parse_quant({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True})
    assert (awq.method, awq.group_size) == ("awq", 128)
    gptq = parse_quant({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True})
    assert gptq.desc_act
    with pytest.raises(UnsupportedModelError):
        parse_quant({"quant_method": "gptq", "bits": 3})
    with pytest.raises(UnsupportedModelError, match="bitsandbytes"):
        parse_quant({"quant_method": "bitsandbytes"})


def test_qwen_sliding_window_applies_from_max_window_layers(ckpt: Path) -> None:
    base = json.loads((ckpt / "config.json").read_text())
    cfg = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 1,
        }
    )
    assert [cfg.layer_sliding_window(i) for i in range(2)] == [None, 8]
    off = ModelConfig.from_dict({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8})
    assert off.sliding_window is None
    mistral = ModelConfig.from_dict({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 8})
    assert mistral.layer_sliding_window(0) == 8


def test_checkpoint_with_missing_or_foreign_tensors_fails(tmp_path: Path, ckpt: Path) -> None:
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if "layers.1.mlp.down_proj" not in k},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="missing"):
        load_model(tmp_path, CFG, 64)
    save_file(
        {**weights, "model.vision_tower.weight": weights["model.norm.weight"].clone()},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="vision_tower"):
        load_model(tmp_path, CFG, 64)


def test_no_weights_is_a_clear_error(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weight_files(tmp_path)


def test_artifact_serves_like_its_checkpoint(tmp_path: Path, ckpt: Path) -> None:
    art = make_tiny_artifact(ckpt, tmp_path / "art")
    assert is_artifact(art) and not is_artifact(ckpt)
    assert rank_weights_path(art, 0) == art / "rank-0" / "model.safetensors"
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a, c = LLMEngine(art, CFG), LLMEngine(ckpt, CFG)
    assert a.tokenizer is not None
    prompt = a.tokenizer.encode("Hello, world!")
    assert a.generate([prompt], greedy) == c.generate([prompt], greedy)


def test_artifact_layout_errors(tmp_path: Path, ckpt: Path) -> None:
    art = make_tiny_artifact(ckpt, tmp_path / "art", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size 2"):
        load_model(art, CFG, 64)
    rank_weights_path(art, 1).unlink()
    with pytest.raises(FileNotFoundError, match="rank 1"):
        weight_files(art, rank=1)
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    (art / MANIFEST_FILE).write_text(json.dumps({**manifest, "pipeline_parallel_size": 2}))
    with pytest.raises(ValueError, match="pipeline"):
        load_model(art, CFG, 64)


def test_dummy_weights_need_only_config_json(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    engine = LLMEngine(tmp_path, EngineConfig(num_kv_blocks=32, block_size=4, load_format="dummy"))
    assert engine.tokenizer is None
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [len(o) for o in outs] == [4, 4]
    norm = engine.runner.model.model.norm.weight
    assert bool((norm == 1).all())
    q = engine.runner.model.model.layers[0].self_attn.qkv_proj.weight
    assert 0.01 < float(q.std()) < 0.03


@pytest.mark.parametrize(
    "quantization_config",
    [
        {"quant_method": "fp8"},
        {"quant_method": "int8"},
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
    ],
    ids=lambda c: c["quant_method"],
)
def test_dummy_quantized_weights_spread_like_float_ones(
    tmp_path: Path, ckpt: Path, quantization_config: dict[str, object]
) -> None:
    """Random quantized weights as wide as a checkpoint's would make the speed benchmarks' models so
    ill-conditioned that bf16 rounding alone breaks the check's bound (bench/dummy_weight_spread.py):
    dequantized, every format stays within a few times the float weights' std (0.02)."""
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = LLMEngine(tmp_path, EngineConfig(num_kv_blocks=32, block_size=4, load_format="dummy"))
    layer = engine.runner.model.model.layers[0].self_attn.o_proj
    with torch.inference_mode():
        dense = layer.method.apply(layer, torch.eye(layer.in_features), None)
    assert 0.004 < float(dense.std()) < 0.03, quantization_config["quant_method"]


def test_bfloat16_serving_agrees_with_float32(ckpt: Path) -> None:
    f32 = LLMEngine(ckpt, CFG)
    bf16 = LLMEngine(ckpt, EngineConfig(num_kv_blocks=32, block_size=4, dtype="bfloat16"))
    assert bf16.runner.kv_cache.dtype == torch.bfloat16
    assert f32.tokenizer is not None
    prompts = [f32.tokenizer.encode(t) for t in ("Hello, world!", "The quick brown fox jumps")]
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    a, b = f32.generate(prompts, greedy), bf16.generate(prompts, greedy)
    assert [x[0] for x in a] == [x[0] for x in b]  # first tokens agree; later ones may drift
