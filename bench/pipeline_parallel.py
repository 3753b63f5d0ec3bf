"""Pipeline-parallel throughput: TP1 vs PP2 vs TP2xPP2 (and any other TPxPP) in one run, same model,
same requests, each layout a fresh group of rank processes over torch.distributed (gloo on CPU, NCCL
on GPUs), one device per rank (on CPU: `--threads-per-rank` threads, 1 by default). Weights are
random (`load_format="dummy"`): speed does not depend on their values; the tests in
tests/engine/test_pipeline_parallel*.py check that the layouts produce TP=1's tokens. A layout may
be listed twice (`1x1,1x2,2x2,1x1,1x2,2x2`) to see how much a shared machine moves the numbers.

Each layout: `--num-requests` prompts of `--input-len` random tokens, all submitted at once, greedy,
`--output-len` tokens each, ignoring EOS; rank 0 times prefill + decode to the last token (after a
warm-up batch) and reports output tokens/s and the mean step time.

    PYTHONPATH=engine-image python bench/pipeline_parallel.py --device cpu \\
        --out bench/results-committed/pipeline_parallel-cpu.json
    PYTHONPATH=engine-image python bench/pipeline_parallel.py --device cuda --shape llama-3-8b \\
        --num-requests 256 --input-len 128 --output-len 128 --out bench/results/pp-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # small enough for two CPU cores, large enough that a step is compute, not Python
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192},
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip


def write_config(root: Path, shape: str) -> Path:
    """A config.json-only checkpoint: the engine fills in random weights."""
    d = root / shape
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_main(args: argparse.Namespace) -> None:
    """One rank of one layout (started by `run_layout`); rank 0 writes the measurement."""
    import torch

    from kiln_engine.config import EngineConfig
    from kiln_engine.engine import LLMEngine
    from kiln_engine.interface import SamplingParams

    rank, tp, pp = int(os.environ["RANK"]), args.tp, args.pp
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(args.threads_per_rank)
    engine = LLMEngine(
        args.model,
        EngineConfig(
            device=device, load_format="dummy", max_num_seqs=args.num_requests,
            max_model_len=args.input_len + args.output_len + 8, max_tokens_per_step=args.max_tokens_per_step,
            cpu_kv_cache_bytes=1 << 30, tensor_parallel_size=tp, tensor_parallel_rank=rank % tp,
            pipeline_parallel_size=pp, pipeline_parallel_rank=rank // tp, cuda_graphs=False,
            lookahead_decode=False,
        ),
    )  # fmt: skip
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)  # the same prompts on every rank: every rank runs the same scheduler
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    def batch(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(n)]

    engine.generate(batch(min(4, args.num_requests)), params)  # warm-up
    prompts = batch(args.num_requests)
    steps = 0
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    start = time.perf_counter()
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "tp": tp, "pp": pp, "output_tokens": produced, "seconds": round(elapsed, 3),
            "output_tokens_per_s": round(produced / elapsed, 2), "steps": steps,
            "mean_step_ms": round(1000 * elapsed / steps, 2),
        }))  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_layout(args: argparse.Namespace, model: Path, tp: int, pp: int, out: Path) -> dict[str, Any]:
    world, port = tp * pp, free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads_per_rank)
    cmd = [sys.executable, __file__, "--rank-worker", "--model", str(model), "--result", str(out),
           "--tp", str(tp), "--pp", str(pp), "--device", args.device,
           "--threads-per-rank", str(args.threads_per_rank),
           "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len),
           "--max-tokens-per-step", str(args.max_tokens_per_step)]  # fmt: skip
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"layout TP{tp}xPP{pp} failed: exit codes {codes}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="1x1,1x2,2x2", help="comma-separated TPxPP")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--threads-per-rank",
        type=int,
        default=1,
        help="CPU threads of each rank (a rank stands for a device)",
    )
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-tokens-per-step", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        rank_main(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_config(Path(tmp), args.shape)
        for layout in args.layouts.split(","):
            tp, pp = (int(x) for x in layout.lower().split("x"))
            row = run_layout(args, model, tp, pp, Path(tmp) / f"{layout}.json")
            rows.append(row)
            print(f"TP{tp}xPP{pp}: {row['output_tokens_per_s']:9.1f} output tokens/s "
                  f"({row['output_tokens']} tokens in {row['seconds']} s, {row['steps']} steps, "
                  f"{row['mean_step_ms']} ms/step)", flush=True)  # fmt: skip
    base = rows[0]["output_tokens_per_s"]
    for row in rows:
        row["vs_first"] = round(row["output_tokens_per_s"] / base, 3)
    results = {
        "bench": "pipeline_parallel", "shape": args.shape, "model": SHAPES[args.shape], "device": args.device,
        "threads_per_rank": args.threads_per_rank, "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(), "num_requests": args.num_requests, "input_len": args.input_len,
        "output_len": args.output_len, "layouts": rows,
        "command": " ".join(["python", "bench/pipeline_parallel.py", *sys.argv[1:]]),
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
