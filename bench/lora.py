"""Multi-LoRA throughput: one batch of the base model alone against the same batch spread over the base
model and several rank-r adapters, in one run on one device (random weights; a cost, not a quality
measure). Rows:

* `base`: an engine without LoRA;
* `base-eager`: the same without CUDA graphs (the baseline of `mixed-segments`; equal to `base` off a GPU);
* `base-lora-on`: LoRA slots allocated, every request on the base model (the cost of having them);
* `mixed-segments`: requests round-robin over the base model and the adapters, eager steps (off a
  GPU per-adapter segments, two small GEMMs per adapter per projection; on a GPU the masked form);
* `mixed-graphs` (`mixed-mask` in results before the batched kernels): the same on padded decode
  steps, as served (on a GPU layers/lora_kernels.py in graphs of up to 32 rows, the masked form
  above and in prefill; off a GPU every token runs all slots' A and B, masked to its own);
* `mixed-graphs-masked`: `mixed-graphs` with the kernels turned off (`lora_kernels=False`): the
  masked form in every graph, the baseline the kernels must beat;
* `mixed-graphs-serial`: `mixed-graphs` with `lora_side_stream=False`: each projection's LoRA delta
  after its base GEMM instead of its first half beside it on a second stream (the same kernels, so
  the same tokens; equal to `mixed-graphs` off a GPU);
* `one-adapter`: every request on one adapter.

Each row decodes the same prompts greedily; rows with the same adapter assignment on the same
library kernels must give the same tokens, which the script checks (the Triton kernels sum in
another order than cuBLAS, so `mixed-graphs` is compared and its differing sequences counted, not
required equal: on random weights a 1-ulp difference flips near-ties). Output tokens per second
over the whole generate call (prefill included), the best of `--repeats`; then one more call with each
engine step timed between device syncs: `prefill_ms` (the first step, every prompt at once) and
`decode_ms` (the median of the rest), so a row's cost shows where it goes.

    PYTHONPATH=engine-image .venv/bin/python bench/lora.py --device cpu \\
        --out bench/results-committed/lora-cpu.json    # the committed CPU record
    PYTHONPATH=engine-image python3 bench/lora.py --device cuda --adapters 8 --rank 16 --hidden 4096 \\
        --layers 8 --batch 64 --out bench/results/lora-gpu.json   # the issue's GPU row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.lora_testing import make_tiny_adapter
from kiln_engine.testing import make_tiny_checkpoint


def timed(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], repeats: int) -> dict:
    engine.generate(prompts[:2], params[:2])  # warm-up
    best, tokens = float("inf"), []
    for _ in range(repeats):
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = engine.generate(prompts, params)
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    generated = sum(len(t) for t in tokens)
    return {
        "seconds": round(best, 4),
        "output_tokens": generated,
        "tok_per_s": round(generated / best, 1),
        **step_times(engine, prompts, params),
        "tokens": tokens,
    }


def step_times(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """One more generate call with each engine step timed between device syncs: the first step (the
    prefill of every prompt) and the median of the rest (decode steps), in milliseconds."""
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    step, seconds = engine.step, []

    def timed_step() -> list:
        sync()
        start = time.perf_counter()
        out = step()
        sync()
        seconds.append(time.perf_counter() - start)
        return out

    engine.step = timed_step  # type: ignore[method-assign]
    try:
        engine.generate(prompts, params)
    finally:
        del engine.step
    return {
        "prefill_ms": round(1e3 * seconds[0], 3),
        "decode_ms": round(1e3 * statistics.median(seconds[1:]), 3) if len(seconds) > 1 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="kiln-lora-bench-"))
    h = args.hidden
    base = make_tiny_checkpoint(
        work / "base",
        "llama",
        hidden_size=h,
        intermediate_size=4 * h,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 256),
    )
    names = [f"a{i}" for i in range(args.adapters)]
    modules = [
        (n, str(make_tiny_adapter(work / n, base, rank=args.rank, seed=i + 1))) for i, n in enumerate(names)
    ]
    prompts = [[(7 * i + j) % 300 + 3 for j in range(args.prompt_len)] for i in range(args.batch)]
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    cycle: list[str | None] = [None, *names]
    mixed = [replace(greedy, adapter=cycle[i % len(cycle)]) for i in range(args.batch)]
    plain = [greedy] * args.batch
    common = {
        "device": args.device,
        "dtype": args.dtype,
        "max_num_seqs": args.batch,
        "max_model_len": args.prompt_len + args.new_tokens + 8,
        "num_kv_blocks": args.batch * ((args.prompt_len + args.new_tokens) // 16 + 2),
    }
    lora = {"lora_modules": modules, "max_loras": args.adapters, "max_lora_rank": args.rank}
    graphs = args.device.startswith("cuda")
    rows = {
        "base": (EngineConfig(**common, cuda_graphs=graphs), plain),
        # The eager baseline of mixed-segments (eager steps run without CUDA graphs, as prefill does).
        "base-eager": (EngineConfig(**common, cuda_graphs=False), plain),
        "base-lora-on": (EngineConfig(**common, **lora, cuda_graphs=graphs), plain),
        "mixed-segments": (EngineConfig(**common, **lora, cuda_graphs=False), mixed),
        "mixed-graphs": (EngineConfig(**common, **lora, cuda_graphs=True), mixed),
        "mixed-graphs-masked": (
            EngineConfig(**common, **lora, cuda_graphs=True, lora_kernels=False),
            mixed,
        ),
        "mixed-graphs-serial": (
            EngineConfig(**common, **lora, cuda_graphs=True, lora_side_stream=False),
            mixed,
        ),
        "one-adapter": (
            EngineConfig(**common, **lora, cuda_graphs=graphs),
            [replace(greedy, adapter=names[0])] * args.batch,
        ),
    }
    results = {}
    decode_lora = "none"
    for name, (cfg, params) in rows.items():
        engine = LLMEngine(base, cfg)
        if name == "mixed-graphs" and engine.runner.lora is not None:
            decode_lora = "kernels" if engine.runner.lora.batch.uses_kernels(args.batch) else "masked"
        if name == "mixed-graphs-masked" and engine.runner.lora is not None:
            assert not engine.runner.lora.batch.kernels
        results[name] = timed(engine, prompts, params, args.repeats)
        r = results[name]
        print(
            f"{name:20s} {r['tok_per_s']:10.1f} tok/s  prefill {r['prefill_ms']:8.2f} ms"
            f"  decode {r['decode_ms']:7.3f} ms/step",
            flush=True,
        )
    same = {
        "base-lora-on == base": results["base-lora-on"]["tokens"] == results["base"]["tokens"],
        "mixed-graphs == mixed-segments": results["mixed-graphs"]["tokens"]
        == results["mixed-segments"]["tokens"],
        "mixed-graphs-masked == mixed-segments": results["mixed-graphs-masked"]["tokens"]
        == results["mixed-segments"]["tokens"],
        "mixed-graphs-serial == mixed-graphs": results["mixed-graphs-serial"]["tokens"]
        == results["mixed-graphs"]["tokens"],
        "mixed base rows == base": all(
            results["mixed-segments"]["tokens"][i] == results["base"]["tokens"][i]
            for i in range(0, args.batch, len(cycle))
        ),
    }
    base_rate = results["base"]["tok_per_s"]
    segments = results["mixed-segments"]["tokens"]
    record = {
        "what": "bench/lora.py: output tok/s, base model alone vs mixed with LoRA adapters, one run",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else platform.processor(),
        },
        "rows": {
            k: {
                **{f: v[f] for f in ("seconds", "output_tokens", "tok_per_s", "prefill_ms", "decode_ms")},
                "vs_base": round(v["tok_per_s"] / base_rate, 3),
            }
            for k, v in results.items()
        },
        "same_tokens": same,
        # How many sequences differ, where a pair above does not agree.
        "differing_sequences": {
            name: sum(x != y for x, y in zip(results[name]["tokens"], segments, strict=True))
            for name in ("mixed-graphs", "mixed-graphs-masked")
        },
        "mixed_graphs_lora": decode_lora,  # kernels (layers/lora_kernels.py) or the masked form
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["rows"], indent=2), json.dumps(same))
    if not all(v for k, v in same.items() if k != "mixed-graphs == mixed-segments"):
        raise SystemExit("token mismatch between rows that must agree")


if __name__ == "__main__":
    main()
