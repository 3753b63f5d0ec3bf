"""Multi-LoRA under tensor parallelism: TP=2 over gloo gives TP=1's greedy tokens for a batch mixing
the base model and two adapters, on a model with fewer KV heads than ranks (k/v replicated, so
their LoRA B rows are too). Run as a script, this file is one rank of that run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.lora_testing import make_tiny_adapter
from kiln_engine.testing import make_tiny_checkpoint

pytestmark = pytest.mark.engine

PROMPTS = ["Hello, world! How are you today?", "The quick brown fox", "Numbers: 0 1 2 3 4 5 6 7 8 9"]
ADAPTERS = (None, "a1", "a2")


def generate(model: str, adapters: list[tuple[str, str]], rank: int, world: int) -> list[list[int]]:
    engine = LLMEngine(
        model,
        EngineConfig(
            num_kv_blocks=64,
            block_size=4,
            tensor_parallel_size=world,
            tensor_parallel_rank=rank,
            max_loras=2,
            max_lora_rank=8,
            lora_modules=adapters,
        ),
    )
    assert engine.tokenizer is not None
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS for _ in ADAPTERS]
    params = [replace(greedy, adapter=a) for _ in PROMPTS for a in ADAPTERS]
    return engine.generate(prompts, params)


def run_ranks(model: Path, adapters: list[tuple[str, str]], world: int, out: Path) -> list[list[int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(model), str(out), json.dumps(adapters)],
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output.decode()[-3000:]
    return list(json.loads(out.read_text()))


@pytest.mark.slow
def test_tp2_with_adapters_matches_tp1(tmp_path: Path) -> None:
    base = make_tiny_checkpoint(tmp_path / "base", "qwen2", num_key_value_heads=1)
    adapters = [
        ("a1", str(make_tiny_adapter(tmp_path / "a1", base, rank=4, seed=1))),
        ("a2", str(make_tiny_adapter(tmp_path / "a2", base, rank=8, seed=2, targets=("k_proj", "o_proj")))),
    ]
    tp1 = generate(str(base), adapters, 0, 1)
    assert tp1[1] != tp1[0] and tp1[2] != tp1[0]  # the adapters change the output
    assert run_ranks(base, adapters, 2, tmp_path / "tp2.json") == tp1


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tokens = generate(sys.argv[1], [tuple(a) for a in json.loads(sys.argv[3])], rank, world)
    if rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(tokens))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
