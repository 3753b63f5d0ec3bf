"""The int4 GEMM reads AWQ's and GPTQ's packed tensors and equals the product with the unpacked
weight (quantization.unpack_awq / unpack_gptq), alone and as a quantized Linear's fast path.

Runs on CPU under Triton's interpreter, in a fresh process (the interpreter must be chosen before
triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("triton")

SCRIPT = r"""
import numpy as np
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from kiln_engine.config import QuantConfig
from kiln_engine.layers.int4_gemm import int4_linear
from kiln_engine.layers.linear import ColumnParallelLinear
from kiln_engine.layers.parallel import TPGroup
from kiln_engine.quantization import unpack_awq, unpack_gptq
from tests.engine.test_quantization import pack_awq_cols, pack_gptq_cols, pack_gptq_rows, random_int4

k, n, group = 128, 96, 32  # 96 outputs: not a multiple of the 64-wide tile
checked = 0
for fmt in ("awq", "gptq", "gptq-act-order"):
    q, z, s = random_int4(k, n, group, seed=checked)
    if fmt == "awq":
        packed = {"qweight": pack_awq_cols(q), "qzeros": pack_awq_cols(z), "scales": s}
        dense = unpack_awq(packed["qweight"], packed["qzeros"], s)
    else:
        g_idx = np.arange(k) // group
        if fmt == "gptq-act-order":
            g_idx = np.random.default_rng(5).permutation(g_idx)
        packed = {"qweight": pack_gptq_rows(q), "qzeros": pack_gptq_cols(z - 1), "scales": s,
                  "g_idx": torch.from_numpy(g_idx).int()}
        dense = unpack_gptq(packed["qweight"], packed["qzeros"], s, packed["g_idx"])
    args = (packed["qweight"], packed["qzeros"], s)
    for rows in (1, 5, 40):
        x = torch.randn(rows, k)
        bias = torch.randn(n)
        got = int4_linear(x, *args, None, packed.get("g_idx"))
        torch.testing.assert_close(got, F.linear(x, dense), rtol=1e-5, atol=1e-4)
        got = int4_linear(x[None], *args, bias, packed.get("g_idx"))
        assert got.shape == (1, rows, n)
        torch.testing.assert_close(got, F.linear(x[None], dense, bias), rtol=1e-5, atol=1e-4)
        checked += 1
    assert int4_linear(torch.empty(0, k), *args, None, packed.get("g_idx")).shape == (0, n)
    method = "awq" if fmt == "awq" else "gptq"
    layer = ColumnParallelLinear(k, n, False, QuantConfig(method=method, bits=4, group_size=group),
                                 torch.float32, TPGroup())
    for name, value in packed.items():
        layer.load(name, value)
    x = torch.randn(3, k)
    reference = layer(x)
    layer.fused = True  # the model runner's fast path
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-4)
print("ok", checked)
"""

ENGINE_SCRIPT = r"""
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import kiln_engine.layers.int4_gemm as int4_gemm
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint
from tests.engine.test_build import make_int4_checkpoint

calls = []
original = int4_gemm.int4_linear
def counting(*args, **kwargs):
    calls.append(args[0].shape)
    return original(*args, **kwargs)
int4_gemm.int4_linear = counting

root = Path(sys.argv[1])
base = make_tiny_checkpoint(root / "base", "llama", seed=5)
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
for method in ("awq", "gptq"):
    ckpt = make_int4_checkpoint(base, root / method, method, group=16)
    outs = {}
    for backend, graphs in (("torch", False), ("triton", True)):
        calls.clear()
        e = LLMEngine(ckpt, EngineConfig(num_kv_blocks=64, block_size=4, max_tokens_per_step=32,
                                         attention_backend=backend, cuda_graphs=graphs, max_num_seqs=4,
                                         max_model_len=64))
        prompts = [e.tokenizer.encode(t) for t in ("Hello, world! How are you today?", "A", "The quick")]
        outs[backend] = e.generate(prompts, greedy)
        # the reference path unpacks; the fast path multiplies the packed weights, prefill and decode
        assert (len(calls) == 0) == (backend == "torch"), (backend, len(calls))
    assert outs["torch"] == outs["triton"], (method, outs)
print("ok")
"""


def run_interpreted(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_int4_gemm_equals_the_unpacked_product() -> None:
    r = run_interpreted(SCRIPT)
    assert r.returncode == 0 and r.stdout.strip() == "ok 9", r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.slow
def test_int4_engines_keep_their_tokens_on_the_fast_path(tmp_path: os.PathLike[str]) -> None:
    r = run_interpreted(ENGINE_SCRIPT, str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
