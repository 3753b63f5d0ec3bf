"""Engine speed benchmark: a Llama-3-8B-shaped model with random weights in Kiln's runtime vs. transformers.

In one process, on one GPU, it measures (issue 6):

* offline throughput: `--num-requests` requests (1,024) per workload of input/output lengths
  (128/128, 128/2048, 2048/128), all submitted at once, greedy, ignoring EOS; output tokens/s;
* time to first token of one 2,048-token prompt on an idle engine;
* inter-token latency at batch 1, against the memory-bandwidth floor: the bytes of weights a decode
  step must read over the device-to-device copy bandwidth measured in the same run;
* the baseline: Hugging Face transformers `generate` on the same model shape (bf16, random weights)
  at batch 256 for 128/128 and at batch 1.

Modes: `bf16` (bf16 weights) and `fp8` (fp8 e4m3 weights with per-channel scales, activations
quantized per token, GEMMs through `torch._scaled_mm`); the weight-only modes `awq`, `gptq` (int4,
groups of 128) and `int8` (per-channel scales), read by layers/weight_only_gemm.py and layers/gemv.py.
Speed does not depend on the weights' values, so no checkpoint is downloaded: the engine loads random
weights (`load_format="dummy"`).

`--check` runs the correctness gate on the GPU instead: the fast path (Triton kernels, fused
layers, CUDA graphs) must produce the reference path's (torch ops, eager) greedy tokens on a fixed
prompt set of the trained tiny checkpoint in `examples/tiny-chat` in bf16, and the same logits
(relative error) on the 8B-shaped model.

    PYTHONPATH=engine-image python bench/engine_throughput.py --out bench/results/h200.json
    PYTHONPATH=engine-image python bench/engine_throughput.py --modes fp8 --workloads 128/128 \
        --num-requests 256
    PYTHONPATH=engine-image python bench/engine_throughput.py --check
    PYTHONPATH=engine-image python bench/engine_throughput.py --tiny --device cpu   # same paths, small

`--method trtllm` measures the way TensorRT-LLM's perf-overview does (issue 18): random token ids
at fixed lengths, EOS ignored, fp8 weights and an fp8 KV cache, up to 4,096 sequences per batch,
30,000 requests at 128/128 and 3,000 at 128/2048, 2048/128, 500/2000 and 1000/1000. The correctness
gate (`--check`) runs first in the same process and lands in the same results file; a run that
fails it reports no throughput. The table puts every row beside TensorRT-LLM's published H200
figure, the ratio and issue 18's target. `--smoke` runs the same plumbing on a CPU in seconds
(tiny model, lengths / 32, requests / 1,000): a test of the preset, not of speed.

    PYTHONPATH=engine-image python bench/engine_throughput.py --method trtllm --out trtllm.json
    PYTHONPATH=engine-image python bench/engine_throughput.py --method trtllm --smoke --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln_engine.config import MXFP4_PACKED_KEY, EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
# The same code paths at a size a CPU runs in seconds (debugging the benchmark itself).
TINY = {
    **LLAMA3_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
}

# `--smoke`: smaller still, so the test suite runs the trtllm preset's plumbing in seconds.
SMOKE = {**TINY, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "head_dim": 32,
         "num_key_value_heads": 1, "vocab_size": 256}  # fmt: skip

TINY_CHAT = Path(__file__).resolve().parent.parent / "examples" / "tiny-chat"  # the gate's trained model
TARGETS = {"bf16": 12_000.0, "fp8": 16_700.0}  # output tokens/s at 128/128 (issue 6)
# Weight-only modes (issue 18: their own rows, no target): the checkpoint's quantization_config.
# Random packed int4 words and int8 weights cost what real ones do (loader.init_dummy_weights).
WEIGHT_ONLY = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "int8": {"quant_method": "int8"},
}


@dataclass(frozen=True)
class TrtllmRow:
    """One row of TensorRT-LLM's perf-overview (Llama-3.1-8B FP8, one H200) and issue 18's target."""

    workload: str
    requests: int
    published: float  # the best output tok/s NVIDIA published for this row
    published_source: str
    target: float


TRTLLM_ROWS = [
    TrtllmRow("128/128", 30_000, 29_526.0, "v0.17 (v1.0: 27,911)", 30_000.0),
    TrtllmRow("128/2048", 3_000, 26_812.0, "v0.20 (v1.0: 26,221)", 27_000.0),
    TrtllmRow("2048/128", 3_000, 3_794.0, "v0.20 (v1.0: 3,538)", 3_800.0),
    TrtllmRow("500/2000", 3_000, 20_770.0, "perf-overview", 21_000.0),
    TrtllmRow("1000/1000", 3_000, 17_744.0, "perf-overview", 18_000.0),
]
TRTLLM_MAX_NUM_SEQS = 4096
SMOKE_LENGTH_DIVISOR = 128
SMOKE_REQUEST_DIVISOR = 1000
TRTLLM_FP8_PUBLISHED = 16_708.0  # NVIDIA's TensorRT-LLM Llama-3-8B fp8 128/128 on one H100
ITL_FLOOR_FACTOR = 1.2
CHECK_PROMPTS = [
    "Hello, world! How are you today?",
    "The quick brown fox",
    "A",
    "Once upon a time there was a little kernel that wanted to run fast",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42",
    "What is the capital of France?",
    "A paged key-value cache stores attention keys and values in fixed-size blocks",
    "Continuous batching admits new requests while others are still decoding",
]


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int

    @property
    def name(self) -> str:
        return f"{self.input_len}/{self.output_len}"

    @classmethod
    def parse(cls, text: str) -> Workload:
        a, b = text.split("/")
        return cls(int(a), int(b))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- ceilings -------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    n = nbytes // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense matrix-product rate in FLOP/s on random data (median of 10 after warm-up)."""
    if device.type != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# -- our engine -----------------------------------------------------------------------------------------
def write_model_dir(root: Path, cfg: dict[str, Any], mode: str) -> Path:
    d = root / f"model-{mode}"
    d.mkdir(parents=True, exist_ok=True)
    data = dict(cfg)
    if mode == "fp8":
        data["quantization_config"] = {"quant_method": "fp8"}
    elif mode == "mxfp4":  # gpt-oss's experts packed, as `kiln-engine build --quantization mxfp4` keeps them
        data["quantization_config"] = {"quant_method": "mxfp4", MXFP4_PACKED_KEY: True}
    elif mode in WEIGHT_ONLY:
        data["quantization_config"] = WEIGHT_ONLY[mode]
    (d / "config.json").write_text(json.dumps(data, indent=1))
    return d


def make_engine(path: Path, args: argparse.Namespace, max_model_len: int, **overrides: Any) -> LLMEngine:
    kwargs: dict[str, Any] = {
        "device": args.device,
        "dtype": "bfloat16" if args.device != "cpu" else "float32",
        "load_format": "dummy",
        "max_num_seqs": args.max_num_seqs,
        "max_tokens_per_step": args.max_tokens_per_step,
        "max_model_len": max_model_len,
        "block_size": 16,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "cuda_graphs": True,
        "lookahead_decode": not getattr(args, "no_lookahead_decode", False),
        "attention_backend": "auto",
        "prefix_caching": False,  # random prompts share nothing; keep the numbers about compute
        "seed": 0,
        "tensor_parallel_size": args.tp,
        "tensor_parallel_rank": getattr(args, "tensor_parallel_rank", 0),
        "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
    }
    kwargs.update(overrides)
    return LLMEngine(path, EngineConfig(**kwargs))


def weight_bytes_per_decode_step(engine: LLMEngine) -> int:
    """Bytes of parameters a decode step reads: everything but the embedding table (only rows of it)."""
    model = engine.runner.model
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def run_offline(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Submit every prompt at once and step to completion; output tokens/s over the whole run."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    dev = engine.runner.device
    sync(dev)
    pre0 = engine.scheduler.preemptions_total
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"w{id(prompts)}-{i}", p, params)
    steps = 0
    produced = 0
    max_running = 0
    while engine.has_unfinished():
        max_running = max(max_running, len(engine.scheduler.running))
        for out in engine.step():
            produced += len(out.new_token_ids)
        steps += 1
    sync(dev)
    elapsed = time.perf_counter() - t0
    expected = len(prompts) * output_len
    assert produced == expected, f"produced {produced} tokens, expected {expected}"
    return {
        "requests": len(prompts),
        "output_tokens": produced,
        "seconds": elapsed,
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + sum(len(p) for p in prompts)) / elapsed,
        "steps": steps,
        "max_running": max_running,
        "preemptions": engine.scheduler.preemptions_total - pre0,
    }


def measure_ttft(engine: LLMEngine, prompt_len: int, vocab: int, reps: int = 5) -> dict[str, float]:
    """Time to first token of one prompt on an idle engine (includes the host round trip)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(reps + 1):
        prompt = random_prompts(1, prompt_len, vocab, seed=1000 + r)[0]
        sync(engine.runner.device)
        t0 = time.perf_counter()
        engine.add_request(f"ttft-{r}", prompt, params)
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - t0)
    times = times[1:]  # the first compiles kernels for this shape
    return {
        "prompt_tokens": prompt_len,
        "ttft_ms_median": statistics.median(times) * 1e3,
        "ttft_ms_min": min(times) * 1e3,
    }


def measure_itl(engine: LLMEngine, prompt_len: int, tokens: int, vocab: int) -> dict[str, float]:
    """Inter-token latency of one request alone (batch 1): wall time of each decode step."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    engine.add_request("itl", random_prompts(1, prompt_len, vocab, seed=7)[0], params)
    engine.step()  # prefill + first token
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return {
        "tokens": len(times),
        "itl_ms_median": statistics.median(times) * 1e3,
        "itl_ms_mean": statistics.fmean(times) * 1e3,
        "tokens_per_s": 1.0 / statistics.median(times),
    }


def free() -> None:
    """Collect the dropped engine's reference cycles and give its memory back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_mode(
    mode: str, cfg: dict[str, Any], root: Path, args: argparse.Namespace, workloads: list[Workload], bw: float
) -> dict[str, Any]:
    path = write_model_dir(root, cfg, mode)
    max_len = max(
        [w.input_len + w.output_len for w in workloads] + [args.ttft_prompt + 1, 128 + args.itl_tokens + 2]
    )
    max_len = -(-max_len // 256) * 256
    t0 = time.perf_counter()
    engine = make_engine(path, args, max_len)
    setup_s = time.perf_counter() - t0
    vocab = cfg["vocab_size"]
    runner = engine.runner
    result: dict[str, Any] = {
        "mode": mode,
        "setup_seconds": setup_s,
        "kv_blocks": runner.num_blocks,
        "kv_capacity_tokens": runner.num_blocks * runner.block_size,
        "weight_bytes_per_step": weight_bytes_per_decode_step(engine),
        "cuda_graph_sizes": sorted(runner.decode_graphs.graphs) if runner.decode_graphs else [],
        "workloads": {},
    }
    log(f"{mode}: engine ready in {setup_s:.1f}s, KV capacity {result['kv_capacity_tokens']} tokens")
    # Warm-up: compile prefill/mixed-shape kernels before anything is timed.
    run_offline(engine, random_prompts(min(64, args.num_requests), 128, vocab, seed=99), 8)
    capacity = result["kv_capacity_tokens"]
    for w in workloads:
        # Admit no more sequences than fit at their full length, so none is evicted and recomputed
        # (TensorRT-LLM's GUARANTEED_NO_EVICT policy); the batch is as full as memory allows.
        fit = max(1, capacity // (w.input_len + w.output_len + engine.config.block_size))
        engine.config.max_num_seqs = min(args.max_num_seqs, fit)
        n = getattr(args, "requests_per_workload", {}).get(w.name, args.num_requests)
        prompts = random_prompts(n, w.input_len, vocab, seed=w.input_len * 7 + w.output_len)
        r = run_offline(engine, prompts, w.output_len)
        r["max_num_seqs"] = engine.config.max_num_seqs
        result["workloads"][w.name] = r
        log(
            f"{mode} {w.name}: {r['output_tokens_per_s']:.0f} output tok/s ({r['seconds']:.1f}s, "
            f"{r['steps']} steps, batch <= {r['max_running']}, {r['preemptions']} preemptions)"
        )
        if args.partial is not None:
            args.partial[mode] = result
            args.save()
    engine.config.max_num_seqs = args.max_num_seqs
    result["ttft"] = measure_ttft(engine, args.ttft_prompt, vocab)
    log(f"{mode} TTFT({args.ttft_prompt}): {result['ttft']['ttft_ms_median']:.1f} ms")
    itl = measure_itl(engine, 128, args.itl_tokens, vocab)
    floor_ms = result["weight_bytes_per_step"] / bw * 1e3
    itl["floor_ms"] = floor_ms
    itl["ratio_to_floor"] = itl["itl_ms_median"] / floor_ms
    result["itl_batch1"] = itl
    log(
        f"{mode} ITL batch 1: {itl['itl_ms_median']:.2f} ms "
        f"(floor {floor_ms:.2f} ms, {itl['ratio_to_floor']:.2f}x)"
    )
    if args.profile:
        result["profile"] = profile_steps(engine, vocab, args)
    del engine, runner
    return result


def profile_steps(
    engine: LLMEngine, vocab: int, args: argparse.Namespace, decode_seqs: int = 256, prompt_len: int = 128
) -> dict[str, str]:
    """Kernel-time tables of five decode steps of `decode_seqs` sequences (once every prompt is in,
    with the steps' wall time) and of the prefill steps of four 2,048-token prompts (shorter if the
    context is)."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, str] = {}
    dev = engine.runner.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    new_tokens = engine.max_model_len - prompt_len
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(random_prompts(decode_seqs, prompt_len, vocab, seed=5)):
        engine.add_request(f"prof-d{i}", p, params)
    sched = engine.scheduler
    preempted_before = sched.preemptions_total  # a count over the engine's life
    for _ in range(100_000):  # until every admitted prompt is in (all of them, unless the KV cache is full)
        full = len(sched.running) == engine.config.max_num_seqs or sched.preemptions_total > preempted_before
        if not any(s.num_computed_tokens < prompt_len for s in sched.running) and (not sched.waiting or full):
            break
        engine.step()
    for _ in range(10):
        engine.step()
    running = len(sched.running)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(5):
        engine.step()
    sync(dev)
    step_ms = (time.perf_counter() - t0) * 200
    with profile(activities=acts) as prof:
        for _ in range(5):
            engine.step()
        sync(dev)
    for i in range(decode_seqs):
        engine.abort_request(f"prof-d{i}")
    key = f"decode_{running}seqs_{prompt_len}prompt_x5"
    out[key] = f"wall {step_ms:.2f} ms a step unprofiled\n" + prof.key_averages().table(
        sort_by="self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total", row_limit=25
    )
    while engine.has_unfinished():
        engine.step()
    prefill_len = min(2048, engine.max_model_len - 1)
    for i, p in enumerate(random_prompts(4, prefill_len, vocab, seed=6)):
        engine.add_request(f"prof-p{i}", p, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    with profile(activities=acts) as prof:
        while engine.has_unfinished():
            engine.step()
        sync(dev)
    out[f"prefill_4x{prefill_len}"] = prof.key_averages().table(
        sort_by="self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total", row_limit=25
    )
    for k, v in out.items():
        print(f"\n== profile {k} ==\n{v}", flush=True)
    return out


# -- baseline: Hugging Face transformers ------------------------------------------------------------------
def hf_model(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def hf_generate_rate(
    model: Any, batch: int, input_len: int, output_len: int, vocab: int, device: torch.device
) -> dict[str, Any]:
    ids = torch.tensor(random_prompts(batch, input_len, vocab, seed=batch), device=device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
        sync(device)
        elapsed = time.perf_counter() - t0
    produced = (out.shape[1] - input_len) * batch
    assert produced == batch * output_len, (out.shape, batch, output_len)
    return {
        "batch": batch,
        "input_len": input_len,
        "output_len": output_len,
        "seconds": elapsed,
        "output_tokens": produced,
        "output_tokens_per_s": produced / elapsed,
    }


def bench_baseline(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = hf_model(cfg, dev, dtype)
    res: dict[str, Any] = {"transformers": transformers.__version__}
    res["batch"] = hf_generate_rate(model, args.baseline_batch, 128, 128, cfg["vocab_size"], dev)
    log(f"HF generate batch {args.baseline_batch}: {res['batch']['output_tokens_per_s']:.0f} tok/s")
    res["batch1"] = hf_generate_rate(model, 1, 128, args.baseline_batch1_tokens, cfg["vocab_size"], dev)
    log(f"HF generate batch 1: {res['batch1']['output_tokens_per_s']:.1f} tok/s")
    del model
    free()
    return res


# -- correctness gate --------------------------------------------------------------------------------------
def capture_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Record the logits each step samples from (float32, on the host), in batch order."""
    seen: list[torch.Tensor] = []
    sampler = engine.runner.sampler
    original: Callable[..., Any] = sampler.sample_async

    def sample_async(logits: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(logits.detach().float().cpu())
        return original(logits, batch, *args, **kwargs)

    sampler.sample_async = sample_async  # type: ignore[method-assign]
    return seen


def tiny_chat_engine(device: str, dtype: str, kv_cache_dtype: str, **overrides: Any) -> LLMEngine:
    """The gate's engine of examples/tiny-chat (bench/fp8_kv_divergence.py builds the same one)."""
    return LLMEngine(
        TINY_CHAT,
        EngineConfig(
            device=device,
            dtype=dtype,
            num_kv_blocks=256,
            max_num_seqs=8,
            max_model_len=256,
            kv_cache_dtype=kv_cache_dtype,
            **overrides,
        ),
    )


def logit_errors_while_agreeing(
    logits: list[torch.Tensor],
    ref_logits: list[torch.Tensor],
    tokens: list[list[int]],
    ref_tokens: list[list[int]],
) -> list[float]:
    """Relative logit error per step against the reference, over the rows whose tokens so far agree.

    Step t's row i is prompt i (all are admitted at once and run in order). A row counts only while
    its tokens agree: after a near-tie flips one token, that row's inputs differ and its logits say
    nothing about the kernels. Stops at the first step with no such row (or a batch shape apart).
    """
    errs = []
    for t, (a, b) in enumerate(zip(logits, ref_logits, strict=False)):
        rows = [i for i in range(len(tokens)) if tokens[i][:t] == ref_tokens[i][:t]]
        if a.shape != b.shape or not rows:
            break
        errs.append(((a[rows] - b[rows]).norm() / b[rows].norm()).item())
    return errs


def run_check(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Fast path vs reference path on the same weights: tokens (trained tiny model) and logits (8B shape)."""
    greedy = SamplingParams(max_tokens=args.check_tokens, temperature=0.0, ignore_eos=True)
    dtype = "bfloat16" if args.device != "cpu" else "float32"
    fast_backend = "auto"
    ref = dict(attention_backend="torch", cuda_graphs=False)
    result: dict[str, Any] = {}

    # 1. The trained tiny checkpoint: identical greedy tokens, and transformers' for comparison.
    outs = {}
    for name, over in (
        ("reference", ref),
        ("fast", {"attention_backend": fast_backend, "cuda_graphs": True}),
    ):
        e = tiny_chat_engine(args.device, dtype, args.kv_cache_dtype, **over)
        assert e.tokenizer is not None
        prompts = [e.tokenizer.encode(t) for t in CHECK_PROMPTS]
        outs[name] = e.generate(prompts, greedy)
        del e
        free()
    hf_tokens = None
    try:
        if args.smoke:
            raise RuntimeError("not in a smoke run")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(TINY_CHAT, dtype=getattr(torch, dtype))
        hf = hf.to(args.device).eval()
        hf_tokens = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=args.device)
                o = hf.generate(
                    ids,
                    max_new_tokens=args.check_tokens,
                    min_new_tokens=args.check_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                hf_tokens.append(o[0, len(p) :].tolist())
        del hf
        free()
    except Exception as exc:  # the comparison with transformers is informative, not the gate
        log(f"transformers comparison skipped: {exc!r}")
    tiny_ok = outs["fast"] == outs["reference"]
    result["tiny_chat"] = {
        "prompts": len(CHECK_PROMPTS),
        "tokens_each": args.check_tokens,
        "fast_equals_reference": tiny_ok,
        "mismatched_prompts": [
            i for i, (a, b) in enumerate(zip(outs["fast"], outs["reference"], strict=True)) if a != b
        ],
        "transformers_equal_prompts": None
        if hf_tokens is None
        else sum(a == b for a, b in zip(hf_tokens, outs["reference"], strict=True)),
    }
    log(
        f"check tiny-chat bf16: fast == reference: {tiny_ok}; transformers agrees on "
        f"{result['tiny_chat']['transformers_equal_prompts']}/{len(CHECK_PROMPTS)} prompts"
    )

    # 2. The 8B layer shapes (random weights, same seed -> same weights in both engines): logits of
    # every step. The gate is a 2-layer model: every kernel at its 8B shape, little depth. A random
    # 32-layer model amplifies rounding differences chaotically (bf16 more than fp8, whose random
    # weights are smaller), so its numbers are recorded but do not gate.
    full = model_shape(args)
    lengths = [5, 37, 128, 300, 1, 64, 200, 17]
    prompts8 = [random_prompts(1, n, full["vocab_size"], seed=n)[0] for n in lengths]
    depths = [("2_layers", 2, True), ("32_layers", full["num_hidden_layers"], False)]
    for label, layers, gate in depths[: 1 if args.smoke else 2]:  # the smoke run: plumbing only
        cfg = {**full, "num_hidden_layers": layers}
        for mode in args.modes:
            path = write_model_dir(root / label, cfg, mode)
            logits = {}
            tokens = {}
            for name, over in (
                ("reference", ref),
                ("fast", {"attention_backend": fast_backend, "cuda_graphs": True}),
            ):
                e = make_engine(path, args, 1024, num_kv_blocks=1024, max_num_seqs=16, **over)
                seen = capture_logits(e)
                steps = SamplingParams(max_tokens=args.check_tokens // 2, temperature=0.0, ignore_eos=True)
                tokens[name] = e.generate(prompts8, steps)
                logits[name] = seen
                del e
                free()
            errs = logit_errors_while_agreeing(
                logits["fast"], logits["reference"], tokens["fast"], tokens["reference"]
            )
            agree = sum(x == y for x, y in zip(tokens["fast"], tokens["reference"], strict=True))
            first = sum(x[0] == y[0] for x, y in zip(tokens["fast"], tokens["reference"], strict=True))
            # fp8 quantizes activations per token, so a rounding difference upstream can move a
            # value by a whole fp8 step: a looser bound than bf16's.
            tol = 2e-2 if mode == "bf16" else 6e-2
            ok = bool(errs) and max(errs) < tol
            result[f"llama3_8b_shape_{label}_{mode}"] = {
                "gates": gate,
                "steps_compared": len(errs),
                "logits_rel_err_first_step": errs[0] if errs else None,
                "logits_rel_err_median": statistics.median(errs) if errs else None,
                "logits_rel_err_max": max(errs) if errs else None,
                "tolerance": tol,
                "ok": ok,
                "prompts_with_identical_tokens": agree,
                "prompts_with_identical_first_token": first,
                "prompts": len(prompts8),
            }
            log(
                f"check 8B-shape {label} {mode}: logits rel err first {errs[0] if errs else None}, median "
                f"{statistics.median(errs) if errs else None}; identical 16-token outputs "
                f"{agree}/{len(prompts8)}"
            )
    result["ok"] = tiny_ok and all(
        v["ok"] for k, v in result.items() if k.startswith("llama3") and v["gates"]
    )
    return result


# -- tensor parallelism ------------------------------------------------------------------------------------
def _tp_rank(
    rank: int, args: argparse.Namespace, cfg: dict[str, Any], workloads: list[Workload], port: int
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.tp),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
    )
    dev = torch.device("cpu")
    if args.device != "cpu":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    bw = copy_bandwidth(dev, args.bandwidth_bytes)
    with tempfile.TemporaryDirectory(prefix=f"kiln-bench-tp{rank}-") as tmp:
        modes = {}
        for mode in args.modes:
            args.tensor_parallel_rank = rank
            modes[mode] = bench_mode(mode, cfg, Path(tmp), args, workloads, bw)
            free()
    if rank == 0:
        results = json.loads(args.tp_results.read_text())
        results["modes"] = modes
        results["device"]["copy_bandwidth_gb_s"] = bw / 1e9
        results["device"]["bf16_tflops"] = float("nan")
        args.tp_results.write_text(json.dumps(results, indent=1, default=str))
    torch.distributed.destroy_process_group()


def run_tensor_parallel(
    args: argparse.Namespace, cfg: dict[str, Any], workloads: list[Workload], results: dict[str, Any]
) -> int:
    """Spawn one process per GPU; rank 0 writes the results. No transformers baseline here."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results["tensor_parallel_size"] = args.tp
    out = args.out or Path(tempfile.mkdtemp()) / "tp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    args.tp_results = out
    args.save = None  # closures do not cross the spawn; rank 0 writes the file itself
    args.partial = None
    mp.spawn(_tp_rank, args=(args, cfg, workloads, port), nprocs=args.tp, join=True)
    print(table(json.loads(out.read_text())))
    return 0


# -- report ------------------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    base = results.get("baseline", {})
    base_rate = base.get("batch", {}).get("output_tokens_per_s")
    base1 = base.get("batch1", {}).get("output_tokens_per_s")
    dev = results["device"]
    lines = [
        f"device: {dev['name']} | copy bandwidth {dev['copy_bandwidth_gb_s']:.0f} GB/s | "
        f"bf16 mm {dev['bf16_tflops']:.0f} TFLOP/s | torch {dev['torch']} | "
        f"requests/workload {results['num_requests']}",
        f"{'mode':5} {'workload':9} {'out tok/s':>10} {'vs HF b' + str(results['baseline_batch']):>10} "
        f"{'target':>8} {'vs target':>9} {'batch':>6} {'preempt':>7}",
    ]
    for mode, r in results.get("modes", {}).items():
        for wname, w in r["workloads"].items():
            tgt = TARGETS.get(mode) if wname == "128/128" else None
            rate = w["output_tokens_per_s"]
            vs_base = f"{rate / base_rate:.2f}x" if base_rate else "-"
            tgt_s = f"{tgt:.0f}" if tgt else "-"
            vs_tgt = f"{rate / tgt:.2f}x" if tgt else "-"
            lines.append(
                f"{mode:5} {wname:9} {rate:10.0f} {vs_base:>10} {tgt_s:>8} {vs_tgt:>9} "
                f"{w['max_running']:6d} {w['preemptions']:7d}"
            )
    for mode, r in results.get("modes", {}).items():
        if "ttft" in r:
            t = r["ttft"]
            lines.append(f"{mode:5} TTFT {t['prompt_tokens']}-token prompt: {t['ttft_ms_median']:.1f} ms")
        if "itl_batch1" in r:
            i = r["itl_batch1"]
            vs_hf1 = f" (vs HF batch 1 {i['tokens_per_s'] / base1:.1f}x)" if base1 else ""
            lines.append(
                f"{mode:5} ITL batch 1: {i['itl_ms_median']:.2f} ms = {i['tokens_per_s']:.0f} tok/s"
                f"{vs_hf1}; floor "
                f"{i['floor_ms']:.2f} ms ({r['weight_bytes_per_step'] / 1e9:.2f} GB weights), "
                f"{i['ratio_to_floor']:.2f}x floor (target <= {ITL_FLOOR_FACTOR}x)"
            )
    if base_rate:
        lines.append(
            f"baseline: transformers {base['transformers']} generate bf16, batch {base['batch']['batch']} "
            f"128/128: {base_rate:.0f} tok/s; batch 1: {base1:.1f} tok/s"
        )
    lines.append(f"TensorRT-LLM published (H100, fp8, 128/128): {TRTLLM_FP8_PUBLISHED:.0f} tok/s")
    return "\n".join(lines)


def trtllm_rows(results: dict[str, Any], scale: int) -> list[dict[str, Any]]:
    """Every preset row of every mode beside TensorRT-LLM's published figure (smoke: lengths / `scale`)."""
    rows = []
    for mode, r in results.get("modes", {}).items():
        for row in TRTLLM_ROWS:
            w = r["workloads"].get(scaled_workload(row.workload, scale).name)
            if w is None:  # not among --rows
                continue
            rate = w["output_tokens_per_s"]
            rows.append(
                {
                    "mode": mode,
                    "workload": row.workload,
                    "requests": w["requests"],
                    "output_tokens_per_s": rate,
                    "trtllm_published": row.published,
                    "trtllm_source": row.published_source,
                    "ratio_to_trtllm": rate / row.published if rate else None,
                    "target": row.target,
                    "meets_target": rate >= row.target if rate else False,
                    "max_running": w["max_running"],
                    "preemptions": w["preemptions"],
                }
            )
    return rows


def trtllm_table(results: dict[str, Any]) -> str:
    dev = results["device"]
    gate = results.get("check", {})
    bw = dev.get("copy_bandwidth_gb_s", float("nan"))
    lines = [
        f"device: {dev['name']} | measured copy bandwidth {bw:.0f} GB/s"
        f" | torch {dev['torch']} | KV cache {results['kv_cache_dtype']} | max {results['max_num_seqs']} seqs"
        + (" | SMOKE (tiny model on the host: plumbing, not speed)" if results.get("smoke") else ""),
        f"correctness gate: {'passed' if gate.get('ok') else 'FAILED: no throughput reported'}"
        + (f" (measured by {results['check_from']})" if "check_from" in results else ""),
        f"{'mode':5} {'workload':10} {'requests':>8} {'out tok/s':>10} {'TRT-LLM':>8} {'ratio':>6} "
        f"{'target':>7} {'met':>4} {'batch':>6} {'preempt':>7}  TRT-LLM source",
    ]
    for row in results.get("trtllm_rows", []):
        rate = row["output_tokens_per_s"]
        rate_s = f"{rate:.0f}" if rate else "-"
        ratio_s = f"{row['ratio_to_trtllm']:.2f}x" if rate else "-"
        met = "yes" if row["meets_target"] else "no"
        lines.append(
            f"{row['mode']:5} {row['workload']:10} {row['requests'] or 0:8d} {rate_s:>10} "
            f"{row['trtllm_published']:8.0f} {ratio_s:>6} {row['target']:7.0f} {met:>4} "
            f"{row['max_running'] or 0:6d} {row['preemptions'] or 0:7d}  {row['trtllm_source']}"
        )
    return "\n".join(lines)


def model_shape(args: argparse.Namespace) -> dict[str, Any]:
    return SMOKE if args.smoke else TINY if args.tiny else LLAMA3_8B


def scaled_workload(name: str, scale: int) -> Workload:
    w = Workload.parse(name)
    return Workload(max(1, w.input_len // scale), max(1, w.output_len // scale))


def apply_trtllm_preset(args: argparse.Namespace, given: set[str]) -> list[Workload]:
    """TensorRT-LLM's perf-overview method: its rows, request counts, batch limit and fp8 KV cache."""
    scale = SMOKE_LENGTH_DIVISOR if args.smoke else 1
    per = SMOKE_REQUEST_DIVISOR if args.smoke else 1
    if "kv_cache_dtype" not in given:
        args.kv_cache_dtype = "fp8"
    if "max_num_seqs" not in given:
        args.max_num_seqs = TRTLLM_MAX_NUM_SEQS // (64 if args.smoke else 1)
    if "modes" not in given:
        args.modes = ["fp8"]
    workloads = [scaled_workload(r.workload, scale) for r in TRTLLM_ROWS]
    args.requests_per_workload = {
        w.name: max(1, r.requests // per) for w, r in zip(workloads, TRTLLM_ROWS, strict=True)
    }
    return workloads


def options_given(ap: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options named on the command line, including those given their default value: the
    preset keeps `--kv-cache-dtype auto` as asked instead of taking it for unset."""
    actions = [a for a in ap._actions if a.dest != "help"]
    defaults = [a.default for a in actions]
    for action in actions:
        action.default = argparse.SUPPRESS  # a name absent from the command line stays absent
    try:
        return set(vars(ap.parse_args(argv)))
    finally:
        for action, default in zip(actions, defaults, strict=True):
            action.default = default


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bf16,fp8", help="comma-separated: bf16, fp8, awq, gptq, int8")
    ap.add_argument(
        "--workloads", default="128/128,128/2048,2048/128", help="comma-separated input/output lengths"
    )
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-tokens-per-step", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--ttft-prompt", type=int, default=2048)
    ap.add_argument("--itl-tokens", type=int, default=256)
    ap.add_argument("--baseline-batch", type=int, default=256)
    ap.add_argument("--baseline-batch1-tokens", type=int, default=64)
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip transformers (its numbers are then absent)"
    )
    ap.add_argument(
        "--check", action="store_true", help="run the fast-vs-reference correctness gate and exit"
    )
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument(
        "--profile", action="store_true", help="print kernel-time tables of a decode and a prefill step"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same code paths (CPU debugging)")
    ap.add_argument(
        "--no-lookahead-decode",
        action="store_true",
        help="read each decode step's tokens before enqueueing the next (the engine looks ahead by default)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument(
        "--method",
        choices=("kiln", "trtllm"),
        default="kiln",
        help="kiln: issue 6's table; trtllm: TensorRT-LLM perf-overview's rows, counts and fp8 KV cache",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="with --method trtllm: a tiny CPU run of the same plumbing"
    )
    ap.add_argument("--rows", help="with --method trtllm: only these rows (e.g. 128/128,2048/128)")
    ap.add_argument(
        "--gate-file",
        type=Path,
        help="with --method trtllm: take the correctness gate from this results file (--check of the same "
        "session) instead of running it again; a failed gate there reports no throughput here",
    )
    ap.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "bf16", "fp16", "fp8"),
        default="auto",
        help="the engine's KV cache (--method trtllm: fp8 unless given)",
    )
    ap.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallelism: one process per GPU over NCCL, every rank runs the same steps",
    )
    args = ap.parse_args(argv)
    given = options_given(ap, argv)
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in TARGETS and m not in WEIGHT_ONLY:
            ap.error(f"unknown mode {m!r}")
    workloads = [Workload.parse(w) for w in args.workloads.split(",") if w]
    if args.smoke and args.method != "trtllm":
        ap.error("--smoke is a variant of --method trtllm")
    if args.method == "trtllm":
        if "workloads" in given or "num_requests" in given or args.tp > 1:
            ap.error("--method trtllm fixes the workloads and request counts, on one GPU")
        workloads = apply_trtllm_preset(args, given)
        if args.rows:  # a subset, for runs that must fit a time limit per process
            names = {r.workload: w for r, w in zip(TRTLLM_ROWS, workloads, strict=True)}
            unknown = [r for r in args.rows.split(",") if r not in names]
            if unknown:
                ap.error(f"--rows {unknown}: the preset's rows are {', '.join(names)}")
            workloads = [names[r] for r in args.rows.split(",")]
    elif args.rows or args.gate_file:
        ap.error("--rows and --gate-file belong to --method trtllm")
    args.bandwidth_bytes = 2 << 30
    if args.smoke:  # seconds on a CPU: the tiny model, short TTFT/ITL probes, no transformers
        args.tiny, args.no_baseline = True, True
        args.ttft_prompt, args.itl_tokens, args.check_tokens = 16, 2, 4
        args.num_requests = 4  # the warm-up's
        args.bandwidth_bytes = 8 << 20
    dev = torch.device(args.device)
    cfg = model_shape(args)
    results: dict[str, Any] = {
        "model": "llama-3-8b shape, random weights" if not args.tiny else "tiny llama, random weights",
        "config": cfg,
        "num_requests": args.num_requests,
        "method": args.method,
        "smoke": args.smoke,
        "kv_cache_dtype": args.kv_cache_dtype,
        "max_num_seqs": args.max_num_seqs,
        "baseline_batch": args.baseline_batch,
        "argv": sys.argv[1:] if argv is None else argv,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    import triton

    results["device"] = {
        "name": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count() if dev.type == "cuda" else 0,
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str))

    args.save = save
    args.partial = None
    if args.tp > 1:
        return run_tensor_parallel(args, cfg, workloads, results)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        root = Path(tmp)
        if args.gate_file:  # this run's gate, measured by an earlier process of the same session
            results["check"] = json.loads(args.gate_file.read_text())["check"]
            results["check_from"] = str(args.gate_file)
            if not results["check"].get("ok"):
                save()
                print(trtllm_table(results))
                return 1
        elif args.check or args.method == "trtllm":
            results["check"] = run_check(args, root)
            save()
            print(json.dumps(results["check"], indent=1))
            if args.check or not results["check"]["ok"]:  # a run that fails the gate reports no throughput
                if args.method == "trtllm":
                    print(trtllm_table(results))
                return 0 if results["check"]["ok"] else 1
            free()
        bw = copy_bandwidth(dev, args.bandwidth_bytes)
        results["device"]["copy_bandwidth_gb_s"] = bw / 1e9
        results["device"]["bf16_tflops"] = matmul_rate(dev) / 1e12
        log(f"{name}: copy {bw / 1e9:.0f} GB/s, bf16 mm {results['device']['bf16_tflops']:.0f} TFLOP/s")
        results["modes"] = {}
        args.partial = results["modes"]
        for mode in args.modes:
            results["modes"][mode] = bench_mode(mode, cfg, root, args, workloads, bw)
            free()  # the engine's reference cycles (runner <-> graphs) hold the KV cache until collected
            save()
        if not args.no_baseline:
            results["baseline"] = bench_baseline(cfg, args)
        if args.method == "trtllm":
            results["trtllm_rows"] = trtllm_rows(results, SMOKE_LENGTH_DIVISOR if args.smoke else 1)
        save()
    print(table(results))
    if args.method == "trtllm":
        print(trtllm_table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
