"""Quantization: fp8/int8 converters and kernels, AWQ/GPTQ unpacking against a reference packer, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln_engine.config import EngineConfig, QuantConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kiln_engine.layers.parallel import TPGroup
from kiln_engine.quantization import (
    AWQ_ORDER,
    dequantize_fp8,
    is_quantizable,
    quantize_fp8,
    quantize_int8,
    unpack_awq,
    unpack_gptq,
)
from kiln_engine.scheduler import ScheduledChunk
from kiln_engine.sequence import Sequence
from kiln_engine.testing import make_tiny_artifact, make_tiny_checkpoint

pytestmark = pytest.mark.engine
TP1 = TPGroup()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- reference int4 packers, written from the published formats ------------------------------------
def _to_int32(u: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u.astype(np.uint32).view(np.int32).copy())


def pack_awq_cols(values: np.ndarray) -> torch.Tensor:
    """AutoAWQ: 8 columns per int32, column AWQ_ORDER[i] in nibble i."""
    rows, cols = values.shape
    packed = np.zeros((rows, cols // 8), dtype=np.uint64)
    for j in range(cols // 8):
        for i in range(8):
            packed[:, j] |= values[:, j * 8 + AWQ_ORDER[i]].astype(np.uint64) << np.uint64(4 * i)
    return _to_int32(packed)


def pack_gptq_rows(values: np.ndarray) -> torch.Tensor:
    """GPTQ qweight: 8 consecutive input rows per int32, row i in nibble i."""
    rows, cols = values.shape
    packed = np.zeros((rows // 8, cols), dtype=np.uint64)
    for r in range(rows // 8):
        for i in range(8):
            packed[r] |= values[r * 8 + i].astype(np.uint64) << np.uint64(4 * i)
    return _to_int32(packed)


def pack_gptq_cols(values: np.ndarray) -> torch.Tensor:
    rows, cols = values.shape
    packed = np.zeros((rows, cols // 8), dtype=np.uint64)
    for j in range(cols // 8):
        for i in range(8):
            packed[:, j] |= values[:, j * 8 + i].astype(np.uint64) << np.uint64(4 * i)
    return _to_int32(packed)


def random_int4(
    in_f: int, out_f: int, group: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(in_f, out_f))
    z = rng.integers(1, 15, size=(in_f // group, out_f))
    s = torch.from_numpy(rng.uniform(0.01, 0.05, size=(in_f // group, out_f)).astype(np.float32))
    return q, z, s


# -- fp8 / int8 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_roundtrip(per_channel: bool) -> None:
    w = torch.randn(64, 96) * torch.linspace(0.01, 2.0, 64)[:, None]
    q, scale = quantize_fp8(w, per_channel)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == ((64,) if per_channel else ())
    assert rel_err(dequantize_fp8(q, scale, torch.float32), w) < 0.04


def test_int8_roundtrip() -> None:
    w = torch.randn(64, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert rel_err(q.float() * scale[:, None], w) < 0.01


@pytest.mark.parametrize(("method", "tol"), [("fp8", 0.05), ("int8", 0.01)])
def test_quantized_linear_close_to_float(method: str, tol: float) -> None:
    w = torch.randn(48, 32) * 0.1
    x = torch.randn(5, 32)
    layer = RowParallelLinear(32, 48, False, QuantConfig(method=method), torch.float32, TP1)
    q, scale = quantize_fp8(w, True) if method == "fp8" else quantize_int8(w)
    layer.load("weight", q)
    layer.load("weight_scale", scale)
    assert rel_err(layer(x), F.linear(x, w)) < tol


def test_fp8_per_tensor_scales_merge_into_qkv() -> None:
    """q, k and v with different per-tensor scales share one fused matmul with per-channel scales."""
    layer = QKVParallelLinear(32, 8, 4, 2, False, QuantConfig(method="fp8"), torch.float32, TP1)
    ws = {"q": torch.randn(32, 32), "k": torch.randn(16, 32) * 5, "v": torch.randn(16, 32) * 0.1}
    for shard, w in ws.items():
        q, scale = quantize_fp8(w, per_channel=False)
        assert scale.dim() == 0
        layer.load("weight", q, shard)
        layer.load("weight_scale", scale, shard)
    x = torch.randn(3, 32)
    ref = F.linear(x, torch.cat(list(ws.values())))
    assert rel_err(layer(x), ref) < 0.05


def test_is_quantizable() -> None:
    assert is_quantizable("model.layers.0.self_attn.q_proj.weight")
    assert is_quantizable("model.layers.3.mlp.down_proj.weight")
    assert not is_quantizable("model.layers.0.self_attn.q_proj.bias")
    assert not is_quantizable("model.embed_tokens.weight")
    assert not is_quantizable("lm_head.weight")
    assert not is_quantizable("model.layers.0.input_layernorm.weight")


# -- int4 --------------------------------------------------------------------------------------------
def test_awq_unpack_matches_reference() -> None:
    q, z, s = random_int4(64, 32, group=16)
    dense_t = torch.from_numpy(q - np.repeat(z, 16, axis=0)).float() * s.repeat_interleave(16, 0)  # [in, out]
    got = unpack_awq(pack_awq_cols(q), pack_awq_cols(z), s)
    assert torch.equal(got, dense_t.t())
    layer = ColumnParallelLinear(
        64, 32, False, QuantConfig(method="awq", bits=4, group_size=16), torch.float32, TP1
    )
    layer.load("qweight", pack_awq_cols(q))
    layer.load("qzeros", pack_awq_cols(z))
    layer.load("scales", s)
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), x @ dense_t, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_unpack_matches_reference(act_order: bool) -> None:
    q, z, s = random_int4(64, 32, group=16, seed=1)
    g_idx = np.arange(64) // 16
    if act_order:
        g_idx = np.random.default_rng(2).permutation(g_idx)
    dense_t = torch.from_numpy(q - z[g_idx]).float() * s[torch.from_numpy(g_idx)]
    qzeros = pack_gptq_cols(z - 1)  # v1 format stores zero - 1
    got = unpack_gptq(pack_gptq_rows(q), qzeros, s, torch.from_numpy(g_idx).int())
    assert torch.equal(got, dense_t.t())
    layer = RowParallelLinear(
        64, 32, False, QuantConfig(method="gptq", bits=4, group_size=16), torch.float32, TP1
    )
    layer.load("qweight", pack_gptq_rows(q))
    layer.load("qzeros", qzeros)
    layer.load("scales", s)
    layer.load("g_idx", torch.from_numpy(g_idx).int())
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), x @ dense_t, atol=1e-5)


# -- whole models ------------------------------------------------------------------------------------
def prompt_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Logits of every prompt position, through the engine's own model runner and paged cache."""
    seq = Sequence("probe", list(prompt), SamplingParams())
    assert engine.block_manager.allocate_slots(seq, len(prompt))
    runner = engine.runner
    ids, pos, meta, _, _ = runner._prepare([ScheduledChunk(seq, 0, len(prompt))])
    runner.backend.prepare(meta)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(ids, pos, meta))
    engine.block_manager.free(seq)
    return logits


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base"), "llama")


@pytest.mark.parametrize(
    ("quant", "per_channel", "tol"), [("fp8", True, 0.1), ("fp8", False, 0.1), ("int8", True, 0.02)]
)
def test_quantized_artifact_logits_close_to_float(
    base: Path, tmp_path: Path, quant: str, per_channel: bool, tol: float
) -> None:
    art = make_tiny_artifact(base, tmp_path / "art", quantization=quant, per_channel=per_channel)
    ref_engine = LLMEngine(base, EngineConfig(num_kv_blocks=32, block_size=4))
    q_engine = LLMEngine(art, EngineConfig(num_kv_blocks=32, block_size=4))
    assert q_engine.model_config.quant.method == quant
    assert q_engine.tokenizer is not None
    prompt = q_engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    ref, got = prompt_logits(ref_engine, prompt), prompt_logits(q_engine, prompt)
    assert rel_err(got, ref) < tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_checkpoint_equals_its_dequantized_float_twin(
    base: Path, tmp_path: Path, method: str, arch: str
) -> None:
    """An AWQ/GPTQ checkpoint serves the same tokens as a float checkpoint holding its dequantized
    weights; Phi-3's fused qkv_proj/gate_up_proj are quantized whole, as its int4 checkpoints are,
    and split by the loader and by `kiln-engine build` alike."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from kiln_engine.cli import main

    if arch == "phi3":
        base = make_tiny_checkpoint(tmp_path / "phi3", "phi3")
    group = 16
    float_dir, q_dir = tmp_path / "float", tmp_path / "int4"
    weights = load_file(str(base / "model.safetensors"))
    deq: dict[str, torch.Tensor] = {}
    packed: dict[str, torch.Tensor] = {}
    for i, (name, w) in enumerate(sorted(weights.items())):
        if not (is_quantizable(name) or name.endswith(("qkv_proj.weight", "gate_up_proj.weight"))):
            deq[name] = packed[name] = w
            continue
        out_f, in_f = w.shape
        q, z, s = random_int4(in_f, out_f, group, seed=i)
        g_idx = np.arange(in_f) // group
        dense_t = torch.from_numpy(q - z[g_idx]).float() * s[torch.from_numpy(g_idx)]
        prefix = name.removesuffix("weight")
        deq[name] = dense_t.t().contiguous()
        packed[prefix + "scales"] = s
        if method == "awq":
            packed[prefix + "qweight"] = pack_awq_cols(q)
            packed[prefix + "qzeros"] = pack_awq_cols(z)
        else:
            packed[prefix + "qweight"] = pack_gptq_rows(q)
            packed[prefix + "qzeros"] = pack_gptq_cols(z - 1)
            packed[prefix + "g_idx"] = torch.from_numpy(g_idx).int()
    assert any("qkv_proj.qweight" in n for n in packed) == (arch == "phi3")
    cfg = json.loads((base / "config.json").read_text())
    for d, tensors, qcfg in (
        (float_dir, deq, None),
        (q_dir, packed, {"quant_method": method, "bits": 4, "group_size": group}),
    ):
        d.mkdir()
        for f in base.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                (d / f.name).write_bytes(f.read_bytes())
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **({"quantization_config": qcfg} if qcfg else {})}))
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    f_engine = LLMEngine(float_dir, EngineConfig(num_kv_blocks=32, block_size=4))
    q_engine = LLMEngine(q_dir, EngineConfig(num_kv_blocks=32, block_size=4))
    assert f_engine.tokenizer is not None
    prompt = f_engine.tokenizer.encode("Hello, world! How are you")
    assert torch.allclose(prompt_logits(q_engine, prompt), prompt_logits(f_engine, prompt), atol=1e-4)
    want = f_engine.generate([prompt], greedy)
    assert q_engine.generate([prompt], greedy) == want
    if arch == "phi3":
        args = ["build", "--model", str(q_dir), "--output", str(tmp_path / "art"), "--device", "cpu"]
        result = CliRunner().invoke(main, [*args, "--no-measure-capacity", "--no-progress-bar"])
        assert result.exit_code == 0, result.output
        built = LLMEngine(tmp_path / "art", EngineConfig(num_kv_blocks=32, block_size=4))
        assert built.generate([prompt], greedy) == want
