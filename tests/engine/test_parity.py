"""Greedy outputs of our engine equal Hugging Face transformers', token for token, on tiny checkpoints.

Each architecture is checked with mixed prompt lengths in one batch, with preemption forced by a
tiny KV cache, with prefix-cache hits, and with chunked prefill forced by a tiny token budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing import make_tiny_checkpoint

pytestmark = pytest.mark.engine
transformers = pytest.importorskip("transformers")

MAX_NEW = 16
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox",
    "A",
    "A paged key-value cache stores attention keys and values in fixed-size blocks; prefix caching",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42",
]

VARIANTS: dict[str, tuple[str, dict]] = {
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-linear-rope-tied-sharded": (
        "llama",
        {"rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": True, "shards": 3},
    ),
    "llama-dynamic-rope": ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    "mistral": ("mistral", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"num_hidden_layers": 3}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny checkpoint plus HF's greedy continuation of each prompt (computed once per variant)."""
    arch, overrides = VARIANTS[request.param]
    overrides = dict(overrides)
    shards = overrides.pop("shards", 1)
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch, shards=shards, **overrides)
    from kiln_engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    refs: dict[tuple[int, ...], list[int]] = {}
    prompts = [tok.encode(t) for t in TEXTS]
    prompts.append(prompts[3][:-2] + prompts[0])  # shares a long prefix with prompt 3
    for p in prompts:
        refs[tuple(p)] = hf_greedy(hf, p)
    return path, {"prompts": prompts, "refs": refs}


# Plain steps, and decode steps padded to graph sizes with the next one enqueued before this one's
# tokens are read (lookahead; eager on CPU).
STEP_MODES: dict[str, dict[str, bool]] = {
    "plain": {},
    "lookahead": {"cuda_graphs": True, "lookahead_decode": True},
}


def hf_greedy(hf: object, prompt: list[int], n: int = MAX_NEW) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(  # type: ignore[attr-defined]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def check(engine: LLMEngine, data: dict, prompts: list[list[int]] | None = None) -> None:
    prompts = prompts or data["prompts"]
    outs = engine.generate(prompts, GREEDY)
    for p, got in zip(prompts, outs, strict=True):
        assert got == data["refs"][tuple(p)], f"prompt of {len(p)} tokens diverged"


def test_batch_of_mixed_lengths(model: tuple[Path, dict]) -> None:
    path, data = model
    engine = LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4))
    check(engine, data)
    assert engine.stats().preemptions_total == 0


def test_preemption_under_kv_pressure(model: tuple[Path, dict]) -> None:
    path, data = model
    # 24 blocks of 4 slots: the batch needs far more, so running sequences get preempted and resumed.
    engine = LLMEngine(path, EngineConfig(num_kv_blocks=24, block_size=4, prefix_caching=False))
    check(engine, data)
    assert engine.stats().preemptions_total > 0
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("steps", list(STEP_MODES))
def test_prefix_cache_hits(model: tuple[Path, dict], steps: str) -> None:
    path, data = model
    engine = LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4, **STEP_MODES[steps]))
    long_prompt, sharing = data["prompts"][3], data["prompts"][-1]
    check(engine, data, [long_prompt])
    engine.add_request("again", long_prompt, GREEDY)
    engine.add_request("sharing", sharing, GREEDY)
    got: dict[str, list[int]] = {"again": [], "sharing": []}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.cached_prompt_tokens
    assert got["again"] == data["refs"][tuple(long_prompt)]
    assert got["sharing"] == data["refs"][tuple(sharing)]
    assert cached["again"] >= len(long_prompt) - 4
    assert cached["sharing"] >= 4 * ((len(long_prompt) - 2) // 4) - 4
    assert engine.stats().prefix_cache_hit_tokens_total >= cached["again"] + cached["sharing"]


def test_chunked_prefill(model: tuple[Path, dict]) -> None:
    path, data = model
    engine = LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4, max_tokens_per_step=7))
    check(engine, data)


@pytest.mark.parametrize("steps", list(STEP_MODES))
def test_preemption_with_prefix_cache_and_chunking(model: tuple[Path, dict], steps: str) -> None:
    path, data = model
    cfg = EngineConfig(num_kv_blocks=24, block_size=4, max_tokens_per_step=9, **STEP_MODES[steps])
    engine = LLMEngine(path, cfg)
    check(engine, data)
    assert engine.stats().preemptions_total > 0


@pytest.mark.parametrize("steps", list(STEP_MODES))
def test_staggered_arrivals_and_aborts(model: tuple[Path, dict], steps: str) -> None:
    """Requests join while others decode (continuous batching); an aborted one leaves no trace."""
    path, data = model
    cfg = EngineConfig(num_kv_blocks=28, block_size=4, max_tokens_per_step=12, **STEP_MODES[steps])
    engine = LLMEngine(path, cfg)
    prompts = data["prompts"]
    pending = [(f"r{i}", p) for i, p in enumerate(prompts)]
    got: dict[str, list[int]] = {}
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:
            rid, p = pending.pop(0)
            engine.add_request(rid, p, GREEDY)
            if rid == "r1":
                engine.add_request("doomed", prompts[3], GREEDY)
        if steps == 4:
            engine.abort_request("doomed")
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == data["refs"][tuple(p)], f"request r{i} diverged"
    assert len(got.get("doomed", [])) < MAX_NEW
    assert engine.block_manager.num_used_blocks == 0


def test_padded_decode_steps(model: tuple[Path, dict]) -> None:
    """Decode steps padded to fixed batch sizes (the CUDA-graph path, run eagerly on CPU)."""
    path, data = model
    engine = LLMEngine(
        path,
        EngineConfig(
            num_kv_blocks=28, block_size=4, max_num_seqs=6, max_tokens_per_step=16, cuda_graphs=True
        ),
    )
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 6]
    used: list[int] = []
    run = graphs.run
    graphs.run = lambda chunks, ids=None: used.append(len(chunks)) or run(chunks, ids)  # type: ignore[method-assign]
    check(engine, data)
    assert used and {3, 5} & set(used)  # batches that needed padding went through it
    assert engine.runner.kv_cache.shape[2] == 29  # one scratch block past the managed ones
