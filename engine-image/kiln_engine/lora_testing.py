"""Tiny random LoRA adapters in PEFT's on-disk format, for a tiny checkpoint (tests, bench and demo).

`make_tiny_adapter(path, base)` writes adapter_config.json and adapter_model.safetensors exactly as
`peft`'s `save_pretrained` lays them out (tensor names `base_model.model.<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained` loads the result; no `peft` import is needed to make one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln_engine.config import ModelConfig
from kiln_engine.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, SUPPORTED_MODULES, module_shapes

ATTENTION_AND_MLP = SUPPORTED_MODULES


def make_tiny_adapter(
    path: str | Path,
    base: str | Path,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ATTENTION_AND_MLP,
    seed: int = 1,
    std: float = 0.2,
) -> Path:
    """A random rank-`rank` adapter of every decoder layer's `targets` for the checkpoint at `base`."""
    cfg = ModelConfig.from_file(Path(base) / "config.json")
    shapes = module_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_hidden_layers):
        for module in targets:
            out_f, in_f = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    (d / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a tiny random PEFT LoRA adapter for a tiny checkpoint.")
    ap.add_argument("path")
    ap.add_argument("--base", required=True, help="the checkpoint directory the adapter is for")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(make_tiny_adapter(args.path, args.base, rank=args.rank, seed=args.seed))


if __name__ == "__main__":
    main()
