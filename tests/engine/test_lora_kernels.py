"""The decode graphs' batched LoRA kernels (layers/lora_kernels.py) against the masked torch form
they replace, under Triton's interpreter on CPU: each token gets its own slot's delta, base-model
and padding tokens (slot -1) none, at several slot counts, ranks and widths; which graph sizes take
them; and the startup check that falls back to the masked form when the kernels fail."""

from __future__ import annotations

import pytest

from tests.engine.interpreted import interpret

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = r"""
import torch
from kiln_engine.layers.lora_kernels import add_lora_delta
torch.manual_seed(0)

def masked(x, out, a, b, slots, k):
    s = a.shape[0] // k
    mask = torch.nn.functional.one_hot((slots.long() + s + 1) % (s + 1), s + 1)[:, :s].unsqueeze(-1).float()
    h = (x @ a.t()).view(x.shape[0], s, k) * mask
    return out + h.view(x.shape[0], -1) @ b.t()

def case(tokens, width, n, num_slots, k, slots):
    x = torch.randn(tokens, width)
    a = torch.randn(num_slots * k, width) / width**0.5
    b = torch.randn(n, num_slots * k)
    out = torch.randn(tokens, n)
    s = torch.tensor(slots, dtype=torch.int32)
    want = masked(x, out.clone(), a, b, s, k)
    got = add_lora_delta(x, out, a, b, s, k)
    assert got is out
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    base = [i for i, v in enumerate(slots) if v < 0]
    assert torch.equal(got[base], out[base])

case(5, 200, 70, 3, 16, [0, -1, 2, 2, 1])  # widths not multiples of the blocks
case(4, 64, 64, 1, 8, [0, 0, 0, 0])  # one slot, every token
case(5, 2000, 70, 3, 16, [2, 0, -1, 2, 1])  # input channels in 3 shares, the last one short
case(6, 96, 130, 4, 48, [3, -1, -1, 1, 3, 0])  # a fused qkv's k = 3 x rank 16
case(3, 64, 64, 2, 16, [-1, -1, -1])  # no adapter in the batch: out unchanged

# Decode graphs take the kernels up to KERNELS_UP_TO_TOKENS rows and the masked form above, whose
# mask then gives the same delta.
from kiln_engine.layers.lora_kernels import KERNELS_UP_TO_TOKENS, add_masked_lora_delta
from kiln_engine.lora_layers import LoraBatch
batch = LoraBatch(kernels=True, num_slots=3, dtype=torch.float32)
for rows in (1, KERNELS_UP_TO_TOKENS, KERNELS_UP_TO_TOKENS + 1, 4 * KERNELS_UP_TO_TOKENS):
    slots = torch.tensor([i % 4 - 1 for i in range(rows)], dtype=torch.int32)
    batch.set_slots(slots)
    assert (batch.mask is None) == (rows <= KERNELS_UP_TO_TOKENS), rows
    if batch.mask is not None:
        x, a, b, out = torch.randn(rows, 64), torch.randn(48, 64), torch.randn(32, 48), torch.randn(rows, 32)
        want = add_lora_delta(x, out.clone(), a, b, slots, 16)
        assert torch.allclose(add_masked_lora_delta(x, out, a, b, batch.mask, 16), want, atol=1e-4)
batch.kernels = False
batch.set_slots(torch.tensor([0], dtype=torch.int32))
assert batch.mask is not None  # kernels off (failed check, lora_kernels=False): masked at every size

# Eager steps: per-slot segments, or on a GPU the masked form; one adapter on every token: its GEMMs.
for eager_masked in (False, True):
    batch.eager_masked = eager_masked
    batch.set_segments([1, 1, -1, 0], torch.device("cpu"))
    if eager_masked:
        assert batch.segments == [] and batch.slots.tolist() == [1, 1, -1, 0]
        assert batch.mask[:, :, 0].tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]]
    else:
        assert batch.slots is None and batch.mask is None
        assert [(s, rows.tolist()) for s, rows in batch.segments] == [(0, [3]), (1, [0, 1])]
    batch.set_segments([2, 2], torch.device("cpu"))
    assert batch.segments == [(2, None)] and batch.slots is None and batch.mask is None

# The startup check passes the kernels, and refuses them when they fail or compute wrongly.
import kiln_engine.layers.lora_kernels as lk
assert lk.check_lora_kernels(torch.device("cpu"), torch.float32) is None
def fails(*args):
    raise RuntimeError("no kernel")
lk.add_lora_delta = fails
assert lk.check_lora_kernels(torch.device("cpu"), torch.float32) == "RuntimeError: no kernel"
lk.add_lora_delta = lambda x, out, *rest: out  # no delta at all
assert "relative error" in lk.check_lora_kernels(torch.device("cpu"), torch.float32)
print("ok")
"""


def test_batched_lora_kernels_match_the_masked_form() -> None:
    interpret(SCRIPT, timeout=600)
