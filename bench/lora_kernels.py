"""The LoRA delta, op by op, on a GPU: the batched kernels (layers/lora_kernels.py) against the masked
form and the eager steps' per-slot segments, on one Llama-3-8B decoder layer's four LoRA projections
(qkv, o, gate_up, down; rank 16), next to the same layer's base GEMMs, all timed inside CUDA graphs as
decode runs them. Tokens are spread round-robin over the base model and the slots (`mixed`) or all on
slot 0 (`one`); every row also gives the kernels' relative error against the masked form in fp32. (The
`tiled` column of lora_kernels-h100-run3-tiled.json timed tensor-core kernels over tiles of tokens,
commit d0a2e1c: slower than the masked form on mixed batches at every size, removed.)

`stacked` is a form the engine does not have yet, timed to decide whether to build it: every slot's A
stacked under the base weight, so the base GEMM also yields x @ A^T in extra columns, then the mask
and B added into the base output in place (two small kernels a projection instead of three). Its
column is the stacked GEMM plus those two kernels minus the base GEMM alone, so it reads like the
other forms' extra cost; its error against the masked form is checked with the base weight zeroed.
`overlapped` runs the delta's first half (x @ A, masked; the kernels' shrink at up to 32 tokens) on a
second stream beside the base GEMM, then B's product after both, minus the base GEMM alone; the
engine's decode graphs do so for the masked form (`LoraLinear.begin`, `lora_side_stream`), where it
was faster, not for the kernels, where it was slower (lora_kernels-h100-run5-overlapped.json).

    python3 bench/lora_kernels.py --out bench/results/lora_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kiln_engine.layers.lora_kernels import (
    KERNELS_UP_TO_TOKENS,
    add_lora_delta,
    add_masked_lora_delta,
    lora_expand,
    lora_shrink,
    masked_shrink,
    slot_mask,
)

# (name, input width, output width, sub-projections): Llama-3-8B at tensor parallel 1.
PROJECTIONS = [
    ("qkv", 4096, 6144, 3),
    ("o", 4096, 4096, 1),
    ("gate_up", 4096, 28672, 2),
    ("down", 14336, 4096, 1),
]
CALLS_PER_GRAPH = 20
FORMS = ("base", "masked", "segments", "kernels", "stacked", "overlapped")


def graph_time_us(fn: Callable[[], object], replays: int = 10) -> float:
    """Microseconds per call of `fn`, captured CALLS_PER_GRAPH times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * CALLS_PER_GRAPH)


def slots_of(tokens: int, num_slots: int, mix: str) -> torch.Tensor:
    values = [0] * tokens if mix == "one" else [i % (num_slots + 1) - 1 for i in range(tokens)]
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def time_projection(
    x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, k: int
) -> dict[str, float]:
    """Microseconds of one projection's base GEMM and each form's delta, and the kernels' worst
    relative error against the masked form in fp32."""
    out = torch.zeros(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    num_slots = a.shape[0] // k
    mask = slot_mask(slots, num_slots, x.dtype)
    segments = [(s, (slots == s).nonzero().flatten()) for s in range(num_slots) if (slots == s).any()]

    def by_segments() -> None:  # the eager steps' form (LoraLinear.add_delta)
        for s, rows in segments:
            a_s, b_s = a[s * k : (s + 1) * k], b[:, s * k : (s + 1) * k]
            out.index_add_(0, rows, (x.index_select(0, rows) @ a_s.t()) @ b_s.t())

    base = graph_time_us(lambda: torch.mm(x, w.t(), out=out))
    times = {
        "base": base,
        "masked": graph_time_us(lambda: add_masked_lora_delta(x, out, a, b, mask, k)),
        "segments": graph_time_us(by_segments),
        "kernels": graph_time_us(lambda: add_lora_delta(x, out, a, b, slots, k)),
        "stacked": graph_time_us(stacked_layer(x, torch.cat([w, a]), b, mask, k)[0]) - base,
        "overlapped": graph_time_us(overlapped_layer(x, w, a, b, slots, mask, k, out)) - base,
    }
    zeros = torch.zeros_like(out, dtype=torch.float32)
    want = add_masked_lora_delta(x.float(), zeros, a.float(), b.float(), mask.float(), k)
    norm = want.norm().item()
    got = add_lora_delta(x, torch.zeros_like(out), a, b, slots, k).float()
    run, wide = stacked_layer(x, torch.cat([torch.zeros_like(w), a]), b, mask, k)
    run()
    got_stacked = wide[:, : w.shape[0]].float()
    overlapped_out = torch.empty_like(out)
    overlapped_layer(x, torch.zeros_like(w), a, b, slots, mask, k, overlapped_out)()
    torch.cuda.synchronize()
    got_overlapped = overlapped_out.float()
    errs = [(g - want).norm().item() / norm if norm > 0 else 0.0 for g in (got, got_stacked, got_overlapped)]
    return {**times, "rel_err": max(errs)}


def stacked_layer(
    x: torch.Tensor, w_and_a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[Callable[[], None], torch.Tensor]:
    """The `stacked` form: one GEMM against the base weight with every slot's A below it, then the
    masked x @ A^T columns through B into the base columns, in place. Returns the call and its
    output [tokens, out + slots * k] (the layer's output is the first `out` columns)."""
    tokens, n = x.shape[0], b.shape[0]
    wide = torch.empty(tokens, w_and_a.shape[0], device=x.device, dtype=x.dtype)

    def run() -> None:
        torch.mm(x, w_and_a.t(), out=wide)
        h = wide[:, n:].view(tokens, -1, k) * mask
        wide[:, :n].addmm_(h.view(tokens, -1), b.t())

    return run, wide


def overlapped_layer(
    x: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    out: torch.Tensor,
) -> Callable[[], None]:
    """The engine's form on a GPU: the delta's first half on a side stream beside the base GEMM."""
    side = torch.cuda.Stream()
    kernels = x.shape[0] <= KERNELS_UP_TO_TOKENS

    def run() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            h = lora_shrink(x, a, slots, k) if kernels else masked_shrink(x, a, mask, k)
        torch.mm(x, w.t(), out=out)
        torch.cuda.current_stream().wait_stream(side)
        if kernels:
            lora_expand(h, out, b, slots, k)
        else:
            out.addmm_(h, b.t())

    return run


def measure(tokens: int, num_slots: int, mix: str, rank: int) -> dict[str, float]:
    """One decoder layer: its projections' times summed, their worst relative error."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = slots_of(tokens, num_slots, mix)
    row = dict.fromkeys((*FORMS, "max_rel_err"), 0.0)

    def randn(rows: int, cols: int, scale: float) -> torch.Tensor:
        return torch.randn(rows, cols, device="cuda", generator=gen, dtype=torch.bfloat16) * scale

    for _name, width, n, subs in PROJECTIONS:
        k = subs * rank
        x = randn(tokens, width, 1.0)
        w, a = randn(n, width, width**-0.5), randn(num_slots * k, width, width**-0.5)
        r = time_projection(x, w, a, randn(n, num_slots * k, k**-0.5), slots, k)
        for key in FORMS:
            row[key] += r[key]
        row["max_rel_err"] = max(row["max_rel_err"], r["rel_err"])
    return {key: value if key == "max_rel_err" else round(value, 2) for key, value in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,16,32,64,128,256,2048")
    ap.add_argument("--slots", default="8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/results/lora_kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/lora_kernels.py times CUDA graphs: it needs a GPU")
    rows = []
    print(f"{'tokens':>6} {'slots':>5} {'mix':5} {'base us':>8} {'masked us':>9} {'segments us':>11} "
          f"{'kernels us':>10} {'stacked us':>10} {'overlap us':>10} "
          f"{'best/base':>9} {'rel err':>8}")  # fmt: skip
    for tokens in map(int, args.tokens.split(",")):
        for num_slots in map(int, args.slots.split(",")):
            for mix in ("mixed", "one"):
                r = measure(tokens, num_slots, mix, args.rank)
                rows.append({"tokens": tokens, "slots": num_slots, "mix": mix, **r})
                best = min(r[form] for form in FORMS[1:])
                print(f"{tokens:6d} {num_slots:5d} {mix:5} {r['base']:8.1f} {r['masked']:9.1f} "
                      f"{r['segments']:11.1f} {r['kernels']:10.1f} {r['stacked']:10.1f} "
                      f"{r['overlapped']:10.1f} "
                      f"{best / r['base']:8.2f}x {r['max_rel_err']:8.1e}", flush=True)  # fmt: skip
    record = {
        "what": "bench/lora_kernels.py: one Llama-3-8B layer's LoRA delta (qkv, o, gate_up, down), "
        "microseconds per call in CUDA graphs: masked form, per-slot segments, per-token kernels and "
        "A stacked under the base weight, the first half overlapped with the base GEMM on a side stream, "
        "next to the base GEMMs",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rank": args.rank,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
