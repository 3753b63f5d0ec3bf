"""The fused MoE GEMMs' tiles, swept on a GPU: for each model shape, weight dtype and token count,
every tile of a fixed candidate list is timed on the gate/up and the down GEMM (CUDA-graph replays,
the layout built once per row block), and the best pair that shares a row block is compared with
the tiles `layers.fused_moe.expert_tiles` picks today. The table is what it should learn.

    PYTHONPATH=engine-image python3 bench/moe_tune.py --out bench/results/moe_tune.json
    PYTHONPATH=engine-image python3 bench/moe_tune.py --models qwen3-30b-a3b --tokens 1,256 --dtypes fp8

Writes the results after every (model, dtype, tokens) point, so a run cut short keeps them; stops
starting new points after `--deadline` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import triton
from lora_kernels import graph_time_us
from moe_throughput import MODELS, expert_shape, quantize_experts, random_mxfp4

from kiln_engine.layers.fused import quant_fp8_per_token, silu_and_mul
from kiln_engine.layers.fused_moe import Tile, _gemm, align_by_expert, expert_tiles, one_block_per_pair
from kiln_engine.layers.moe import route

# (BLOCK_N, BLOCK_K, warps, stages) tried with each row block; row blocks by rows per expert.
NKWS = [
    (32, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 4, 3),
    (32, 256, 4, 4),
    (128, 256, 8, 3),
    (128, 64, 4, 4),
    (128, 64, 8, 3),
    (128, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (256, 64, 8, 3),
    (256, 64, 8, 4),
]


def row_blocks(rows_per_expert: float) -> list[int]:
    if rows_per_expert <= 8:
        return [16]
    if rows_per_expert <= 48:
        return [16, 32, 64]
    if rows_per_expert <= 256:
        return [32, 64, 128]
    return [64, 128]


# w13, w2 and their fp8 scales or MXFP4 exponents (None for bf16)
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def weights_of(cfg: dict[str, Any], dtype: str, g: torch.Generator) -> Weights:
    experts, _, hidden, inter = expert_shape(cfg)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    if dtype == "bf16":
        return w13, w2, None, None
    if dtype == "mxfp4":
        (m13, e13), (m2, e2) = random_mxfp4(w13.shape, g), random_mxfp4(w2.shape, g)
        return m13, m2, e13, e2
    (q13, s13), (q2, s2) = quantize_experts(w13), quantize_experts(w2)
    return q13, q2, s13, s2


def timed(fn: Any) -> float:
    """µs per call, or infinity for a tile the device cannot run (too much shared memory)."""
    try:
        return graph_time_us(fn)
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def tune_point(cfg: dict[str, Any], w: Weights, tokens: int, g: torch.Generator, fp8a8: bool = False) -> dict:
    """Best (up, down) tiles sharing a row block at `tokens`, against today's choice, in µs;
    `fp8a8`: fp8 activations as well (the GEMMs' inputs quantized per row, as `fused_experts` does)."""
    experts, top_k, hidden, inter = expert_shape(cfg)
    w13, w2, s13, s2 = w
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    rw, ids = route(torch.randn(tokens, experts, device="cuda", generator=g), top_k, True)
    rw = rw.to(torch.bfloat16).reshape(-1).contiguous()
    up = torch.empty(tokens * top_k, 2 * inter, dtype=x.dtype, device="cuda")
    act = silu_and_mul(torch.randn_like(up))
    down = torch.empty(tokens * top_k, hidden, dtype=x.dtype, device="cuda")
    x_in, x_scale = quant_fp8_per_token(x) if fp8a8 else (x, None)
    act_in, act_scale = quant_fp8_per_token(act) if fp8a8 else (act, None)
    few = tokens * top_k * 4 <= experts
    rows = tokens * top_k / experts

    def layout_of(bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return one_block_per_pair(ids, bm) if few else align_by_expert(ids, experts, bm)

    def time_up(tile: Tile, lay: Any) -> float:
        return timed(lambda: _gemm(x_in, w13, up, s13, None, lay, top_k, tile, x_scale))

    def time_down(tile: Tile, lay: Any) -> float:
        return timed(lambda: _gemm(act_in, w2, down, s2, rw, lay, 1, tile, act_scale))

    cur_up, cur_down = expert_tiles(rows, x.dtype if fp8a8 else w13.dtype)
    cur_lay = layout_of(cur_up[0])
    current: dict[str, Any] = {"up": list(cur_up), "down": list(cur_down)}
    current["us"] = time_up(cur_up, cur_lay) + time_down(cur_down, cur_lay)
    best: dict[str, Any] = {"us": float("inf")}
    for bm in row_blocks(rows):
        lay = layout_of(bm)
        ups = [(time_up((bm, *nkws), lay), (bm, *nkws)) for nkws in NKWS]
        downs = [(time_down((bm, *nkws), lay), (bm, *nkws)) for nkws in NKWS]
        (tu, bu), (td, bd) = min(ups), min(downs)
        if tu + td < best["us"]:
            best = {"us": tu + td, "up": list(bu), "down": list(bd), "up_us": tu, "down_us": td}
    return {"tokens": tokens, "rows_per_expert": rows, "current": current, "best": best,
            "speedup": current["us"] / best["us"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument(
        "--dtypes",
        default="bf16,fp8",
        help="comma-separated: bf16, fp8 (weight-only), fp8a8 (fp8 by fp8), mxfp4",
    )
    ap.add_argument("--tokens", default="1,16,64,256,1024,4096")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new point starts")
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_tune.json"))
    args = ap.parse_args(argv)
    if unknown := set(args.dtypes.split(",")) - {"bf16", "fp8", "fp8a8", "mxfp4"}:
        ap.error(f"unknown dtypes {sorted(unknown)}")
    start = time.monotonic()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "argv": sys.argv[1:], "points": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    head = ("model", "dtype", "tokens", "rows/E", "now us", "best us", "gain")
    print("{:14} {:5} {:>6} {:>7} {:>8} {:>8} {:>6}  best up / down tiles".format(*head))
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            w = weights_of(MODELS[name], dtype, g)
            for tokens in (int(t) for t in args.tokens.split(",")):
                if time.monotonic() - start > args.deadline:
                    print(f"deadline: {name} {dtype} T={tokens} not run")
                    continue
                r = {
                    "model": name,
                    "dtype": dtype,
                    **tune_point(MODELS[name], w, tokens, g, dtype == "fp8a8"),
                }
                results["points"].append(r)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
                b = r["best"]
                now, rows = r["current"]["us"], r["rows_per_expert"]
                print(
                    f"{name:14} {dtype:5} {tokens:6} {rows:7.1f} {now:8.1f} {b['us']:8.1f}"
                    f" {r['speedup']:5.2f}x"
                    f"  {b['up']} / {b['down']}",
                    flush=True,
                )
            del w
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
