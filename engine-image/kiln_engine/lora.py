"""LoRA adapters in PEFT format: reading and validating them against the base model, and the GPU slot policy.

An adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with `...layers.<i>.<self_attn|mlp>.<module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r] per targeted projection. `load_adapter` reads both, checks every field this
runtime relies on (a clear `AdapterError` naming the adapter and the field otherwise) and returns the
tensors with PEFT's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) folded into B. How the
tensors land on the model's fused, sharded projections is `kiln_engine.lora_layers`' business;
which adapter holds which device slot is `kiln_engine.lora_slots`'.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kiln_engine.config import ModelConfig

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
BASE_MODEL_NAME = "base"  # the served name of the base model, next to its adapters'
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES
_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(ValueError):
    """An adapter this runtime cannot serve; the message names the adapter and the offending field."""


@dataclass(frozen=True)
class LoraWeight:
    """One targeted projection: A [r, in] and B [out, r] with the adapter's scaling folded into B."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], LoraWeight]  # (decoder layer, HF module name) -> weights

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.weights)


def parse_lora_spec(spec: str) -> tuple[str, str]:
    """`name=path` (the --lora flag) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise AdapterError(f"--lora {spec!r}: expected name=path")
    check_adapter_name(name)
    return name, path


def check_adapter_name(name: str) -> None:
    if name == BASE_MODEL_NAME or not _NAME.match(name):
        raise AdapterError(
            f"adapter name {name!r}: must be 1-64 letters, digits, '.', '_' or '-' (not starting with "
            f"one of '.', '_', '-') and not {BASE_MODEL_NAME!r}, which names the base model"
        )


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) features of each projection LoRA may target, unsharded, as the checkpoint has them."""
    h, q, kv, i = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def read_adapter_config(name: str, path: Path) -> dict[str, Any]:
    f = path / ADAPTER_CONFIG_FILE
    if not f.is_file():
        raise AdapterError(f"adapter {name!r}: {f} is missing (not a PEFT adapter directory)")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG_FILE} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG_FILE} must be a JSON object")
    return data


def lora_scaling(name: str, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    """(rank, scaling) from adapter_config.json; rejects every option this runtime would get wrong."""

    def bad(field: str, why: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG_FILE} field {field!r} {why}")

    if config.get("peft_type", "LORA") != "LORA":
        raise bad("peft_type", f"is {config.get('peft_type')!r}; only LORA adapters are served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("r", f"must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise bad("r", f"is {rank}, above this server's max LoRA rank {max_rank} (--max-lora-rank)")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise bad("lora_alpha", f"must be a number, got {alpha!r}")
    for field, off in (("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False)):
        if config.get(field, off) not in (off, None):
            raise bad(field, f"is {config[field]!r}; only {off!r} is supported")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if config.get(field):
            raise bad(field, f"is {config[field]!r}; per-module ranks and extra modules are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):  # a string is a regex: the tensors present say what it matched
        unknown = sorted(set(map(str, targets)) - set(SUPPORTED_MODULES))
        if unknown:
            raise bad("target_modules", f"names {unknown}; supported: {', '.join(SUPPORTED_MODULES)}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def load_adapter(name: str, path: str | Path, cfg: ModelConfig, max_rank: int) -> LoraAdapter:
    """Read and validate the PEFT adapter at `path` for base model `cfg`; tensors stay on the CPU."""
    check_adapter_name(name)
    d = Path(path)
    if not d.is_dir():
        raise AdapterError(f"adapter {name!r}: {d} is not a directory")
    config = read_adapter_config(name, d)
    rank, scaling = lora_scaling(name, config, max_rank)
    f = d / ADAPTER_WEIGHTS_FILE
    if not f.is_file():
        raise AdapterError(f"adapter {name!r}: {f} is missing")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
            m = _TENSOR.search(key)
            if m is None:
                raise AdapterError(
                    f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a decoder layer's "
                    f"projection ({', '.join(SUPPORTED_MODULES)})"
                )
            layer, module, half = int(m.group(1)), m.group(2), m.group(3)
            if module not in SUPPORTED_MODULES:
                raise AdapterError(
                    f"adapter {name!r}: target module {module!r} (tensor {key!r}) is not one of "
                    f"{', '.join(SUPPORTED_MODULES)}"
                )
            halves.setdefault((layer, module), {})[half] = st.get_tensor(key)
    if not halves:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_WEIGHTS_FILE} holds no LoRA weights")
    return LoraAdapter(name, str(d), rank, validate_weights(name, halves, cfg, rank, scaling))


def validate_weights(
    name: str,
    halves: dict[tuple[int, str], dict[str, torch.Tensor]],
    cfg: ModelConfig,
    rank: int,
    scaling: float,
) -> dict[tuple[int, str], LoraWeight]:
    """Check every (layer, module)'s A and B against the base model's shapes; fold the scaling into B."""
    shapes = module_shapes(cfg)
    weights: dict[tuple[int, str], LoraWeight] = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"adapter {name!r}: layers.{layer}.{module}"
        if not 0 <= layer < cfg.num_hidden_layers:
            raise AdapterError(f"{where}: the base model has {cfg.num_hidden_layers} layers")
        if cfg.moe is not None and module in MLP_MODULES and cfg.moe.is_sparse(layer):
            raise AdapterError(f"{where}: the base model's layer {layer} MLP is a mixture of experts")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{''.join(pair)} but not both lora_A and lora_B")
        out_f, in_f = shapes[module]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_f):
            raise AdapterError(
                f"{where}.lora_A: shape {tuple(a.shape)}, expected (r={rank}, {in_f}) for this base model"
            )
        if tuple(b.shape) != (out_f, rank):
            raise AdapterError(
                f"{where}.lora_B: shape {tuple(b.shape)}, expected ({out_f}, r={rank}) for this base model"
            )
        weights[(layer, module)] = LoraWeight(a.float(), b.float() * scaling)
    return weights
