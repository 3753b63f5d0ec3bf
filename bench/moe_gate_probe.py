"""Which fast-path kernel moves the tiny Qwen3-MoE off the float32 tokens in `moe_throughput.py --check`.

The gate serves a random tiny Qwen3-MoE through the reference path (torch, eager) and the fast path
(Triton, CUDA graphs) and asks that the fast path follow the float32 greedy tokens at least as far as
the reference does, prompt by prompt. This probe serves the same model with one Triton piece at a
time switched back to torch (or, for the experts, switched on alone) and prints how many tokens of
each prompt agree with float32, so a failure points at a kernel. GPU only.

    PYTHONPATH=engine-image python3 bench/moe_gate_probe.py --out bench/results/moe-gate-probe.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from engine_throughput import free, make_engine
from moe_throughput import common_prefix

from kiln_engine.interface import SamplingParams
from kiln_engine.layers.moe import FusedMoE
from kiln_engine.layers.norm import RMSNorm
from kiln_engine.models.llama import LlamaAttention
from kiln_engine.testing import make_tiny_checkpoint

EAGER = {"attention_backend": "auto", "cuda_graphs": False}
TORCH = {"attention_backend": "torch", "cuda_graphs": False}
# mode -> (engine overrides, (module type, value its `fused` flag is set to) or None)
MODES: dict[str, tuple[dict[str, Any], tuple[type[FusedMoE | RMSNorm | LlamaAttention], bool] | None]] = {
    "exact": ({**TORCH, "dtype": "float32"}, None),
    "reference": (TORCH, None),
    "reference+triton_experts": (TORCH, (FusedMoE, True)),
    "triton_eager": (EAGER, None),
    "triton_eager+torch_experts": (EAGER, (FusedMoE, False)),
    "triton_eager+torch_norms": (EAGER, (RMSNorm, False)),
    "triton_eager+torch_rope_and_kv_store": (EAGER, (LlamaAttention, False)),
    "fast": ({"attention_backend": "auto", "cuda_graphs": True}, None),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe-gate-probe.json"))
    args = ap.parse_args(argv)
    engine_args = argparse.Namespace(
        device="cuda", max_num_seqs=256, max_tokens_per_step=8192, gpu_memory_utilization=0.5, tp=1
    )
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / args.arch, args.arch, num_hidden_layers=3)
        for mode, (overrides, switch) in MODES.items():
            engine = make_engine(path, engine_args, 256, load_format="auto", **overrides)
            if switch is not None:
                for module in engine.runner.model.modules():
                    if isinstance(module, switch[0]):
                        module.fused = switch[1]
            assert engine.tokenizer is not None
            prompts = [engine.tokenizer.encode(t) for t in ("Hello, world!", "The quick brown fox", "A")]
            tokens[mode] = engine.generate(prompts * 3, greedy)
            del engine
            free()
    exact = tokens["exact"]
    agree = {m: [common_prefix(t, e) for t, e in zip(toks, exact, strict=True)] for m, toks in tokens.items()}
    for mode, counts in agree.items():
        print(f"{args.arch} {mode:38} tokens agreeing with float32: {counts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "agree": agree, "tokens": tokens}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
