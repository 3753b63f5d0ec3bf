"""Where a small-batch decode step's time goes, against the weight-read floor (issue 6's batch-1 target).

In one process on one GPU, on the Llama-3-8B shape with random weights, it measures:

1. ceilings: device copy bandwidth (bytes read + written) and read bandwidth (a sum over 4 GiB);
2. each linear shape of a layer (and the LM head) at 1-16 rows through cuBLAS (bf16),
   `torch._scaled_mm` (fp8 x fp8, with its activation-quantization kernel) and `small_m_linear`
   (weight streaming, bf16 and fp8 weights; fp8 with and without PDL and prefetch): 32
   distinct weights per shape replayed in one CUDA graph, so neither launch cost nor the L2
   cache flatters any of them; microseconds and GB/s;
3. per engine variant (programmatic dependent launch off/on, the GEMVs' first weight tile read
   before waiting for the previous kernel or not, lookahead decode off/on; unquantized weights
   stream where `gemv.streams_dense` measured it faster than cuBLAS): the batch-1
   decode graph's GPU time (events around back-to-back replays), the engine's step wall time
   (what the ITL measures) and the difference, which is the host's share;
4. the kernel table of batch-1 steps (torch profiler), the kernel count of one step.

    PYTHONPATH=engine-image python bench/decode_breakdown.py --out breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import (
    LLAMA3_8B,
    copy_bandwidth,
    free,
    log,
    make_engine,
    measure_itl,
    random_prompts,
    weight_bytes_per_decode_step,
    write_model_dir,
)

from kiln_engine.interface import SamplingParams
from kiln_engine.layers import gemv, pdl
from kiln_engine.model_runner import DecodeGraphs, capture_sizes
from kiln_engine.quantization import _fp8_scaled_mm, quantize_fp8

SHAPES = {  # name: (out, in) of one layer's projections on Llama-3-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def read_bandwidth(device: torch.device, nbytes: int = 4 << 30, reps: int = 20) -> float:
    """Bytes/s of a reduction over a large bf16 tensor: reading only, as weight streaming does."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del x
    return nbytes / statistics.median(times)


def graph_seconds(fn: Callable[[], None], reps: int = 10) -> float:
    """GPU seconds of one call of `fn`, captured once as a CUDA graph and replayed (median)."""
    fn()  # warm-up outside the graph: autotuning, library workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def each(items: list[tuple[Any, ...]], op: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """One call applies `op` to every item's arguments (every copy of a weight), as a step does per layer."""

    def run() -> None:
        for item in items:
            op(*item)

    return run


# The engine's own settings (KILN_PDL included), restored after each comparison.
DEFAULT_LAUNCH = (pdl.ENABLED, gemv.PREFETCH_FIRST_TILE)


def bench_linears(device: torch.device, row_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    rows_out: list[dict[str, Any]] = []
    for name, (n, k) in SHAPES.items():
        copies = 2 if name == "lm_head" else 32
        dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quant = [quantize_fp8(w) for w in dense]
        weights = [(w,) for w in dense]
        for m in row_counts:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            stream = partial(gemv.small_m_linear, x)
            # name: (the replayed launches, weight bytes per element, PDL, first tile prefetched)
            methods: dict[str, tuple[Callable[[], None], int, bool, bool]] = {
                "cublas bf16": (each(weights, partial(torch.nn.functional.linear, x)), 2, False, False),
                "stream bf16": (each(weights, stream), 2, True, True),
                "scaled_mm fp8": (
                    each([(q, s, None) for q, s in quant], partial(_fp8_scaled_mm, x)),
                    1,
                    False,
                    False,
                ),
                "stream fp8, no PDL": (each(quant, stream), 1, False, False),
                "stream fp8, PDL": (each(quant, stream), 1, True, False),
                "stream fp8, PDL + prefetch": (each(quant, stream), 1, True, True),
            }
            for method, (fn, elem, use_pdl, prefetch) in methods.items():
                pdl.ENABLED, gemv.PREFETCH_FIRST_TILE = use_pdl, prefetch
                secs = graph_seconds(fn) / copies
                nbytes = n * k * elem
                rows_out.append(
                    {
                        "shape": name,
                        "rows": m,
                        "method": method,
                        "us": secs * 1e6,
                        "gb_per_s": nbytes / secs / 1e9,
                    }
                )
            pdl.ENABLED, gemv.PREFETCH_FIRST_TILE = DEFAULT_LAUNCH
        del dense, quant, weights
        torch.cuda.empty_cache()
    return rows_out


def print_linears(rows: list[dict[str, Any]], read_bw: float) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\nLinear layers, microseconds (GB/s; read bandwidth {read_bw / 1e9:.0f} GB/s)")
    print("| shape | rows | " + " | ".join(methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for shape in SHAPES:
        for m in dict.fromkeys(r["rows"] for r in rows):
            cells = []
            for method in methods:
                r = next(
                    (x for x in rows if x["shape"] == shape and x["rows"] == m and x["method"] == method),
                    None,
                )
                cells.append(f"{r['us']:.1f} ({r['gb_per_s']:.0f})" if r else "–")
            print(f"| {shape} | {m} | " + " | ".join(cells) + " |")


def step_breakdown(engine: Any, vocab: int, profile: bool) -> dict[str, Any]:
    """Batch-1 decode: the graph's GPU time, the step's wall time, the kernel table."""
    runner = engine.runner
    graphs = runner.decode_graphs
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    engine.add_request("breakdown", random_prompts(1, 128, vocab, seed=3)[0], params)
    for _ in range(8):
        engine.step()  # prefill, then decode steps: the graph's inputs now hold a real sequence
    torch.cuda.synchronize()
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 200
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    graph_ms = start.elapsed_time(end) / reps
    out: dict[str, Any] = {"graph_gpu_ms": graph_ms}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["kernels_per_step"] = len(kernels) / 5
        out["kernel_table"] = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    engine.abort_request("breakdown")
    while engine.has_unfinished():
        engine.step()
    itl = measure_itl(engine, 128, 256, vocab)
    out["itl_ms"] = itl["itl_ms_median"]
    out["host_ms"] = itl["itl_ms_median"] - graph_ms
    return out


def recapture(engine: Any) -> None:
    runner = engine.runner
    runner.decode_graphs = None
    free()
    runner.decode_graphs = DecodeGraphs(runner, capture_sizes(engine.config.max_num_seqs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-linears", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--rows", default="1,2,4,8,16", help="row counts of the linear-layer table")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    copy_bw = copy_bandwidth(device)
    read_bw = read_bandwidth(device)
    result.update(copy_bandwidth_gb_s=copy_bw / 1e9, read_bandwidth_gb_s=read_bw / 1e9)
    log(f"{result['device']}: copy {copy_bw / 1e9:.0f} GB/s, read {read_bw / 1e9:.0f} GB/s")
    if not args.no_linears:
        result["linears"] = bench_linears(device, tuple(int(r) for r in args.rows.split(",")))
        print_linears(result["linears"], read_bw)
        result["autotuned"] = {str(k): str(v) for k, v in gemv._tuned_kernel.cache.items()}
        for key, config in result["autotuned"].items():
            print(f"autotuned {key}: {config}")
    engine_args = argparse.Namespace(
        device="cuda", max_num_seqs=16, max_tokens_per_step=2048, gpu_memory_utilization=0.5, tp=1
    )
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("bf16", "fp8"):
            engine = make_engine(write_model_dir(Path(tmp), LLAMA3_8B, mode), engine_args, 1024)
            weight_bytes = weight_bytes_per_decode_step(engine)
            # (programmatic dependent launch, first weight tile prefetched, lookahead decode)
            settings = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
            for use_pdl, prefetch, lookahead in settings:
                pdl.ENABLED, gemv.PREFETCH_FIRST_TILE = use_pdl, prefetch
                engine.config.lookahead_decode = lookahead
                recapture(engine)
                name = mode + (", PDL" if use_pdl else ", no PDL") + (" + prefetch" if prefetch else "")
                name += ", lookahead" if lookahead else ""
                r = step_breakdown(engine, LLAMA3_8B["vocab_size"], not args.no_profile and not lookahead)
                r.update(
                    variant=name,
                    weight_bytes=weight_bytes,
                    floor_copy_ms=weight_bytes / copy_bw * 1e3,
                    floor_read_ms=weight_bytes / read_bw * 1e3,
                )
                variants.append(r)
                log(f"{name}: graph {r['graph_gpu_ms']:.2f} ms, step {r['itl_ms']:.2f} ms")
                if "kernel_table" in r:
                    count = r["kernels_per_step"]
                    print(f"\n== {name}: {count:.0f} kernels per step ==\n{r['kernel_table']}")
            engine.config.lookahead_decode = False
            pdl.ENABLED, gemv.PREFETCH_FIRST_TILE = DEFAULT_LAUNCH
            del engine
            free()
    result["variants"] = variants
    result["dense_choice"] = {str(k): v for k, v in gemv._dense_choice.items()}
    print("streams dense (out, in, rows bucket, dtype):", result["dense_choice"])
    print("\nBatch-1 decode step, ms")
    print("| variant | floor, copy bw | floor, read bw | graph GPU | step (ITL) | host | ITL/floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in variants:
        print(
            f"| {r['variant']} | {r['floor_copy_ms']:.2f} | {r['floor_read_ms']:.2f} "
            f"| {r['graph_gpu_ms']:.2f} | {r['itl_ms']:.2f} | {r['host_ms']:.2f} "
            f"| {r['itl_ms'] / r['floor_copy_ms']:.2f}x |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    rc = main()
    log(f"done in {time.perf_counter() - started:.0f}s")
    sys.exit(rc)
