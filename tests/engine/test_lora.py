"""Multi-LoRA serving: greedy tokens of a batch mixing the base model and two adapters equal each one
served alone and transformers + peft with the adapter merged, token for token (float32); adapters
never share prefix-cache blocks; a full slot table makes requests wait; bad adapters are refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterError, load_adapter
from kiln_engine.lora_slots import LoraSlots
from kiln_engine.lora_testing import make_tiny_adapter
from kiln_engine.testing import make_tiny_checkpoint

pytestmark = pytest.mark.engine
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
TEXTS = ["Hello, world! How are you today?", "The quick brown fox", "A paged key-value cache stores"]
ADAPTERS = (None, "a1", "a2")
LLAMA_ONLY = pytest.mark.parametrize("served", ["llama"], indirect=True)  # parity covers both


def hf_greedy(base: Path, adapter: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        hf = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    hf.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW,
                min_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=None,
            )
            outs.append(out[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint, two adapters (all seven projections at rank 4; q/v/down at rank 8 with
    rsLoRA scaling) and transformers + peft's greedy tokens for each (base, adapter, prompt)."""
    d = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = make_tiny_checkpoint(d / "base", request.param)
    a1 = make_tiny_adapter(d / "a1", base, rank=4, seed=1)
    a2 = make_tiny_adapter(d / "a2", base, rank=8, seed=2, targets=("q_proj", "v_proj", "down_proj"))
    cfg = json.loads((a2 / ADAPTER_CONFIG_FILE).read_text())
    (a2 / ADAPTER_CONFIG_FILE).write_text(json.dumps({**cfg, "use_rslora": True, "lora_alpha": 4}))
    from kiln_engine.tokenizer import Tokenizer

    prompts = [Tokenizer.from_dir(base).encode(t) for t in TEXTS]
    paths = {None: None, "a1": a1, "a2": a2}
    refs = {name: hf_greedy(base, path, prompts) for name, path in paths.items()}
    return {"base": base, "paths": paths, "prompts": prompts, "refs": refs}


def lora_config(served: dict, **kw: object) -> EngineConfig:
    modules = [(n, str(p)) for n, p in served["paths"].items() if n is not None]
    defaults: dict = {"num_kv_blocks": 96, "block_size": 4, "max_loras": 2, "max_lora_rank": 8}
    return EngineConfig(lora_modules=modules, **{**defaults, **kw})  # type: ignore[arg-type]


def requests(served: dict) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """Every prompt under every adapter, interleaved; with transformers' tokens for each."""
    prompts, params, refs = [], [], []
    for i, p in enumerate(served["prompts"]):
        for name in ADAPTERS:
            prompts.append(p)
            params.append(replace(GREEDY, adapter=name))
            refs.append(served["refs"][name][i])
    return prompts, params, refs


def test_adapters_change_the_output(served: dict) -> None:
    """Otherwise the equalities below would hold for an engine that ignores adapters."""
    refs = served["refs"]
    for i in range(len(TEXTS)):
        assert refs["a1"][i] != refs[None][i] and refs["a2"][i] != refs[None][i]


STEP_MODES: dict[str, dict[str, object]] = {
    "plain": {"max_tokens_per_step": 11},  # chunked prefill splits prompts across steps
    "masked-eager": {"max_tokens_per_step": 11},  # eager steps as on a GPU: the masked form
    "decode-graphs": {"cuda_graphs": True, "max_num_seqs": 12},
    "speculative": {"speculative": "ngram"},
}


@pytest.mark.parametrize("steps", list(STEP_MODES))
def test_mixed_batch_equals_peft_merged(served: dict, steps: str) -> None:
    """Eager steps run per-adapter segments (on a GPU the one-hot slot mask); padded decode steps
    (the CUDA-graph path, eager on CPU) run the one-hot slot mask; n-gram verify steps run each draft
    under its request's adapter."""
    extra = STEP_MODES[steps]
    engine = LLMEngine(served["base"], lora_config(served, **extra))
    assert engine.runner.lora is not None
    engine.runner.lora.batch.eager_masked = steps == "masked-eager"
    prompts, params, refs = requests(served)
    assert engine.generate(prompts, params) == refs
    if steps == "speculative":
        assert engine.stats().spec_accepted_tokens_total > 0  # drafts were verified and kept
    assert engine.block_manager.num_used_blocks == 0


@LLAMA_ONLY
def test_decode_steps_without_adapters_skip_lora(served: dict) -> None:
    """A padded decode step where no row has an adapter runs the graphs captured without LoRA
    (eager on CPU, the same choice), and gives the base model's tokens; a row with one brings LoRA."""
    engine = LLMEngine(served["base"], lora_config(served, cuda_graphs=True, max_num_seqs=12))
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    chosen: list[bool] = []
    forward = graphs._forward

    def recording(bs: int, lora: bool = True) -> torch.Tensor:
        chosen.append(lora)
        return forward(bs, lora)

    graphs._forward = recording  # type: ignore[method-assign]
    prompts = served["prompts"]
    assert engine.generate(prompts, [GREEDY] * len(prompts)) == served["refs"][None]
    assert chosen and not any(chosen)
    chosen.clear()
    assert engine.generate(prompts[:1], [replace(GREEDY, adapter="a1")]) == served["refs"]["a1"][:1]
    assert chosen and all(chosen)


@LLAMA_ONLY
def test_each_request_alone_equals_the_mixed_batch(served: dict) -> None:
    engine = LLMEngine(served["base"], lora_config(served, prefix_caching=False))
    prompts, params, refs = requests(served)
    alone = [engine.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    assert alone == refs


@LLAMA_ONLY
def test_one_slot_serves_two_adapters_in_turn(served: dict) -> None:
    """With one slot, a request for the other adapter waits until the slot is idle, then the slot is
    reloaded; preemption (a tiny KV cache) releases and re-pins slots."""
    engine = LLMEngine(served["base"], lora_config(served, max_loras=1, num_kv_blocks=20))
    prompts, params, refs = requests(served)
    assert engine.generate(prompts, params) == refs
    lora = engine.runner.lora
    assert lora is not None and lora.loads_total >= 2
    slots = engine.scheduler.lora_slots
    assert slots is not None and slots.pins == [0]


@LLAMA_ONLY
def test_adapters_never_share_prefix_cache_blocks(served: dict) -> None:
    engine = LLMEngine(served["base"], lora_config(served))
    prompt = served["prompts"][2]
    cached: dict[str, int] = {}
    got: dict[str, list[int]] = {}
    for rid, adapter in (("base", None), ("a1", "a1"), ("a1-again", "a1"), ("a2", "a2")):
        engine.add_request(rid, prompt, replace(GREEDY, adapter=adapter))
        while engine.has_unfinished():
            for out in engine.step():
                cached[out.request_id] = out.cached_prompt_tokens
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert cached["a1"] == 0 and cached["a2"] == 0  # the base model's blocks hold the same tokens
    assert cached["a1-again"] >= len(prompt) - 4
    assert got["a1-again"] == got["a1"] == served["refs"]["a1"][2]
    assert got["a2"] == served["refs"]["a2"][2]


@LLAMA_ONLY
def test_unknown_adapter_is_refused(served: dict) -> None:
    engine = LLMEngine(served["base"], lora_config(served))
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'nope'.*a1, a2"):
        engine.add_request("r", served["prompts"][0], replace(GREEDY, adapter="nope"))


def test_slots_evict_the_least_recently_released_idle_adapter() -> None:
    slots = LoraSlots(2)
    a, b = slots.acquire("a"), slots.acquire("b")
    assert {a, b} == {0, 1}
    assert slots.acquire("c") is None  # both pinned
    slots.release(b)  # type: ignore[arg-type]
    slots.release(a)  # type: ignore[arg-type]
    assert slots.acquire("c") == b  # b went idle first
    assert slots.acquire("a") == a  # a kept its slot and weights
    assert slots.evictions_total == 1
    with pytest.raises(RuntimeError):
        slots.release(b)  # type: ignore[arg-type]
        slots.release(b)  # type: ignore[arg-type]


# -- bad adapters: each error names the adapter and the field -----------------------------------------


def _break_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / ADAPTER_CONFIG_FILE).read_text())
    (d / ADAPTER_CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))


def _break_weights(d: Path, rename: tuple[str, str] | None = None, drop: str | None = None) -> None:
    w = load_file(str(d / ADAPTER_WEIGHTS_FILE))
    if rename:
        w = {k.replace(*rename): v for k, v in w.items()}
    if drop:
        w = {k: v for k, v in w.items() if drop not in k}
    save_file(w, str(d / ADAPTER_WEIGHTS_FILE))


BREAKAGES: dict[str, tuple[object, str]] = {
    "rank-above-max": (lambda d: None, r"field 'r' is 4, above this server's max LoRA rank 2"),
    "dora": (lambda d: _break_config(d, use_dora=True), "field 'use_dora'"),
    "target-module": (lambda d: _break_config(d, target_modules=["lm_head"]), "field 'target_modules'"),
    "modules-to-save": (lambda d: _break_config(d, modules_to_save=["lm_head"]), "field 'modules_to_save'"),
    "half-pair": (lambda d: _break_weights(d, drop="layers.1.mlp.up_proj.lora_B"), "layers.1.up_proj"),
    "foreign-tensor": (
        lambda d: _break_weights(d, rename=("model.layers.", "model.blocks.")),
        "tensor '.*blocks.0.*' is not a LoRA A/B weight of a decoder layer's projection",
    ),
    "missing-weights": (
        lambda d: (d / ADAPTER_WEIGHTS_FILE).unlink(),
        "adapter_model.safetensors is missing",
    ),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_adapter_is_refused_naming_adapter_and_field(case: str, tmp_path: Path) -> None:
    base = make_tiny_checkpoint(tmp_path / "base", "llama")
    d = make_tiny_adapter(tmp_path / "bad", base, rank=4)
    breakage, message = BREAKAGES[case]
    breakage(d)  # type: ignore[operator]
    from kiln_engine.loader import load_model_config

    max_rank = 2 if case == "rank-above-max" else 8
    with pytest.raises(AdapterError, match=f"adapter 'bad'.*{message}"):
        load_adapter("bad", d, load_model_config(base), max_rank)


def test_adapter_of_another_base_model_is_refused_and_the_base_keeps_serving(tmp_path: Path) -> None:
    base = make_tiny_checkpoint(tmp_path / "base", "llama")
    other = make_tiny_checkpoint(tmp_path / "other", "llama", intermediate_size=96)
    bad = make_tiny_adapter(tmp_path / "other-adapter", other, rank=4)
    good = make_tiny_adapter(tmp_path / "good", base, rank=4)
    modules = [("x", str(bad)), ("y", str(good))]
    engine = LLMEngine(
        base, EngineConfig(num_kv_blocks=16, max_loras=1, max_lora_rank=8, lora_modules=modules)
    )
    assert engine.adapters == ["y"]
    reason = r"adapter 'x': layers.0.down_proj.lora_A: shape \(4, 96\), expected \(r=4, 128\)"
    with pytest.raises(ValueError, match=f"LoRA adapter 'x' failed to load: {reason}"):
        engine.add_request("r", [5, 6, 7], replace(GREEDY, adapter="x"))
    assert [len(t) for t in engine.generate([[5, 6, 7]] * 2, [GREEDY, replace(GREEDY, adapter="y")])] == [
        MAX_NEW
    ] * 2
