"""One tensor/pipeline-parallel rank of a greedy generation run, for tests and GPU checks.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 [PIPELINE_PARALLEL_SIZE=p] \\
        [EXPERT_PARALLEL=1] python -m kiln_engine.testing.tp_worker MODEL_DIR OUT.json [DEVICE]

The world is n / p tensor-parallel ranks times p pipeline stages (rank = stage * tp + tp_rank).

Every rank runs the same scheduler on the same inputs; rank 0 writes the generated token ids of a
fixed prompt set as JSON. `torchrun --nproc-per-node n -m kiln_engine.testing.tp_worker ...` works too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams

PROMPTS = ["Hello, world! How are you today?", "The quick brown fox", "A", "Numbers: 0 1 2 3 4 5 6 7 8 9"]


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    pp = int(os.environ.get("PIPELINE_PARALLEL_SIZE", "1"))
    tp = world // pp
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    torch.set_num_threads(1)
    engine = LLMEngine(
        model,
        EngineConfig(
            num_kv_blocks=64,
            block_size=4,
            device=device,
            tensor_parallel_size=tp,
            tensor_parallel_rank=rank % tp,
            pipeline_parallel_size=pp,
            pipeline_parallel_rank=rank // tp,
            expert_parallel=os.environ.get("EXPERT_PARALLEL") == "1",
        ),
    )
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    tokens = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    if rank == 0:
        out.write_text(json.dumps(tokens))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
