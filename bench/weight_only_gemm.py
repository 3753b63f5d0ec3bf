"""Weight-only quantized products on a GPU (issue 18): the Triton kernels that read AWQ's and GPTQ's
packed int4 weights and int8 weights (layers/weight_only_gemm.py) against the references that make a
dense weight every call (unpacked int4, int8 cast to bf16) and the bf16 product of the same weight,
at Llama-3-8B's projection shapes, in one process. Checks each kernel
result against the reference product before timing it (relative error bound 1e-2, fixed before
measuring: bf16 accumulation order only).

    PYTHONPATH=engine-image python3 bench/weight_only_gemm.py --out bench/results/weight-only-gemm.json

CUDA-graph replays of 20 calls (eager where a capture fails, said in the output), median of 5 runs;
the bandwidth column counts the packed weight, zeros and scales once, the activations and the output.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kiln_engine.layers.weight_only_gemm import int4_linear, int8_linear
from kiln_engine.quantization import quantize_int8, unpack_awq, unpack_gptq

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
ROWS = (1, 16, 256, 4096)
GROUP = 128
BOUND = 1e-2


def packed(k: int, n: int, fmt: str) -> dict[str, torch.Tensor]:
    """Random weights in a format's stored layout (the layout, not the values, decides the cost)."""
    dev = "cuda"
    if fmt == "int8":
        weight, scale = quantize_int8(torch.randn(n, k, device=dev))
        return {"weight": weight, "weight_scale": scale}
    gptq = fmt == "gptq"
    words = lambda *shape: torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=dev)  # noqa: E731
    scales = torch.rand(k // GROUP, n, device=dev, dtype=torch.bfloat16) * 0.01
    if gptq:
        g_idx = (torch.arange(k, device=dev) // GROUP).int()
        return {
            "qweight": words(k // 8, n),
            "qzeros": words(k // GROUP, n // 8),
            "scales": scales,
            "g_idx": g_idx,
        }
    return {"qweight": words(k, n // 8), "qzeros": words(k // GROUP, n // 8), "scales": scales}


def time_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds a call: 20 calls in a CUDA graph, or eagerly where capture fails (then the
    launch cost is in it), median of 5."""
    fn()
    torch.cuda.synchronize()
    graph: torch.cuda.CUDAGraph | None
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
    except RuntimeError as error:
        print(f"  (eager timing: {str(error).splitlines()[0][:100]})")
        graph = None
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if graph is not None:
            graph.replay()
        else:
            for _ in range(20):
                fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / 20 * 1e3)
    return sorted(runs)[2]


def kernel_product(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "weight" in t:
        return int8_linear(x, t["weight"], t["weight_scale"], None)
    # GPTQ without act-order: groups follow the input rows (g_idx is arange // G, the kernel's
    # ordered path); the reference reads g_idx all the same
    return int4_linear(x, t["qweight"], t["qzeros"], t["scales"], None, gptq="g_idx" in t)


def reference_product(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The torch reference's product, with the dense weight made the way it is every call."""
    if "weight" in t:
        return F.linear(x, t["weight"].to(x.dtype)) * t["weight_scale"].to(x.dtype)
    return F.linear(x, unpacked(t))


def unpacked(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense bf16 weight [N, K]."""
    if "weight" in t:
        return (t["weight"].float() * t["weight_scale"][:, None]).to(torch.bfloat16)
    if "g_idx" in t:
        return unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    return unpack_awq(t["qweight"], t["qzeros"], t["scales"])


def measure(t: dict[str, torch.Tensor], dense: torch.Tensor, m: int) -> dict[str, Any]:
    """One shape at `m` rows: the kernel checked against the reference product, then the three timed."""
    k, n = dense.shape[1], dense.shape[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = kernel_product(x, t)
    ref = reference_product(x, t)
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    if err > BOUND:
        raise SystemExit(f"rows {m}, {k} -> {n}: relative error {err:.2e} over {BOUND}: no timings")
    kernel = time_ms(lambda: kernel_product(x, t))
    unpack = time_ms(lambda: reference_product(x, t))
    bf16 = time_ms(lambda: F.linear(x, dense))
    moved = sum(v.numel() * v.element_size() for v in t.values()) + 2 * m * (k + n)
    times = {"kernel_ms": round(kernel, 4), "unpack_ms": round(unpack, 4), "bf16_ms": round(bf16, 4)}
    return {"k": k, "n": n, "rows": m, **times, "kernel_gb_s": round(moved / kernel / 1e6, 1), "rel_err": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows_out = []
    print(f"{'format':6} {'shape':8} {'rows':>5} {'kernel ms':>10} {'ref ms':>10} {'bf16 ms':>9} "
          f"{'GB/s':>7} err")  # fmt: skip
    for fmt in ("awq", "gptq", "int8"):
        for name, (k, n) in SHAPES.items():
            t = packed(k, n, fmt)
            dense = unpacked(t)
            for m in ROWS:
                row = {"format": fmt, "shape": name, **measure(t, dense, m)}
                times = f"{row['kernel_ms']:>10.4f} {row['unpack_ms']:>10.4f} {row['bf16_ms']:>9.4f}"
                gb_s = row["kernel_gb_s"]
                print(f"{fmt:6} {name:8} {m:>5} {times} {gb_s:>7.0f} {row['rel_err']:.1e}", flush=True)
                rows_out.append(row)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "group": GROUP,
        "bound": BOUND,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
