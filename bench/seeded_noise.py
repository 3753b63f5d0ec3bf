"""Seeded rows' sampling noise (issue #20): one counter-based Triton kernel for every seeded row of a
step (kiln_engine.seeded_noise) against the generator per request it replaced, measured in the same
run, plus its gate fixed before measuring: a Kolmogorov-Smirnov test against Exp(1) at the 1 % level.

    PYTHONPATH=engine-image python bench/seeded_noise.py      # needs a CUDA device

128 rows x a 128,256-token vocabulary (Llama 3's), 50 steps after 3 warm-ups.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from kiln_engine import seeded_noise

ROWS, VOCAB, STEPS = 128, 128_256, 50


def ms_per_step(step: Callable[[], object]) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEPS * 1e3


def main() -> None:
    noise = torch.empty(ROWS, VOCAB, device="cuda")
    rows = torch.arange(ROWS, device="cuda")
    keys = torch.tensor([seeded_noise.draw_key(seed, 0) for seed in range(ROWS)], device="cuda")
    seeded_noise.fill_rows(noise, rows, keys)
    drawn = noise[:4].flatten().double().sort().values
    n = drawn.numel()
    empirical = torch.arange(1, n + 1, device="cuda", dtype=torch.float64) / n
    ks = (empirical - (1 - torch.exp(-drawn))).abs().max().item()
    bound = 1.63 / math.sqrt(n)
    print(f"gate: Kolmogorov-Smirnov over {n} draws {ks:.5f} < {bound:.5f}: {ks < bound}")
    generators = [torch.Generator(device="cuda").manual_seed(seed) for seed in range(ROWS)]
    counter = ms_per_step(lambda: seeded_noise.fill_rows(noise, rows, keys))
    per_row = ms_per_step(lambda: [noise[r].exponential_(generator=g) for r, g in enumerate(generators)])
    print(f"{'seeded noise':<22} {'ms/step':>8}")
    print(f"{'generator per row':<22} {per_row:>8.3f}")
    print(f"{'counter kernel':<22} {counter:>8.3f}   {per_row / counter:.0f}x faster")


if __name__ == "__main__":
    main()
