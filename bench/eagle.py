"""EAGLE speculative decoding with a trained head: tiny-chat and examples/tiny-chat-eagle (trained
for it on its corpus), on tiny-chat's own questions. Per row, in the same run: plain greedy decoding,
n-gram prompt lookup, and the EAGLE head; requests whose tokens equal plain decoding's, drafts
proposed and kept, and time per output token. Acceptance is real (a trained head on the text it was
trained on), the model is not: a 1M-parameter Llama says nothing about an 8B model's speed.

    PYTHONPATH=engine-image .venv/bin/python bench/eagle.py --device cpu \\
        --out bench/results-committed/eagle-cpu.json      # the committed CPU record
    PYTHONPATH=engine-image python3 bench/eagle.py --out bench/results/eagle.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams

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


def run(mode: str, batch: int, device: str, k: int) -> dict[str, object]:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-tokens", type=int, default=4)
    args = ap.parse_args()
    rows = []
    print(f"{'batch':>5} {'mode':>6} {'same':>6} {'proposed':>8} {'kept':>6} {'ms/token':>9} {'vs plain':>8}")
    for batch in (1, 8):
        base = run("plain", batch, args.device, args.num_tokens)
        for mode in MODES:
            r = base if mode == "plain" else run(mode, batch, args.device, args.num_tokens)
            same = sum(a == b for a, b in zip(base["tokens"], r["tokens"], strict=True))
            ms = float(r["ms_per_token"])  # type: ignore[arg-type]
            row = {
                "batch": batch,
                "mode": mode,
                "identical_requests": f"{same}/{batch}",
                "proposed": r["proposed"],
                "accepted": r["accepted"],
                "ms_per_token": round(ms, 3),
                "speedup_vs_plain": round(float(base["ms_per_token"]) / ms, 2),  # type: ignore[arg-type]
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
