"""Tensor parallelism: sharding rules as pure functions, and TP=2 over gloo giving TP=1's tokens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln_engine.layers.sharding import in_pp_stage, pp_layer_range, shard_tensor, tp_shard_dim
from kiln_engine.testing import make_tiny_artifact, make_tiny_checkpoint

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("model.layers.0.self_attn.q_proj.weight", 0),
        ("model.layers.0.self_attn.k_proj.bias", 0),
        ("model.layers.0.self_attn.v_proj.weight_scale", 0),
        ("model.layers.0.mlp.gate_proj.qweight", 1),
        ("model.layers.0.mlp.up_proj.scales", 1),
        ("model.layers.0.mlp.up_proj.g_idx", None),
        ("model.layers.0.self_attn.o_proj.weight", 1),
        ("model.layers.0.self_attn.o_proj.bias", None),
        ("model.layers.0.self_attn.o_proj.weight_scale", None),
        ("model.layers.0.mlp.experts.0.down_proj.weight_scale", None),
        ("model.layers.0.mlp.down_proj.qweight", 0),
        ("model.layers.0.mlp.down_proj.qzeros", 0),
        ("model.layers.0.mlp.down_proj.g_idx", 0),
        ("model.embed_tokens.weight", 0),
        ("lm_head.weight", 0),
        ("model.layers.0.input_layernorm.weight", None),
        ("model.layers.0.self_attn.q_norm.weight", None),
        ("model.norm.weight", None),
    ],
)
def test_tp_shard_dim(name: str, dim: int | None) -> None:
    assert tp_shard_dim(name) == dim


def test_mxfp4_exponents_split_with_their_weights() -> None:
    """MXFP4 `weight_scale` [out, in/32]: with the outputs of a column-parallel projection and the
    inputs of a row-parallel one; a per-output-channel [out] scale of a row-parallel one stays whole."""
    assert tp_shard_dim("model.layers.0.mlp.experts.0.gate_proj.weight_scale", ndim=2) == 0
    assert tp_shard_dim("model.layers.0.mlp.experts.0.down_proj.weight_scale", ndim=2) == 1
    assert tp_shard_dim("model.layers.0.mlp.experts.0.down_proj.weight_scale", ndim=1) is None


def test_shards_concatenate_back_to_the_tensor() -> None:
    w = torch.randn(8, 6)
    for name, dim in (("x.q_proj.weight", 0), ("x.o_proj.weight", 1)):
        parts = [shard_tensor(name, w, r, 2, num_kv_heads=8) for r in range(2)]
        assert torch.equal(torch.cat(parts, dim), w)
        assert parts[0].shape[dim] == w.shape[dim] // 2
    norm = torch.randn(6)
    assert shard_tensor("x.input_layernorm.weight", norm, 1, 2, 8) is norm


def test_kv_heads_are_replicated_when_fewer_than_ranks() -> None:
    k = torch.arange(2 * 4 * 3).reshape(8, 3).float()  # 2 KV heads of dim 4
    parts = [shard_tensor("l.k_proj.weight", k, r, 4, num_kv_heads=2) for r in range(4)]
    assert torch.equal(parts[0], parts[1]) and torch.equal(parts[0], k[:4])
    assert torch.equal(parts[2], parts[3]) and torch.equal(parts[2], k[4:])
    with pytest.raises(ValueError):
        shard_tensor("l.k_proj.weight", k, 0, 3, num_kv_heads=2)


def test_vocab_split_pads_the_last_rank() -> None:
    emb = torch.randn(10, 4)
    parts = [shard_tensor("model.embed_tokens.weight", emb, r, 4, 2) for r in range(4)]
    assert [p.shape[0] for p in parts] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(parts), emb)


def test_pipeline_stages_cover_all_layers_once() -> None:
    ranges = [pp_layer_range(10, r, 3) for r in range(3)]
    assert [list(r) for r in ranges] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert in_pp_stage("model.layers.5.mlp.up_proj.weight", 10, 1, 3)
    assert in_pp_stage("model.embed_tokens.weight", 10, 0, 3)
    assert in_pp_stage("lm_head.weight", 10, 2, 3) and not in_pp_stage("lm_head.weight", 10, 0, 3)
    assert not in_pp_stage("model.embed_tokens.weight", 10, 2, 3)
    assert in_pp_stage("model.embed_tokens.weight", 10, 2, 3, tied_embeddings=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(model: Path, world: int, out: Path, **env_extra: str) -> list[list[int]]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **env_extra,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kiln_engine.testing.tp_worker", str(model), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output.decode()[-3000:]
    return list(json.loads(out.read_text()))


@pytest.fixture(scope="module")
def tp1_and_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], Path]:
    d = tmp_path_factory.mktemp("tp")
    ckpt = make_tiny_checkpoint(d / "ckpt", "qwen2", num_key_value_heads=1)
    return ckpt, run_ranks(ckpt, 1, d / "tp1.json"), d


@pytest.mark.slow
def test_tp2_from_checkpoint_matches_tp1(tp1_and_ckpt: tuple[Path, list[list[int]], Path]) -> None:
    ckpt, ref, d = tp1_and_ckpt
    assert run_ranks(ckpt, 2, d / "tp2.json") == ref


@pytest.mark.slow
def test_tp2_from_presharded_artifact_matches_tp1(tp1_and_ckpt: tuple[Path, list[list[int]], Path]) -> None:
    ckpt, ref, d = tp1_and_ckpt
    art = make_tiny_artifact(ckpt, d / "art", tensor_parallel_size=2)
    assert (art / "rank-1" / "model.safetensors").exists()
    assert run_ranks(art, 2, d / "art.json") == ref


@pytest.mark.slow
def test_tp2_fp8_artifact_matches_tp1_fp8(tp1_and_ckpt: tuple[Path, list[list[int]], Path]) -> None:
    """Per-channel fp8 scales split with their column-parallel weights and stay whole for row-parallel."""
    ckpt, _, d = tp1_and_ckpt
    one = make_tiny_artifact(ckpt, d / "fp8-1", quantization="fp8")
    two = make_tiny_artifact(ckpt, d / "fp8-2", quantization="fp8", tensor_parallel_size=2)
    assert run_ranks(two, 2, d / "fp8-2.json") == run_ranks(one, 1, d / "fp8-1.json")
