"""The batched LoRA kernels (layers/lora_kernels.py), per-token and tiled, against the masked torch
form, under Triton's interpreter on CPU: each token gets its own slot's delta, base-model and
padding tokens (slot -1) none, at several slot counts, ranks, widths and token counts (tiles
holding several slots, and none); which steps take which form; and the startup check that falls
back to the masked form when the kernels fail."""

from __future__ import annotations

import pytest

from tests.engine.interpreted import interpret

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = r"""
import torch
from kiln_engine.layers.lora_kernels import add_lora_delta, add_tiled_lora_delta
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
    base = [i for i, v in enumerate(slots) if v < 0]
    for form in (add_lora_delta, add_tiled_lora_delta):
        start = out.clone()
        got = form(x, start, a, b, s, k)
        assert got is start
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (form.__name__, (got - want).abs().max())
        assert torch.equal(got[base], out[base])

case(5, 200, 70, 3, 16, [0, -1, 2, 2, 1])  # widths not multiples of the blocks
case(4, 64, 64, 1, 8, [0, 0, 0, 0])  # one slot, every token
case(5, 2000, 70, 3, 16, [2, 0, -1, 2, 1])  # input channels in 3 shares, the last one short
case(6, 96, 130, 4, 48, [3, -1, -1, 1, 3, 0])  # a fused qkv's k = 3 x rank 16
case(3, 64, 64, 2, 16, [-1, -1, -1])  # no adapter in the batch: out unchanged
# Tiles of 64 tokens: runs of 7 tokens per slot (a prefill's shape), tiles with 2-6 slots, the last
# tile short; and a tile of base-model tokens only between adapter tiles.
case(150, 300, 100, 5, 32, [(i // 7) % 6 - 1 for i in range(150)])
case(192, 80, 40, 2, 16, [0] * 64 + [-1] * 64 + [1] * 64)

# Decode graphs take the per-token kernels up to KERNELS_UP_TO_TOKENS rows and the tiled ones above;
# eager steps the tiled ones; with the kernels off, graphs the masked form and eager steps segments.
from kiln_engine.layers.lora_kernels import KERNELS_UP_TO_TOKENS
from kiln_engine.lora_layers import LoraBatch
batch = LoraBatch(kernels=True, num_slots=3, dtype=torch.float32)
for rows in (1, KERNELS_UP_TO_TOKENS, KERNELS_UP_TO_TOKENS + 1, 4 * KERNELS_UP_TO_TOKENS):
    batch.set_slots(torch.tensor([i % 4 - 1 for i in range(rows)], dtype=torch.int32))
    assert batch.mask is None and batch.tiled == (rows > KERNELS_UP_TO_TOKENS), rows
batch.set_segments([0, 0, -1, 2], torch.device("cpu"))
assert batch.tiled and batch.segments == [] and batch.slots.tolist() == [0, 0, -1, 2]
batch.kernels = False
batch.set_slots(torch.tensor([0], dtype=torch.int32))
assert batch.mask is not None and not batch.tiled  # kernels off (failed check, lora_kernels=False)
batch.set_segments([0, 0, -1, 2], torch.device("cpu"))
assert batch.slots is None and [s for s, _ in batch.segments] == [0, 2]

# The startup check passes the kernels, and refuses them when they fail or compute wrongly.
import kiln_engine.layers.lora_kernels as lk
assert lk.check_lora_kernels(torch.device("cpu"), torch.float32) is None
def fails(*args):
    raise RuntimeError("no kernel")
lk.add_lora_delta = fails
assert lk.check_lora_kernels(torch.device("cpu"), torch.float32) == "fails: RuntimeError: no kernel"
lk.add_lora_delta = lambda x, out, *rest: out  # no delta at all
assert "relative error" in lk.check_lora_kernels(torch.device("cpu"), torch.float32)
print("ok")
"""


def test_batched_lora_kernels_match_the_masked_form() -> None:
    interpret(SCRIPT, timeout=600)
