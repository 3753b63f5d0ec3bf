"""Counter-based noise for seeded requests (kiln_engine.seeded_noise), run by Triton's interpreter on
CPU: each seeded row gets Exp(1) noise (Kolmogorov-Smirnov) that depends on its key alone, only its
row is written, and the sampler's race over it picks only tokens the model allows, the same tokens
for the same seed whatever else is in the batch."""

from __future__ import annotations

from kiln_engine.seeded_noise import draw_key
from tests.engine.interpreted import interpret

SCRIPT = r"""
import math
import torch
from kiln_engine import seeded_noise
from kiln_engine.interface import SamplingParams
from kiln_engine.sampler import SampleRequest, Sampler

# 1. Only the seeded rows are written, with Exp(1) noise that depends on the key alone.
noise = torch.full((4, 3000), -1.0)
rows = torch.tensor([1, 3])
keys = torch.tensor([seeded_noise.draw_key(7, 0), seeded_noise.draw_key(7, 1)])
seeded_noise.fill_rows(noise, rows, keys)
assert (noise[0] == -1).all() and (noise[2] == -1).all()
again = torch.zeros(2, 3000)
seeded_noise.fill_rows(again, torch.tensor([0, 1]), keys)
assert torch.equal(again, noise[[1, 3]])
assert not torch.equal(noise[1], noise[3])
drawn = noise[[1, 3]].flatten().double().sort().values
assert (drawn >= 0).all()
n = drawn.numel()
empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
ks = (empirical - (1 - torch.exp(-drawn))).abs().max().item()
assert ks < 1.63 / math.sqrt(n), ks  # Kolmogorov-Smirnov against Exp(1) at the 1 % level
assert abs(drawn.mean().item() - 1.0) < 0.1

# 2. The sampler's race over that noise draws tokens with the model's probabilities, and a seed
#    gives the same tokens whatever else is in the batch.
probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0])
logits = probs.clamp_min(1e-30).log()
def sample(sampler, seeds, steps=1):
    requests = [SampleRequest(f"r{seed}", SamplingParams(max_tokens=4, temperature=1.0, seed=seed))
                for seed in seeds]
    out = []
    for _ in range(steps):
        batch = sampler.prepare(requests, len(probs))
        out.append(sampler.sample(logits.expand(len(seeds), -1).clone(), batch)[0])
    return out
def counter_sampler():
    sampler = Sampler(torch.device("cpu"))
    sampler.counter_noise = True  # the CUDA path, interpreted
    return sampler
(tokens,) = sample(counter_sampler(), range(200))  # the interpreter takes ~20 ms a row
counts = torch.bincount(torch.tensor(tokens), minlength=len(probs))
assert counts[5:].sum() == 0 and (counts[:3] >= 10).all(), counts  # expected 80, 60, 30
alone = sample(counter_sampler(), [5], steps=3)
mixed = sample(counter_sampler(), [11, 5, 12], steps=3)
assert [step[0] for step in alone] == [step[1] for step in mixed], (alone, mixed)
print("ok")
"""


def test_draw_keys_differ_by_seed_and_draw_and_fit_int64() -> None:
    keys = {draw_key(seed, draw) for seed in range(50) for draw in range(50)}
    assert len(keys) == 2500
    assert all(0 <= key < 2**63 for key in keys)
    assert draw_key(2**64 + 3, 0) == draw_key(3, 0)  # seeds are taken mod 2**64


def test_seeded_noise_kernel_and_sampler_race_under_the_interpreter() -> None:
    out = interpret(SCRIPT, timeout=600)
    assert out.strip() == "ok", out[-2000:]
