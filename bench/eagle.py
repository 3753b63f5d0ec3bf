"""EAGLE speculative decoding with a trained head: tiny-chat and examples/tiny-chat-eagle (trained
for it on its corpus), on tiny-chat's own questions. Per row, in the same run: plain greedy decoding,
n-gram prompt lookup, and the EAGLE head; requests whose tokens equal plain decoding's, drafts
proposed and kept, and time per output token. Acceptance is real (a trained head on the text it was
trained on), the model is not: a 1M-parameter Llama says nothing about an 8B model's speed.

    PYTHONPATH=engine-image .venv/bin/python bench/eagle.py --device cpu \\
        --out bench/results-committed/eagle-cpu.json      # the committed CPU record
    PYTHONPATH=engine-image python3 bench/eagle.py --out bench/results/eagle.json   # GPU

`--shape llama3-8b` (GPU) measures what drafting costs instead: a Llama-3-8B-shaped model with dummy
weights and a random EAGLE-1 head of its size, whose drafts are (almost) never kept, so the time per
output token with the head minus without it is the head's drafting and the wider verify step.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from engine_throughput import LLAMA3_8B  # the benches' Llama-3-8B shape

from kiln_engine.config import EngineConfig
from kiln_engine.eagle import EagleProposer
from kiln_engine.eagle_steps import DraftSteps
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.model_runner import DecodeGraphs
from kiln_engine.testing import make_tiny_checkpoint, make_tiny_eagle_head

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUESTIONS = [
    "What is Kiln?",
    "What does Kiln build?",
    "How does Kiln scale?",
    "Where does Kiln place a tensor-parallel group?",
    "How do I deploy a model?",
    "What is an LLMEngine?",
    "Who are you?",
    "Say hello.",
]
MODES = {"plain": None, "ngram": "ngram", "eagle": "eagle"}


def run(mode: str, batch: int, device: str, k: int) -> dict[str, Any]:
    method = MODES[mode]
    cfg = EngineConfig(
        device=device,
        cuda_graphs=device == "cuda",
        max_num_seqs=16,
        max_model_len=512,
        speculative=method,
        num_speculative_tokens=k,
        draft_model=str(EXAMPLES / "tiny-chat-eagle") if method == "eagle" else None,
    )
    engine = LLMEngine(EXAMPLES / "tiny-chat", cfg)
    assert engine.tokenizer is not None
    asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    prompts = [engine.tokenizer.encode(f"<|bos|><|user|>\n{q}<|end|>\n<|assistant|>\n") for q in asked]
    params = SamplingParams(max_tokens=64, temperature=0)  # answers end at <|end|>
    engine.generate(prompts, params)  # warm-up
    before = engine.stats()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = engine.stats()
    steps_tokens = max(len(o) for o in out)  # the batch's longest answer sets its decode steps
    return {
        "tokens": out,
        "ms_per_token": 1000 * seconds / steps_tokens,
        "proposed": stats.spec_proposed_tokens_total - before.spec_proposed_tokens_total,
        "accepted": stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total,
    }


def shaped_model(root: Path) -> tuple[Path, Path]:
    """A Llama-3-8B-shaped checkpoint without weights (load it with load_format dummy) and a random
    EAGLE-1 head of its size."""
    model = make_tiny_checkpoint(root / "model", "llama")
    config = json.loads((model / "config.json").read_text()) | LLAMA3_8B
    (model / "config.json").write_text(json.dumps(config))
    head = make_tiny_eagle_head(root / "head", model)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    return model, head


def run_shaped(model: Path, head: Path, eagle: bool, batch: int, k: int) -> dict[str, Any]:
    cfg = EngineConfig(
        device="cuda", dtype="bfloat16", load_format="dummy", cuda_graphs=True, max_model_len=1024,
        num_kv_blocks=2048, block_size=16, max_num_seqs=16, speculative="eagle" if eagle else None,
        num_speculative_tokens=k, draft_model=str(head) if eagle else None,
    )  # fmt: skip
    engine = LLMEngine(model, cfg)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(128)] for _ in range(batch)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up
    before = engine.stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    parts = timed_parts(engine, prompts, params)
    del engine
    torch.cuda.empty_cache()
    return {
        "ms_per_token": 1000 * elapsed / 64,
        "proposed": stats.spec_proposed_tokens_total - before.spec_proposed_tokens_total,
        "accepted": stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total,
        "ms_per_step": parts,
    }


# Where a step's time goes (one more generate, each part timed between device synchronizations).
PARTS = {
    "engine step": (LLMEngine, "step"),
    "target decode forward": (DecodeGraphs, "run"),
    "target verify forward": (DecodeGraphs, "run_tails"),
    "drafting": (EagleProposer, "__call__"),
    "head draft steps": (DraftSteps, "run"),
}


def timed_parts(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """Milliseconds per engine step in each of PARTS over one generate call (the verify forward
    counts inside the decode forward, the draft steps inside drafting, whose rest is the catch-up
    and the first draft)."""
    seconds = dict.fromkeys(PARTS, 0.0)
    calls = dict.fromkeys(PARTS, 0)
    originals = {name: getattr(owner, attr) for name, (owner, attr) in PARTS.items()}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            calls[name] += 1
            return result

        return wrapper

    for name, (owner, attr) in PARTS.items():
        setattr(owner, attr, timed(name, originals[name]))
    try:
        engine.generate(prompts, params)
    finally:
        for name, (owner, attr) in PARTS.items():
            setattr(owner, attr, originals[name])
    steps = max(1, calls["engine step"])
    return {name: round(1000 * s / steps, 3) for name, s in seconds.items()} | {"steps": steps}


def main_shaped(out: Path, k: int) -> None:
    model, head = shaped_model(Path(tempfile.mkdtemp()))
    rows = []
    print(f"{'batch':>5} {'plain ms':>9} {'eagle ms':>9} {'kept':>9} {'head cost ms':>12}")
    for batch in (1, 16):
        plain, eagle = run_shaped(model, head, False, batch, k), run_shaped(model, head, True, batch, k)
        row = {"batch": batch, "plain_ms_per_token": round(plain["ms_per_token"], 3),
               "eagle_ms_per_token": round(eagle["ms_per_token"], 3),
               "proposed": eagle["proposed"], "accepted": eagle["accepted"],
               "plain_ms_per_step": plain["ms_per_step"],
               "eagle_ms_per_step": eagle["ms_per_step"]}  # fmt: skip
        rows.append(row)
        kept = f"{row['accepted']}/{row['proposed']}"
        cost = row["eagle_ms_per_token"] - row["plain_ms_per_token"]
        plain_ms, eagle_ms = row["plain_ms_per_token"], row["eagle_ms_per_token"]
        print(f"{batch:>5} {plain_ms:>9.3f} {eagle_ms:>9.3f} {kept:>9} {cost:>12.3f}")
        print("   plain ms per step:", plain["ms_per_step"])
        print("   eagle ms per step:", eagle["ms_per_step"], flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": "llama3-8b", "k": k}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--shape", choices=("tiny-chat", "llama3-8b"), default="tiny-chat")
    args = ap.parse_args()
    if args.shape == "llama3-8b":
        main_shaped(Path(args.out), args.num_tokens)
        return
    rows = []
    print(f"{'batch':>5} {'mode':>6} {'same':>6} {'proposed':>8} {'kept':>6} {'ms/token':>9} {'vs plain':>8}")
    for batch in (1, 8):
        base = run("plain", batch, args.device, args.num_tokens)
        for mode in MODES:
            r = base if mode == "plain" else run(mode, batch, args.device, args.num_tokens)
            same = sum(a == b for a, b in zip(base["tokens"], r["tokens"], strict=True))
            ms = float(r["ms_per_token"])
            row = {
                "batch": batch,
                "mode": mode,
                "identical_requests": f"{same}/{batch}",
                "proposed": r["proposed"],
                "accepted": r["accepted"],
                "ms_per_token": round(ms, 3),
                "speedup_vs_plain": round(float(base["ms_per_token"]) / ms, 2),
            }
            rows.append(row)
            print(
                f"{batch:>5} {mode:>6} {row['identical_requests']:>6} {r['proposed']:>8} {r['accepted']:>6} "
                f"{ms:>9.3f} {row['speedup_vs_plain']:>7.2f}x",
                flush=True,
            )
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "num_speculative_tokens": args.num_tokens,
        "model": "examples/tiny-chat",
        "head": "examples/tiny-chat-eagle",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
