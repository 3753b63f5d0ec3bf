"""The weight-only GEMMs equal the references' products: int4 read from AWQ's and GPTQ's packed
tensors against the unpacked weight (quantization.unpack_awq / unpack_gptq), int8 against the
weight cast to the activations' dtype; alone, as a quantized Linear's fast path, and in engines.

Runs on CPU under Triton's interpreter, in a fresh process (the interpreter must be chosen before
triton is imported).
"""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreted import interpret

pytestmark = pytest.mark.engine
pytest.importorskip("triton")

SCRIPT = r"""
import numpy as np
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from kiln_engine.config import QuantConfig
from kiln_engine.layers.weight_only_gemm import int4_linear, int8_linear
from kiln_engine.layers.linear import ColumnParallelLinear
from kiln_engine.layers.parallel import TPGroup
from kiln_engine.quantization import quantize_int8, unpack_awq, unpack_gptq
from tests.engine.test_quantization import pack_awq_cols, pack_gptq_cols, pack_gptq_rows, random_int4

from kiln_engine.layers.weight_only_gemm import split_k

n = 96  # not a multiple of the 64-wide tile
checked = 0
# (inputs, group): a small group; a K that decode batches split into 4 parts (the parts' partial
# sums added after); a group no power-of-two tile of 32 divides
cases = [(128, 32), (1024, 128), (192, 48)]
assert [split_k(1, n, k) for k, _ in cases] == [1, 4, 1] and split_k(65, n, 1024) == 1
for k, group in cases:
    for fmt in ("awq", "gptq", "gptq-act-order"):
        q, z, s = random_int4(k, n, group, seed=checked)
        g_idx = None
        if fmt == "awq":
            packed = {"qweight": pack_awq_cols(q), "qzeros": pack_awq_cols(z), "scales": s}
            dense = unpack_awq(packed["qweight"], packed["qzeros"], s)
        else:
            groups = np.arange(k) // group
            if fmt == "gptq-act-order":
                groups = np.random.default_rng(5).permutation(groups)
                g_idx = torch.from_numpy(groups).int()
            packed = {"qweight": pack_gptq_rows(q), "qzeros": pack_gptq_cols(z - 1), "scales": s,
                      "g_idx": torch.from_numpy(groups).int()}
            dense = unpack_gptq(packed["qweight"], packed["qzeros"], s, packed["g_idx"])
        args = (packed["qweight"], packed["qzeros"], s)
        gptq = fmt != "awq"
        for rows in (1, 5, 40):
            x = torch.randn(rows, k)
            bias = torch.randn(n)
            got = int4_linear(x, *args, None, gptq, g_idx)
            torch.testing.assert_close(got, F.linear(x, dense), rtol=1e-5, atol=1e-4)
            got = int4_linear(x[None], *args, bias, gptq, g_idx)
            assert got.shape == (1, rows, n)
            torch.testing.assert_close(got, F.linear(x[None], dense, bias), rtol=1e-5, atol=1e-4)
            checked += 1
        assert int4_linear(torch.empty(0, k), *args, None, gptq, g_idx).shape == (0, n)
        if k > 128:
            continue
        method = "awq" if fmt == "awq" else "gptq"
        layer = ColumnParallelLinear(k, n, False, QuantConfig(method=method, bits=4, group_size=group),
                                     torch.float32, TPGroup())
        for name, value in packed.items():
            layer.load(name, value)
        x = torch.randn(3, k)
        reference = layer(x)
        layer.fused = True  # the model runner's fast path
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-4)
        assert layer.__dict__.get("gptq_act_order") == ({"awq": None, "gptq": False}.get(fmt, True))
k = 128
for rows in (1, 5, 40):  # int8: the product of the weight cast to x's dtype, times the scales
    w8, scale = quantize_int8(torch.randn(n, k))
    x, bias = torch.randn(rows, k), torch.randn(n)
    reference = F.linear(x, w8.float()) * scale
    torch.testing.assert_close(int8_linear(x, w8, scale, None), reference, rtol=1e-5, atol=1e-4)
    with_bias = int8_linear(x[None], w8, scale, bias)
    torch.testing.assert_close(with_bias, (reference + bias)[None], rtol=1e-5, atol=1e-4)
    checked += 1
assert int8_linear(torch.empty(0, k), w8, scale, None).shape == (0, n)
layer = ColumnParallelLinear(k, n, False, QuantConfig(method="int8"), torch.float32, TPGroup())
layer.load("weight", w8)
layer.load("weight_scale", scale)
x = torch.randn(40, k)  # past the 16 rows that gemv streams
reference = layer(x)
layer.fused = True
torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-4)
print("ok", checked)
"""

ENGINE_SCRIPT = r"""
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import kiln_engine.layers.weight_only_gemm as weight_only_gemm
from kiln_engine.testing.tiny import make_tiny_artifact
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint
from tests.engine.test_build import make_int4_checkpoint

calls = []
def counting(original):
    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)
    return counted
weight_only_gemm.int4_linear = counting(weight_only_gemm.int4_linear)
weight_only_gemm.int8_linear = counting(weight_only_gemm.int8_linear)

root = Path(sys.argv[1])
base = make_tiny_checkpoint(root / "base", "llama", seed=5)
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
for method in ("awq", "gptq", "int8"):
    if method == "int8":
        ckpt = make_tiny_artifact(base, root / method, quantization="int8")
    else:
        ckpt = make_int4_checkpoint(base, root / method, method, group=16)
    outs = {}
    for backend, graphs in (("torch", False), ("triton", True)):
        calls.clear()
        e = LLMEngine(ckpt, EngineConfig(num_kv_blocks=64, block_size=4, max_tokens_per_step=32,
                                         attention_backend=backend, cuda_graphs=graphs, max_num_seqs=4,
                                         max_model_len=64))
        texts = ("Hello, world! How are you today? Fine, thank you.", "A", "The quick brown fox jumps")
        prompts = [e.tokenizer.encode(t) for t in texts]
        assert sum(map(len, prompts)) > 16  # a prefill past what gemv streams
        outs[backend] = e.generate(prompts, greedy)
        # the reference path makes dense weights; the fast path multiplies the stored ones (int8's
        # prefill chunks: its decode steps stream through gemv)
        assert (len(calls) == 0) == (backend == "torch"), (backend, len(calls))
    assert outs["torch"] == outs["triton"], (method, outs)
print("ok")
"""


def test_weight_only_gemms_equal_the_reference_products() -> None:
    out = interpret(SCRIPT, timeout=900)
    assert out.strip() == "ok 30", out[-2000:]


@pytest.mark.slow
def test_weight_only_engines_keep_their_tokens_on_the_fast_path(tmp_path: os.PathLike[str]) -> None:
    interpret(ENGINE_SCRIPT, str(tmp_path), timeout=900)
