"""Pipeline parallelism: micro-batch splitting and the pod layout as pure functions, and PP=2 / TP2xPP2
ranks over gloo giving TP=1's greedy tokens from a checkpoint (uneven stages, tied embeddings)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
from kiln_engine.config import EngineConfig  # noqa: E402
from kiln_engine.engine import LLMEngine  # noqa: E402
from kiln_engine.interface import SamplingParams  # noqa: E402
from kiln_engine.pipeline import split_microbatches  # noqa: E402
from kiln_engine.scheduler import ScheduledChunk  # noqa: E402
from kiln_engine.sequence import Sequence  # noqa: E402
from kiln_engine.server.group import group_layout, stalled_ranks  # noqa: E402
from kiln_engine.testing import make_tiny_checkpoint  # noqa: E402
from kiln_engine.testing.tp_worker import PROMPTS  # noqa: E402


def _chunks(tokens: list[int]) -> list[ScheduledChunk]:
    return [ScheduledChunk(Sequence(f"r{i}", [1] * n, SamplingParams()), 0, n) for i, n in enumerate(tokens)]


@pytest.mark.parametrize(
    ("tokens", "count", "sizes"),
    [
        ([1, 1, 1, 1], 2, [2, 2]),
        ([1, 1, 1, 1, 1], 2, [3, 2]),
        ([100, 1, 1, 1], 2, [1, 3]),  # a long prefill goes alone
        ([1, 1, 1, 100], 2, [3, 1]),
        ([5], 4, [1]),
        ([1, 1], 4, [1, 1]),
        ([2, 2, 2, 2, 2, 2], 3, [2, 2, 2]),
        ([], 2, []),
    ],
)
def test_microbatches_are_contiguous_balanced_and_never_empty(
    tokens: list[int], count: int, sizes: list[int]
) -> None:
    chunks = _chunks(tokens)
    groups = split_microbatches(chunks, count)
    assert [len(g) for g in groups] == sizes
    assert [c for g in groups for c in g] == chunks  # order kept: sampled rows come back in it


def test_pods_share_the_ranks_evenly() -> None:
    assert [list(group_layout(4, 2, i).local_ranks) for i in range(2)] == [[0, 1], [2, 3]]
    assert list(group_layout(16, 2, 1).local_ranks) == list(range(8, 16))
    assert group_layout(2, 1, 0).is_leader and not group_layout(4, 2, 1).is_leader
    for world, size, index in ((4, 3, 0), (4, 2, 2), (4, 0, 0), (4, 2, -1)):
        with pytest.raises(ValueError):
            group_layout(world, size, index)


def test_a_rank_counts_as_dead_only_after_the_timeout() -> None:
    assert stalled_ranks({1: 100.0, 2: 95.0, 3: 89.0}, now=100.0, timeout_s=10.0) == [3]
    assert stalled_ranks({1: 100.0}, now=105.0, timeout_s=10.0) == []


@pytest.mark.parametrize("tied", [False, True])
def test_stages_hold_disjoint_layers_that_cover_the_model(tmp_path: Path, tied: bool) -> None:
    """Each stage allocates only its own layers (the KV cache follows), the embedding on the first,
    norm and LM head on the last; with tied embeddings the last stage has its own embedding copy."""
    import torch

    from kiln_engine.config import ModelConfig
    from kiln_engine.layers.parallel import pipeline_stage
    from kiln_engine.models.llama import LlamaForCausalLM

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama", num_hidden_layers=3, tie_word_embeddings=tied)
    cfg = ModelConfig.from_file(ckpt / "config.json")
    whole = {n for n, _ in LlamaForCausalLM(cfg, 64, torch.float32).named_parameters()}
    stages = [
        {
            n
            for n, _ in LlamaForCausalLM(
                cfg, 64, torch.float32, pp=pipeline_stage(3, r, 2)
            ).named_parameters()
        }
        for r in range(2)
    ]
    assert {n.split(".")[2] for n in stages[0] if n.startswith("model.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in stages[1] if n.startswith("model.layers.")} == {"2"}
    assert stages[0] | stages[1] == whole
    shared = stages[0] & stages[1]
    assert shared == ({"model.embed_tokens.weight"} if tied else set())
    assert "model.norm.weight" in stages[1] and "model.norm.weight" not in stages[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(model: Path, world: int, pp: int, out: Path) -> list[list[int]]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "PIPELINE_PARALLEL_SIZE": str(pp),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
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


def tp1_tokens(model: Path) -> list[list[int]]:
    """The reference: one rank, in this process, the same engine settings as the workers."""
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, block_size=4, device="cpu"))
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    return engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))


@pytest.mark.slow
def test_pp2_from_checkpoint_with_tied_embeddings_matches_tp1(tmp_path: Path) -> None:
    """3 layers over 2 stages (2 + 1), sliced from a checkpoint at load time; the embedding is tied, so
    the last stage holds its own copy as LM head. (Untied TP1xPP2 and TP2xPP2 from built artifacts,
    with logprobs: test_pipeline_parallel_server.py.)"""
    ckpt = make_tiny_checkpoint(
        tmp_path / "ckpt",
        "qwen2",
        seed=5,
        num_hidden_layers=3,
        tie_word_embeddings=True,
        num_key_value_heads=2,
    )
    ref = tp1_tokens(ckpt)
    assert len({tuple(t) for t in ref}) == len(ref), "every prompt should have its own continuation"
    assert run_ranks(ckpt, 2, 2, tmp_path / "out.json") == ref


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group-size", "2"], "needs --leader-address"),
        (["--group-size", "3", "--leader-address", "pod-0"], "do not split evenly over 3 pods"),
        (["--group-size", "2", "--group-index", "2", "--leader-address", "pod-0"], "outside a group of 2"),
    ],
)
def test_serve_refuses_a_replica_that_cannot_be_laid_out(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Before any rank starts: the pods' shares of tp * pp ranks must add up."""
    from click.testing import CliRunner

    from kiln_engine.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama")
    env = {"KILN_GROUP_SIZE": None, "KILN_GROUP_INDEX": None, "KILN_LEADER_ADDRESS": None, "WORLD_SIZE": None}
    result = CliRunner().invoke(
        main, ["serve", "--model", str(ckpt), "--pp", "2", "--device", "cpu", *args], env=env
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
