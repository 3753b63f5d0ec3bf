"""How close to a tie the float32 greedy tokens of the MoE gate's tiny Qwen3-MoE are (CPU).

For each prompt of `moe_throughput.py --check`, transformers' float32 model scores the float32 path's
tokens (from a gate or probe results file) and prints, per step, the gap between the two largest
logits in units of that step's logit standard deviation. bfloat16 keeps 8 significant bits (a
relative step of 2^-8 = 0.0039), so a gap of that order can flip under any bf16 path's rounding.

    PYTHONPATH=engine-image python3 bench/moe_gate_margins.py bench/results-committed/moe-gate-probe-h100.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from kiln_engine.testing import make_tiny_checkpoint

PROMPTS = ("Hello, world!", "The quick brown fox", "A")


def main(argv: list[str]) -> int:
    exact = json.loads(Path(argv[0]).read_text())["tokens"]["exact"]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "qwen3_moe", "qwen3_moe", num_hidden_layers=3)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for i, text in enumerate(PROMPTS):
            ids = tok.encode(text)
            with torch.no_grad():
                logits = model(torch.tensor([ids + exact[i]])).logits[0, len(ids) - 1 : -1]
            top = logits.topk(2, dim=-1)
            gaps = ((top.values[:, 0] - top.values[:, 1]) / logits.std(dim=-1)).tolist()
            same = top.indices[:, 0].tolist() == exact[i]
            print(f"{text!r}: transformers float32 gives the same tokens: {same}")
            print("  top-2 gap / logit std, steps 0-11: " + " ".join(f"{g:.3f}" for g in gaps[:12]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
