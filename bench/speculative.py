"""N-gram speculative decoding on a GPU: greedy token equality against plain decoding, acceptance and
time per output token, on the tiny test checkpoints (random weights: their greedy outputs fall into
loops, which is where the drafts get accepted; not a speed claim for real models).

    PYTHONPATH=engine-image python3 bench/speculative.py --out bench/results/speculative.json
    PYTHONPATH=engine-image .venv/bin/python bench/speculative.py --device cpu \
        --out bench/results-committed/speculative-cpu.json    # the committed CPU record

Per row: plain decoding, speculation, and speculation with its verify steps run eagerly (the way
before verify steps replayed the decode graphs; `speculative.VERIFY_IN_GRAPHS`), in the same run.

bfloat16 batches may differ from plain decoding in a few tokens: verifying 1 + k positions runs other
GEMM and attention shapes than decoding one, and bf16 rounds differently there (float32 matches).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kiln_engine import speculative
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint


def prompts(n: int) -> list[list[int]]:
    return [[3 + i, 4 + i, 5 + i, 6 + i] * 3 + [7 + i] for i in range(n)]


def run(ckpt: Path, dtype: str, batch: int, spec: bool, device: str) -> dict[str, Any]:
    cfg = EngineConfig(
        device=device,
        dtype=dtype,
        cuda_graphs=device == "cuda",
        max_num_seqs=32,
        max_model_len=512,
        speculative="ngram" if spec else None,
        num_speculative_tokens=4,
    )
    engine = LLMEngine(ckpt, cfg)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    engine.generate(prompts(batch), params)  # warm-up: kernels compiled
    before = engine.stats()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts(batch), params)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return {
        "tokens": out,
        "seconds": seconds,
        "ms_per_step_token": 1000 * seconds / len(out[0]),
        "proposed": stats.spec_proposed_tokens_total - before.spec_proposed_tokens_total,
        "accepted": stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    rows = []
    for arch in ("qwen3", "llama"):
        ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp()), arch)
        for dtype in ("float32", "bfloat16"):
            for batch in (1, 16):
                base = run(ckpt, dtype, batch, False, args.device)
                spec = run(ckpt, dtype, batch, True, args.device)
                speculative.VERIFY_IN_GRAPHS = False
                eager = run(ckpt, dtype, batch, True, args.device)
                speculative.VERIFY_IN_GRAPHS = True
                same = sum(a == b for a, b in zip(base["tokens"], spec["tokens"], strict=True))
                row = {
                    "arch": arch,
                    "dtype": dtype,
                    "batch": batch,
                    "identical_requests": f"{same}/{batch}",
                    "proposed": spec["proposed"],
                    "accepted": spec["accepted"],
                    "plain_ms_per_token": round(float(base["ms_per_step_token"]), 3),
                    "spec_ms_per_token": round(float(spec["ms_per_step_token"]), 3),
                    "spec_eager_verify_ms_per_token": round(float(eager["ms_per_step_token"]), 3),
                }
                print(row, flush=True)
                rows.append(row)
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
