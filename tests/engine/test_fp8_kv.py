"""An fp8 (e4m3, per-head scales) KV cache: the Triton kernels equal the torch reference reading the
same fp8 cache, and the trained tiny model keeps its greedy tokens and its logits within a bound
fixed before measuring (issue 18).

Bounds, fixed before the first run:
* Triton paged attention vs the torch reference over the same fp8 cache: max abs error 1e-4 in
  float32, 1e-2 in float16 (the bounds of the float-cache kernel test).
* The fused RoPE + store kernel writes the bytes `write_kv` writes, except where Triton's CPU
  interpreter drops the rounding carry to the next power of two (the fp8 quant test's allowance).
* Attention over the fp8 cache vs over the unquantized cache: relative (norm) error below 8%
  (e4m3 keeps 3 mantissa bits: rounding error up to 1/16 per element).
* examples/tiny-chat, greedy: fp8 KV gives the float32 cache's tokens on every prompt, and its
  logits' max relative error against the float32 model may be at most 2x that of the same model in
  bfloat16 (weights and cache) against the float32 model, the gate style of issue 18. It did not
  hold: `test_tiny_chat_gate_with_fp8_kv` is a strict xfail that records the measured numbers.
* The issue's fp8-dequantized reference (fixed 2026-12-06, before its first run): transformers'
  float32 tiny-chat with its keys (after RoPE) and values rounded through e4m3 at the same scales;
  Kiln's fp8-KV logit error at most 2x that reference's, prompt by prompt, and the same greedy
  tokens (`test_tiny_chat_fp8_kv_adds_no_error_beyond_e4m3_rounding`): whether Kiln's cache adds
  error of its own beyond the format's rounding, which the bf16-referenced gate cannot tell.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.interpreted import interpret

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.engine
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TINY_CHAT = ROOT / "examples" / "tiny-chat"

KERNEL_SCRIPT = r"""
import torch
torch.set_num_threads(1)
from kiln_engine.config import RopeConfig
from kiln_engine.layers import fused
from kiln_engine.layers.attention import FP8_KV_DTYPE, AttentionMetadata, TorchAttentionBackend, write_kv
from kiln_engine.layers.rotary import RotaryEmbedding
from kiln_engine.layers.triton_attention import TritonAttentionBackend

def case(chunks, block_size, heads, kv_heads, head_dim, window, seed, dtype=torch.float32, tol=1e-4,
         split_keys=10**9):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in chunks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, new_slots, qsl, lens = [], [], [], [0], []
    for c, n in chunks:  # every position is written here: the cached prefix, then the new tokens
        t = [perm.pop() for _ in range(-(-(c + n) // block_size))]
        tables.append(t)
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c + n)]
        new_slots += slots[len(slots) - n:]
        qsl.append(qsl[-1] + n)
        lens.append(c + n)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(new_slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_lens=torch.tensor([n for _, n in chunks], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in chunks), max_seq_len=max(lens), block_size=block_size)
    q = torch.randn(qsl[-1], heads, head_dim, generator=g).to(dtype)
    k = torch.randn(len(slots), kv_heads, head_dim, generator=g) * 4
    v = torch.randn(len(slots), kv_heads, head_dim, generator=g)
    # Per-head scales at amax / 448 (calibrated), uneven across heads.
    ks = k.abs().amax((0, 2)) / 448 * torch.linspace(1.0, 1.5, kv_heads)
    vs = v.abs().amax((0, 2)) / 448
    kc = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=FP8_KV_DTYPE)
    vc = torch.zeros_like(kc)
    write_kv(k, v, kc, vc, torch.tensor(slots), ks, vs)
    kf = torch.zeros(kc.shape)
    vf = torch.zeros_like(kf)
    write_kv(k, v, kf, vf, torch.tensor(slots))
    ref = TorchAttentionBackend()
    ref.prepare(meta)
    scale = head_dim ** -0.5
    want = ref.forward(q.float(), kc, vc, meta, scale, window, ks, vs)
    exact = ref.forward(q.float(), kf, vf, meta, scale, window)
    rel = ((want - exact).norm() / exact.norm()).item()
    assert rel < 0.08, ("fp8 cache vs float cache", chunks, rel)
    backend = TritonAttentionBackend(block_m=16, block_n=16, max_splits=4, split_min_keys=split_keys,
                                     prefill_block_m=16, prefill_block_n=16)
    got = backend.forward(q, kc, vc, meta, scale, window, ks, vs)
    err = (got.float() - want).abs().max().item()
    assert err < tol, (chunks, dtype, err)
    return rel

rels = [
    case([(0, 1), (7, 1), (40, 1)], 4, 4, 2, 16, None, 0),  # decode
    case([(12, 9), (33, 1), (0, 7)], 4, 8, 2, 16, 8, 2),  # chunks over prefixes, mixed, sliding window
    case([(12, 9), (33, 1), (0, 20)], 16, 4, 2, 16, None, 5, torch.float16, 1e-2),
    case([(63, 1), (20, 1)], 16, 8, 2, 16, None, 7, split_keys=8),  # split-K decode
]
print("fp8-vs-float attention rel error", max(rels))

# Fused RoPE + fp8 store == rope, then write_kv's quantization.
g = torch.Generator().manual_seed(1)
hq, hk, d, T = 4, 2, 16, 6
rope = RotaryEmbedding(RopeConfig(theta=10000.0), d, 64, 64)
q = torch.randn(T, hq, d, generator=g)
k = torch.randn(T, hk, d, generator=g) * 3
v = torch.randn(T, hk, d, generator=g)
pos = torch.tensor([0, 1, 5, 33, 3, 63])
slots = torch.tensor([3, 9, 0, 17, 30, 22])
ks, vs = torch.tensor([0.01, 0.02]), torch.tensor([0.004, 0.003])
ref_q, ref_k = rope(pos, q.clone(), k.clone())
kc_ref = torch.zeros(8, 4, hk, d, dtype=FP8_KV_DTYPE)
vc_ref = torch.zeros_like(kc_ref)
write_kv(ref_k, v, kc_ref, vc_ref, slots, ks, vs)
kc, vc = torch.zeros_like(kc_ref), torch.zeros_like(kc_ref)
fused.rope_and_store_kv(pos, q, k, v, rope.cos_sin, kc, vc, slots, ks, vs)
assert torch.allclose(q, ref_q, atol=1e-5), "rope q"
for got, want in ((kc, kc_ref), (vc, vc_ref)):
    got, want = got.float(), want.float()
    diff = got != want
    assert diff.float().mean().item() < 0.05, diff.float().mean().item()
    assert torch.equal(got[diff] * 2, want[diff]), "only the interpreter's carry differs"
    assert want.abs().max().item() == 448.0, "saturates instead of overflowing to NaN"
print("ok")
"""


def test_triton_kernels_with_fp8_cache_match_torch_reference() -> None:
    interpret(KERNEL_SCRIPT, timeout=300)


PROMPTS = ("What is Kiln?", "Hello", "Tell me about the operator and its engine.")


def _engine(dtype: str, kv: str, **over: object) -> object:
    from kiln_engine.config import EngineConfig
    from kiln_engine.engine import LLMEngine

    cfg = dict(num_kv_blocks=64, block_size=4, max_num_seqs=4, max_model_len=128, dtype=dtype)
    cfg.update(over)
    return LLMEngine(TINY_CHAT, EngineConfig(kv_cache_dtype=kv, attention_backend="torch", **cfg))  # type: ignore[arg-type]


def _teacher_forced_logits(engine: object, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of `tokens`, one prefill step through the engine's paged cache."""
    from kiln_engine.layers.attention import AttentionMetadata

    runner = engine.runner  # type: ignore[attr-defined]
    n, bs = len(tokens), runner.block_size
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(-(-n // bs), dtype=torch.int32)[None],
        max_query_len=n,
        max_seq_len=n,
        block_size=bs,
    )
    with torch.inference_mode():
        runner.backend.prepare(meta)
        hidden = runner.model(torch.tensor(tokens), torch.arange(n), meta)
        return runner.model.compute_logits(hidden).float()


def test_fp8_cache_has_twice_the_blocks_and_serves_cached_prefixes() -> None:
    from kiln_engine.interface import SamplingParams

    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    fp8 = _engine("float32", "fp8")
    bf16 = _engine("bfloat16", "auto")
    assert fp8.runner.kv_cache.dtype == torch.float8_e4m3fn  # type: ignore[attr-defined]
    # Same memory, twice the blocks of a bf16 cache.
    assert 2 * fp8.runner.kv_block_bytes() == bf16.runner.kv_block_bytes()  # type: ignore[attr-defined]
    prompts = [fp8.tokenizer.encode(p) for p in PROMPTS]  # type: ignore[attr-defined]
    first = fp8.generate(prompts, greedy)  # type: ignore[attr-defined]
    # A second pass reuses the cached fp8 prefix blocks and must give the same tokens.
    assert fp8.generate(prompts, greedy) == first  # type: ignore[attr-defined]
    assert fp8.stats().prefix_cache_hit_tokens_total > 0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown kv_cache_dtype"):
        _engine("float32", "int4")


@pytest.mark.xfail(
    strict=True,
    reason="measured on CPU (float32 model, unit fp8 scales): one of 3 prompts flips a token after its "
    "EOS (position 19 of 24), and fp8 KV's max relative logit error (4.1-6.3%) is 5.3-7.7x the bfloat16 "
    "model's (0.5-1.1%), over the 2x bound fixed before measuring; calibrated scales (amax/448) gave "
    "2.1-4.1% (2.7-4.3x), still over it. issue 18",
)
def test_tiny_chat_gate_with_fp8_kv() -> None:
    from kiln_engine.interface import SamplingParams

    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _engine("float32", "auto")
    fp8 = _engine("float32", "fp8")
    bf16 = _engine("bfloat16", "auto")
    prompts = [ref.tokenizer.encode(p) for p in PROMPTS]  # type: ignore[attr-defined]
    want = ref.generate(prompts, greedy)  # type: ignore[attr-defined]

    def max_rel(engine: object, tokens: list[int]) -> float:
        exact = _teacher_forced_logits(ref, tokens)
        got = _teacher_forced_logits(engine, tokens)
        return ((got - exact).abs().amax(-1) / exact.abs().amax(-1)).max().item()

    errors = [(max_rel(fp8, p + o), max_rel(bf16, p + o)) for p, o in zip(prompts, want, strict=True)]
    assert all(f <= 2 * b for f, b in errors), errors
    assert fp8.generate(prompts, greedy) == want  # type: ignore[attr-defined]


def _transformers_with_e4m3_kv() -> tuple[object, object]:
    """transformers' float32 tiny-chat whose keys (after RoPE, where Kiln's cache stores them) and
    values pass through e4m3 and back at unit scales, as Kiln's cache does; (model, undo patch)."""
    import transformers
    from transformers.models.llama import modeling_llama

    from kiln_engine.layers.attention import FP8_KV_DTYPE, FP8_KV_MAX

    def e4m3(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE).to(x.dtype)

    rotate = modeling_llama.apply_rotary_pos_emb

    def rotate_then_round_keys(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = rotate(*args, **kwargs)
        return q, e4m3(k)

    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_CHAT, dtype=torch.float32).eval()
    for layer in model.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out: e4m3(out))
    modeling_llama.apply_rotary_pos_emb = rotate_then_round_keys

    def undo() -> None:
        modeling_llama.apply_rotary_pos_emb = rotate

    return model, undo


def test_tiny_chat_fp8_kv_adds_no_error_beyond_e4m3_rounding() -> None:
    """Issue 18's gate with its fp8-dequantized reference: the reference for an fp8 path is the same
    model with the same fp8 rounding, in transformers, against the float32 model. Fixed before the
    first run (2026-12-06): Kiln's fp8-KV logits' max relative error against the float32 engine is at
    most 2x that of transformers with e4m3 keys and values, prompt by prompt, and Kiln's fp8-KV greedy
    tokens equal that reference's on every prompt (24 tokens, EOS ignored). The bf16-referenced gate
    above stays as it was measured; this one asks whether Kiln's cache adds error of its own."""
    from kiln_engine.interface import SamplingParams

    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _engine("float32", "auto")
    fp8 = _engine("float32", "fp8")
    prompts = [ref.tokenizer.encode(p) for p in PROMPTS]  # type: ignore[attr-defined]
    got = fp8.generate(prompts, greedy)  # type: ignore[attr-defined]
    model, undo = _transformers_with_e4m3_kv()
    try:
        with torch.inference_mode():
            want = []
            for p in prompts:
                ids = list(p)
                for _ in range(24):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))  # type: ignore[operator]
                want.append(ids[len(p) :])
            errors = []
            for p, o in zip(prompts, want, strict=True):
                exact = _teacher_forced_logits(ref, p + o)
                kiln = _teacher_forced_logits(fp8, p + o)
                hf = model(torch.tensor([p + o])).logits[0].float()  # type: ignore[operator]

                def max_rel(x: torch.Tensor, exact: torch.Tensor = exact) -> float:
                    return ((x - exact).abs().amax(-1) / exact.abs().amax(-1)).max().item()

                errors.append((max_rel(kiln), max_rel(hf)))
    finally:
        undo()
    print("max relative logit error, (Kiln fp8 KV, transformers e4m3 KV):", errors)
    assert all(k <= 2 * h for k, h in errors), errors
    assert got == want


ENGINE_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
outs = {}
for backend, graphs in (("torch", False), ("triton", True)):
    cfg = EngineConfig(num_kv_blocks=32, block_size=4, max_num_seqs=2, max_model_len=64, kv_cache_dtype="fp8",
                       attention_backend=backend, cuda_graphs=graphs)
    e = LLMEngine(sys.argv[1], cfg)
    prompts = [e.tokenizer.encode(t) for t in ("Hi", "Tell me about the operator and its engine.")]
    outs[backend] = e.generate(prompts, greedy)
assert outs["torch"] == outs["triton"], outs
print("ok")
"""


def test_engine_with_fp8_cache_through_triton_kernels_and_decode_graphs() -> None:
    # (Prefix-cache hits with fp8 blocks: the torch-backend test above; the kernels over a cached
    # prefix: the kernel test's chunks.)
    interpret(ENGINE_SCRIPT, str(TINY_CHAT), timeout=300)


def test_fp8_kv_build_records_it_and_serve_reads_it(tmp_path: Path) -> None:
    import io

    from kiln_engine.backends import torch as torch_backend
    from kiln_engine.build.pipeline import BuildOptions, run_build
    from kiln_engine.build.progress import Progress

    opts = BuildOptions(
        model=str(TINY_CHAT), output=str(tmp_path / "a"), device="cpu", kv_cache_dtype="fp8", max_seq_len=64,
        max_batch_size=2, measure_capacity=False,
    )  # fmt: skip
    art = Path(run_build(opts, Progress(out=io.StringIO(), bar=False)))
    assert torch_backend.artifact_kv_cache_dtype(art) == "fp8"  # what `serve --kv-cache-dtype auto` uses
    assert torch_backend.artifact_kv_cache_dtype(TINY_CHAT) == "auto"  # a checkpoint: the model dtype
    engine = torch_backend.engine_for_artifact_dir(art, opts)  # the engine the build measured
    assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn


def test_fp8_kv_on_a_gpu_without_fp8_is_refused_up_front() -> None:
    from kiln_engine.layers.attention import check_fp8_kv_support

    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer \(this one: 8\.0\)"):
        check_fp8_kv_support("triton", "cuda", (8, 0))
    check_fp8_kv_support("triton", "cuda", (9, 0))  # Hopper
    check_fp8_kv_support("torch", "cuda", (8, 0))  # the reference converts with torch ops
    check_fp8_kv_support("torch", "cpu", None)
