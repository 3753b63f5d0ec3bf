"""The Triton kernels (paged attention, fused norm/SwiGLU/RoPE+KV store/fp8 quant) equal the torch reference.

They run on CPU under Triton's interpreter, each in a fresh process (the interpreter must be chosen
before triton is imported).
"""

from __future__ import annotations

import os

import pytest

from tests.engine.interpreted import interpret

pytestmark = pytest.mark.engine
pytest.importorskip("triton")

# The interpreter must be chosen before triton is imported, so the checks run in a fresh process.
SCRIPT = r"""
import torch
torch.set_num_threads(1)
from kiln_engine.layers.attention import AttentionMetadata, TorchAttentionBackend, write_kv
from kiln_engine.layers.triton_attention import TritonAttentionBackend

def case(chunks, block_size, heads, kv_heads, head_dim, window, seed,
         dtype=torch.float32, tol=1e-4, split_keys=10**9, prefill_m=16, softcap=None, sinks=False):
    # chunks: (cached_prefix_len, new_tokens) per sequence
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in chunks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables, slots, qsl, lens = [], [], [0], []
    for c, n in chunks:
        nb = -(-(c + n) // block_size)
        t = [perm.pop() for _ in range(nb)]
        tables.append(t)
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
        lens.append(c + n)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_lens=torch.tensor([n for _, n in chunks], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in chunks), max_seq_len=max(lens), block_size=block_size)
    T = qsl[-1]
    q = torch.randn(T, heads, head_dim, generator=g)
    k = torch.randn(T, kv_heads, head_dim, generator=g)
    v = torch.randn(T, kv_heads, head_dim, generator=g)
    q, k, v, k_cache, v_cache = (t.to(dtype) for t in (q, k, v, k_cache, v_cache))
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    ref_backend = TorchAttentionBackend()
    ref_backend.prepare(meta)
    scale = head_dim ** -0.5
    qf, kf, vf = q.float(), k_cache.float(), v_cache.float()
    sink = (torch.randn(heads, generator=g) * 2).to(dtype) if sinks else None
    ref = ref_backend.forward(qf, kf, vf, meta, scale, window, softcap=softcap, sinks=sink)
    if softcap is not None or sinks:  # the cap or the sinks must matter for this input
        assert (ref - ref_backend.forward(qf, kf, vf, meta, scale, window)).abs().max() > 0.1
    backend = TritonAttentionBackend(block_m=16, block_n=16, max_splits=4, split_min_keys=split_keys,
                                     prefill_block_m=prefill_m, prefill_block_n=16)
    assert (backend.num_splits(meta, kv_heads) > 1) == (split_keys < 10**9)
    got = backend.forward(q, k_cache, v_cache, meta, scale, window, softcap=softcap, sinks=sink)
    assert got.dtype == dtype
    err = (got.float() - ref).abs().max().item()
    assert err < tol, (chunks, block_size, window, dtype, err)

# decode only; prefill only; chunks over cached prefixes; mixed; GQA 4:1 and MHA; odd head_dim
case([(0, 1), (7, 1), (40, 1)], 4, 4, 2, 16, None, 0)
case([(0, 23), (0, 5)], 16, 4, 1, 16, None, 1)
case([(12, 9), (33, 20), (3, 1), (0, 37)], 4, 8, 2, 16, None, 2)
case([(12, 9), (33, 20), (3, 1), (0, 37)], 4, 8, 2, 16, None, 2, prefill_m=64)  # the GPU's prefill tile
case([(5, 17), (50, 1)], 8, 2, 2, 24, None, 3)
case([(10, 30), (60, 1), (0, 9)], 4, 4, 2, 16, 8, 4)
# Half precision on tensor cores; fp16 (Triton's CPU interpreter computes bf16 dots wrongly).
case([(12, 9), (33, 1), (0, 20)], 16, 4, 2, 16, None, 5, torch.float16, 1e-2)
# Split-K decode: key ranges shared by several programs (some empty), merged afterwards.
case([(0, 1), (7, 1), (40, 1)], 4, 4, 2, 16, None, 6, split_keys=16)
case([(63, 1), (20, 1)], 16, 8, 2, 16, None, 7, split_keys=8)
case([(50, 1), (9, 1)], 4, 4, 2, 16, 8, 8, split_keys=12)
# Gemma 2's tanh soft-cap on the scores: chunks over a window, and split-K decode
case([(10, 30), (60, 1), (0, 9)], 4, 4, 2, 32, 8, 9, softcap=0.5)
case([(50, 1), (9, 1)], 4, 4, 2, 16, None, 10, split_keys=12, softcap=0.5)
# gpt-oss's per-head sinks: prefill chunks with a window, and split-K decode (the merge adds them)
case([(10, 30), (60, 1), (0, 9)], 4, 4, 2, 16, 8, 11, sinks=True)
case([(50, 1), (9, 1), (0, 1)], 4, 4, 2, 16, None, 12, split_keys=12, sinks=True)
print("ok")
"""


def test_triton_kernel_matches_torch_reference() -> None:
    interpret(SCRIPT, timeout=600)


ENGINE_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint
path = make_tiny_checkpoint(sys.argv[1], "qwen3")
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
outs = {}
for backend, graphs in (("torch", False), ("triton", False), ("triton", True)):
    e = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_tokens_per_step=16,
                                     attention_backend=backend, cuda_graphs=graphs, max_num_seqs=4,
                                     max_model_len=64))
    texts = ("Hello, world! How are you today?", "A", "The quick brown fox")
    prompts = [e.tokenizer.encode(t) for t in texts]
    outs[(backend, graphs)] = e.generate(prompts, greedy)
assert outs[("torch", False)] == outs[("triton", False)] == outs[("triton", True)], outs
print("ok")
"""


@pytest.mark.slow
def test_engine_with_triton_backend_generates_the_same_tokens(tmp_path: os.PathLike[str]) -> None:
    interpret(ENGINE_SCRIPT, str(tmp_path), timeout=600)


FUSED_SCRIPT = r"""
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from kiln_engine.config import RopeConfig
from kiln_engine.layers import fused
from kiln_engine.layers.attention import write_kv
from kiln_engine.layers.norm import GemmaRMSNorm, RMSNorm
from kiln_engine.layers.rotary import RotaryEmbedding
from kiln_engine.quantization import FP8_DTYPE, FP8_MAX

g = torch.Generator().manual_seed(0)

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
    # (add +) RMSNorm, hidden not a power of two, non-contiguous rows
    norm = RMSNorm(96, 1e-5, dtype)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(7, 200, generator=g).to(dtype)[:, :96]
    r = torch.randn(7, 96, generator=g).to(dtype)
    ref_out, ref_res = norm.add_forward(x, r)
    out, res = fused.rms_norm(x, norm.weight, 1e-5, r)
    assert rel(res, ref_res) == 0.0, "residual add"
    assert rel(out, ref_out) < tol, ("add+norm", dtype, rel(out, ref_out))
    assert rel(fused.rms_norm(x, norm.weight, 1e-5)[0], norm(x)) < tol, "norm"
    # SwiGLU over [T, 2n], n not a multiple of the block
    h = torch.randn(5, 2 * 1500, generator=g).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    assert rel(fused.silu_and_mul(h), F.silu(gate) * up) < tol, "silu_and_mul"
    # Gemma: the (1 + w) float32 weight after normalizing (with the residual add), GeGLU (tanh gelu)
    gemma_norm = GemmaRMSNorm(96, 1e-6)
    gemma_norm.load("w", torch.randn(96, generator=g) * 0.5)
    ref_out, ref_res = gemma_norm.add_forward(x, r)
    out, res = fused.rms_norm(x, gemma_norm.weight, 1e-6, r, weight_in_fp32=True)
    assert rel(res, ref_res) == 0.0 and rel(out, ref_out) < tol, ("gemma norm", dtype, rel(out, ref_out))
    geglu = F.gelu(gate, approximate="tanh") * up
    assert rel(fused.silu_and_mul(h, gelu_tanh=True), geglu) < tol, ("geglu", dtype)
    # RoPE (llama3 scaling) on strided q/k views of a fused qkv, K/V written to a paged cache
    hq, hk, d, T = 4, 2, 16, 6
    rope = RotaryEmbedding(RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0,
                                      original_max_position_embeddings=32), d, 64, 128)
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 5, 77, 3, 127])
    slots = torch.tensor([3, 9, 0, 17, 30, 22])
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hk, d), v.view(T, hk, d)
    ref_q, ref_k = rope(pos, q.clone(), k.clone())
    kc_ref = torch.zeros(8, 4, hk, d, dtype=dtype); vc_ref = torch.zeros_like(kc_ref)
    write_kv(ref_k, v, kc_ref, vc_ref, slots)
    kc = torch.full_like(kc_ref, float("nan")); vc = torch.full_like(kc, float("nan"))
    kc.view(-1, hk, d)[slots] = 0; vc.view(-1, hk, d)[slots] = 0
    got_q = fused.rope_and_store_kv(pos, q, k, v, rope.cos_sin, kc, vc, slots)
    assert got_q.data_ptr() == q.data_ptr(), "q rotated in place"
    assert rel(got_q, ref_q) < tol, ("rope q", dtype, rel(got_q, ref_q))
    assert rel(kc.view(-1, hk, d)[slots], kc_ref.view(-1, hk, d)[slots]) < tol, "rope k into cache"
    assert torch.equal(vc.view(-1, hk, d)[slots], vc_ref.view(-1, hk, d)[slots]), "v into cache"
    untouched = torch.ones(32, dtype=torch.bool); untouched[slots] = False
    assert kc.view(-1, hk, d)[untouched].isnan().all(), "no writes outside the slots"

# fp8 per-token quantization, as `_fp8_scaled_mm` defines it
x = torch.randn(9, 300, generator=g) * torch.logspace(-3, 2, 9)[:, None]
scale_ref = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
q_ref = (x / scale_ref).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
q, scale = fused.quant_fp8_per_token(x)
assert torch.allclose(scale, scale_ref, rtol=1e-6), "fp8 scales"
# Triton's CPU interpreter drops the carry when rounding up to the next power of two (126.4 -> 64,
# not 128); the GPU converts in hardware. Everything else must be bit-identical.
diff = q.float() != q_ref.float()
assert diff.float().mean().item() < 0.05, "fp8 values"
assert torch.equal(q.float()[diff] * 2, q_ref.float()[diff]), "only the interpreter's carry differs"
print("ok")
"""


def test_fused_kernels_match_torch_reference() -> None:
    interpret(FUSED_SCRIPT, timeout=600)
