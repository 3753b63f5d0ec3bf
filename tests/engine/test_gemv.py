"""The small-batch weight-streaming linear kernel equals the reference product, alone and inside the engine.

Runs on CPU under Triton's interpreter, in a fresh process (the interpreter must be chosen before
triton is imported).
"""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreted import interpret

pytestmark = pytest.mark.engine
pytest.importorskip("triton")

KERNEL_SCRIPT = r"""
import torch
torch.set_num_threads(1)
from kiln_engine.layers.gemv import MAX_ROWS, small_m_linear
from kiln_engine.quantization import dequantize_fp8, quantize_fp8, quantize_int8

import kiln_engine.layers.gemv as gemv

g = torch.Generator().manual_seed(0)
checked = 0
for prefetch, rows in ((p, r) for p in (False, True) for r in (1, 3, MAX_ROWS)):
    gemv.PREFETCH_FIRST_TILE = prefetch  # the first weight tile read before the loop, or in it
    for n, k in ((24, 64), (40, 200)):  # 40 x 200: neither a multiple of the 16 x 64 tile
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g)
        torch.testing.assert_close(small_m_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(small_m_linear(x, w, bias=bias), x @ w.T + bias, rtol=1e-5, atol=1e-4)
        q, s = quantize_fp8(w)
        ref = x @ dequantize_fp8(q, s, torch.float32).T
        torch.testing.assert_close(small_m_linear(x, q, s), ref, rtol=1e-5, atol=1e-4)
        q8, s8 = quantize_int8(w)
        ref8 = x @ (q8.float() * s8[:, None]).T
        torch.testing.assert_close(small_m_linear(x, q8, s8), ref8, rtol=1e-5, atol=1e-4)
        # leading dimensions are kept; a strided input is accepted
        x3 = torch.randn(1, rows, 2 * k, generator=g)[..., ::2]
        assert small_m_linear(x3, w).shape == (1, rows, n)
        torch.testing.assert_close(small_m_linear(x3, w), x3 @ w.T, rtol=1e-5, atol=1e-4)
        checked += 1
assert small_m_linear(torch.empty(0, 64), torch.randn(8, 64)).shape == (0, 8)
try:
    small_m_linear(torch.randn(MAX_ROWS + 1, 64), torch.randn(8, 64))
except ValueError as e:
    assert "at most" in str(e), e
else:
    raise AssertionError("too many rows accepted")
print("ok", checked)
"""

ENGINE_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint
from kiln_engine.testing.tiny import make_tiny_artifact
import kiln_engine.layers.gemv as gemv

calls = []
original = gemv.small_m_linear
def counting(*a, **kw):
    calls.append(a[0].shape)
    return original(*a, **kw)
gemv.small_m_linear = counting

ckpt = make_tiny_checkpoint(sys.argv[1] + "/ckpt", "llama")
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
for quant in ("fp8", "int8"):
    art = make_tiny_artifact(ckpt, sys.argv[1] + "/" + quant, quantization=quant)
    outs = {}
    for backend, graphs in (("torch", False), ("triton", True)):
        calls.clear()
        e = LLMEngine(art, EngineConfig(num_kv_blocks=64, block_size=4, max_tokens_per_step=32,
                                        attention_backend=backend, cuda_graphs=graphs, max_num_seqs=4,
                                        max_model_len=64))
        prompts = [e.tokenizer.encode(t) for t in ("Hello, world! How are you today?", "A", "The quick")]
        outs[backend] = e.generate(prompts, greedy)
        streamed = len(calls)
        # the reference path never streams; the fast path streams every decode step's projections
        assert (streamed == 0) == (backend == "torch"), (backend, streamed)
    assert outs["torch"] == outs["triton"], (quant, outs)
print("ok")
"""


def test_small_m_linear_matches_reference_product() -> None:
    out = interpret(KERNEL_SCRIPT, timeout=900)
    assert out.strip() == "ok 12", out[-2000:]


@pytest.mark.slow
def test_quantized_engine_streams_small_batches_and_keeps_its_tokens(tmp_path: os.PathLike[str]) -> None:
    interpret(ENGINE_SCRIPT, str(tmp_path), timeout=900)
