"""MoE checkpoints across tensor-parallel ranks and through `kiln-engine build`.

Experts split like the dense MLP (gate/up by intermediate rows, down by columns, routers whole), so
TP=2 over gloo must give TP=1's greedy tokens, from a checkpoint and from a built fp8 artifact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kiln_engine.build.manifest import verify_artifact
from kiln_engine.cli import main
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.layers.sharding import shard_tensor, tp_shard_dim
from kiln_engine.quantization import is_quantizable
from kiln_engine.testing import make_tiny_checkpoint, make_tiny_mxfp4_checkpoint
from tests.engine.test_tensor_parallel import run_ranks

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    ("name", "dim", "quantized"),
    [
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", 0, True),
        ("model.layers.0.block_sparse_moe.experts.3.w3.weight_scale", 0, False),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", 1, True),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight_scale", None, False),
        ("model.layers.0.block_sparse_moe.gate.weight", None, False),
        ("model.layers.1.mlp.experts.7.gate_proj.weight", 0, True),
        ("model.layers.1.mlp.experts.7.down_proj.weight", 1, True),
        ("model.layers.1.mlp.gate.weight", None, False),
    ],
)
def test_expert_tensors_shard_like_the_dense_mlp(name: str, dim: int | None, quantized: bool) -> None:
    assert tp_shard_dim(name) == dim
    assert is_quantizable(name) == quantized


def build(ckpt: Path, out: Path, *options: str) -> Path:
    args = ["build", "--model", str(ckpt), "--output", str(out), "--device", "cpu", "--no-measure-capacity"]
    result = CliRunner().invoke(main, [*args, *options, "--no-progress-bar"])
    assert result.exit_code == 0, result.output
    verify_artifact(out)
    return out


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], Path]:
    """Qwen3-MoE with a dense layer among sparse ones, and its TP=1 tokens."""
    d = tmp_path_factory.mktemp("moe-tp")
    ckpt = make_tiny_checkpoint(d / "ckpt", "qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    return ckpt, run_ranks(ckpt, 1, d / "tp1.json"), d


@pytest.mark.slow
def test_tp2_moe_from_checkpoint_matches_tp1(qwen3_moe: tuple[Path, list[list[int]], Path]) -> None:
    ckpt, ref, d = qwen3_moe
    assert len({tuple(r) for r in ref}) > 1
    assert run_ranks(ckpt, 2, d / "tp2.json") == ref


@pytest.mark.slow
def test_built_fp8_mixtral_serves_the_same_tokens_at_tp2_as_tp1(tmp_path: Path) -> None:
    """`kiln-engine build --quantization fp8 --tp 2`: expert weights fp8 with per-channel scales,
    column-parallel experts' scales split with their rows, and the shards serve TP=1's tokens."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mixtral")
    one = build(ckpt, tmp_path / "fp8-1", "--quantization", "fp8")
    two = build(ckpt, tmp_path / "fp8-2", "--quantization", "fp8", "--tp", "2")
    full = load_file(str(one / "rank-0/model.safetensors"))
    rank1 = load_file(str(two / "rank-1/model.safetensors"))
    w1 = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    assert full[w1].dtype == torch.float8_e4m3fn
    assert full["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    for name in (w1, w1 + "_scale", w1.replace("w1", "w2"), w1.replace("w1", "w2") + "_scale"):
        want = shard_tensor(name, full[name].float(), 1, 2, num_kv_heads=2)
        assert torch.equal(rank1[name].float(), want), name
    assert run_ranks(two, 2, tmp_path / "two.json") == run_ranks(one, 1, tmp_path / "one.json")


def test_built_moe_artifact_serves_the_checkpoints_tokens(
    qwen3_moe: tuple[Path, list[list[int]], Path], tmp_path: Path
) -> None:
    ckpt, ref, _ = qwen3_moe
    art = build(ckpt, tmp_path / "art")
    assert run_ranks(art, 1, tmp_path / "art.json") == ref


def test_build_refuses_a_tp_size_the_experts_do_not_split_into(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe", moe_intermediate_size=34)
    args = ["build", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--tp", "4", "--no-measure-capacity", "--no-progress-bar"])
    assert result.exit_code != 0
    assert "experts' intermediate size 34 is not divisible by 4" in result.output
    assert not (tmp_path / "out").exists()


def test_phi3_build_splits_fused_tensors_and_serves_the_checkpoints_tokens(tmp_path: Path) -> None:
    """Phi-3's fused qkv_proj/gate_up_proj become Llama's q/k/v and gate/up in the artifact, so
    they shard (and quantize) like every other Llama-family weight; Phi-4-mini's partial rotary
    factor goes through the build with them."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "phi3", partial_rotary_factor=0.75)
    two = build(ckpt, tmp_path / "tp2", "--tp", "2")
    rank1 = load_file(str(two / "rank-1/model.safetensors"))
    assert not [n for n in rank1 if "qkv_proj" in n or "gate_up_proj" in n]
    fused = load_file(str(ckpt / "model.safetensors"))
    qkv = fused["model.layers.0.self_attn.qkv_proj.weight"]
    gate_up = fused["model.layers.0.mlp.gate_up_proj.weight"]
    want = {
        "self_attn.q_proj": qkv[: 4 * 16],  # 4 heads of 16, then 2 KV heads each for k and v
        "self_attn.v_proj": qkv[6 * 16 :],
        "mlp.up_proj": gate_up[128:],  # gate first, then up (intermediate 128)
    }
    for module, full in want.items():
        name = f"model.layers.0.{module}.weight"
        assert torch.equal(rank1[name], shard_tensor(name, full, 1, 2, num_kv_heads=2)), name
    one = build(ckpt, tmp_path / "fp8", "--quantization", "fp8")
    assert load_file(str(one / "rank-0/model.safetensors"))["model.layers.1.mlp.gate_proj.weight"].dtype == (
        torch.float8_e4m3fn
    )
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 42, 99, 3], [200, 11, 7]]
    art = build(ckpt, tmp_path / "tp1")
    cfg = EngineConfig(num_kv_blocks=32, block_size=4)
    assert LLMEngine(art, cfg).generate(prompts, params) == LLMEngine(ckpt, cfg).generate(prompts, params)


@pytest.mark.slow
def test_gpt_oss_built_at_tp2_serves_the_checkpoints_tokens(tmp_path: Path) -> None:
    """gpt-oss's stacked experts become one tensor per expert and projection in the artifact;
    at TP=2 each rank holds half of every expert's gate/up rows (and their biases) and half of the
    heads' sinks, adds the down bias once after the all-reduce, and serves TP=1's tokens."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "gpt_oss")
    ref = run_ranks(ckpt, 1, tmp_path / "tp1.json")
    assert len({tuple(r) for r in ref}) > 1
    two = build(ckpt, tmp_path / "tp2", "--tp", "2")
    rank1 = load_file(str(two / "rank-1/model.safetensors"))
    assert not [n for n in rank1 if "gate_up_proj" in n or "router" in n]
    stacked = load_file(str(ckpt / "model.safetensors"))["model.layers.0.mlp.experts.gate_up_proj_bias"]
    up_bias = rank1["model.layers.0.mlp.experts.3.up_proj.bias"]
    assert torch.equal(up_bias, stacked[3, 1::2].chunk(2)[1])  # interleaved: up is every odd column
    assert run_ranks(two, 2, tmp_path / "tp2.json") == ref
    fp8 = build(ckpt, tmp_path / "fp8", "--quantization", "fp8")
    weights = load_file(str(fp8 / "rank-0/model.safetensors"))
    assert weights["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert len(run_ranks(fp8, 1, tmp_path / "fp8.json")) == len(ref)


@pytest.mark.slow
def test_gpt_oss_mxfp4_experts_packed_at_tp2_serve_the_dequantized_tokens(tmp_path: Path) -> None:
    """Packed MXFP4 experts split over two ranks: gate/up by output rows (bytes and exponents
    alike), down by inputs, its exponents with them (32 inputs each); TP=2 then serves the tokens
    of the checkpoint dequantized at TP=1."""
    ckpt = make_tiny_mxfp4_checkpoint(tmp_path / "ckpt")  # experts' intermediate size 64: 32 per rank
    ref = run_ranks(ckpt, 1, tmp_path / "tp1.json")
    assert len({tuple(r) for r in ref}) > 1
    two = build(ckpt, tmp_path / "tp2", "--tp", "2", "--quantization", "mxfp4")
    rank1 = load_file(str(two / "rank-1/model.safetensors"))
    scales = load_file(str(ckpt / "model.safetensors"))["model.layers.1.mlp.experts.down_proj_scales"]
    assert torch.equal(rank1["model.layers.1.mlp.experts.2.down_proj.weight_scale"], scales[2][:, 1:])
    assert rank1["model.layers.1.mlp.experts.2.down_proj.weight"].shape == (64, 16)  # [H, I/2/tp]
    assert run_ranks(two, 2, tmp_path / "tp2.json") == ref


@pytest.mark.slow
def test_expert_parallel_ranks_hold_whole_experts_and_serve_tp1s_tokens(
    qwen3_moe: tuple[Path, list[list[int]], Path], tmp_path: Path
) -> None:
    """Expert parallel at TP=2: each rank holds half the experts whole (the other half not at all),
    from the checkpoint as loaded and from `build --expert-parallel`, and serves TP=1's tokens."""
    ckpt, ref, _ = qwen3_moe
    assert run_ranks(ckpt, 2, tmp_path / "ckpt.json", EXPERT_PARALLEL="1") == ref
    art = build(ckpt, tmp_path / "ep2", "--tp", "2", "--expert-parallel")
    full = load_file(str(ckpt / "model.safetensors"))
    for rank, held in ((0, range(0, 4)), (1, range(4, 8))):  # the tiny Qwen3-MoE has 8 experts
        shard = load_file(str(art / f"rank-{rank}/model.safetensors"))
        experts = {int(n.split(".experts.")[1].split(".")[0]) for n in shard if ".experts." in n}
        assert experts == set(held), (rank, experts)
        name = f"model.layers.0.mlp.experts.{held[0]}.down_proj.weight"
        assert torch.equal(shard[name], full[name])  # whole, not sliced
    assert run_ranks(art, 2, tmp_path / "ep2.json") == ref


@pytest.mark.slow
def test_expert_parallel_gpt_oss_with_packed_mxfp4_experts(tmp_path: Path) -> None:
    """gpt-oss's biased experts, kept MXFP4, spread whole over two ranks: every rank keeps every
    expert's down bias (added once after the all-reduce); the tokens are the dequantized TP=1's."""
    ckpt = make_tiny_mxfp4_checkpoint(tmp_path / "ckpt")
    ref = run_ranks(ckpt, 1, tmp_path / "tp1.json")
    art = build(ckpt, tmp_path / "ep2", "--tp", "2", "--expert-parallel", "--quantization", "mxfp4")
    rank1 = load_file(str(art / "rank-1/model.safetensors"))
    assert "model.layers.0.mlp.experts.0.down_proj.bias" in rank1
    assert "model.layers.0.mlp.experts.0.down_proj.weight" not in rank1
    assert run_ranks(art, 2, tmp_path / "ep2.json") == ref


def test_build_refuses_expert_parallelism_it_cannot_lay_out(tmp_path: Path) -> None:
    dense = make_tiny_checkpoint(tmp_path / "dense", "llama")
    moe = make_tiny_checkpoint(tmp_path / "moe", "qwen3_moe")
    for ckpt, options, message in (
        (dense, ("--tp", "2"), "needs a mixture-of-experts model"),
        (moe, ("--tp", "1"), "tensor-parallel size of at least 2"),
        (moe, ("--tp", "4", "--backend", "tensorrt-llm"), "needs the torch backend"),
    ):
        args = ["build", "--model", str(ckpt), "--output", str(tmp_path / "out"), "--device", "cpu"]
        result = CliRunner().invoke(main, [*args, *options, "--expert-parallel", "--no-progress-bar"])
        assert result.exit_code != 0 and message in f"{result.output}{result.exception}", result.output
        assert not (tmp_path / "out").exists()
