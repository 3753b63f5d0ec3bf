"""Weight conversion for `kiln-engine build`: cast or quantize checkpoint tensors and write one
safetensors file per rank (`rank-<r>/model.safetensors`, r = stage * tp + tp_rank).

Ranks are written one at a time, so memory holds one rank's shard plus one full tensor, never the
whole model. Row-parallel weights are quantized whole before they are sliced, so per-channel scales
are the same on every rank as in an unsharded build.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln_engine.build.manifest import PipelineStage
from kiln_engine.config import ModelConfig
from kiln_engine.layers.sharding import in_pp_stage, pp_layer_range, rank_tensor
from kiln_engine.loader import RANK_DIR, RANK_WEIGHTS_FILE, weight_files
from kiln_engine.models import model_class
from kiln_engine.quantization import is_quantizable, quantize_fp8, quantize_int8

CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pipeline_stages(num_layers: int, tp: int, pp: int) -> list[PipelineStage]:
    """Each stage's decoder layers and the global ranks (stage * tp + tp_rank) that hold them."""
    out = []
    for stage in range(pp):
        layers = pp_layer_range(num_layers, stage, pp)
        out.append(PipelineStage(stage=stage, first_layer=layers.start, end_layer=layers.stop,
                                 ranks=[stage * tp + r for r in range(tp)]))  # fmt: skip
    return out


def rank_file(rank: int) -> str:
    """The artifact-relative path of rank `rank`'s weights."""
    return f"{RANK_DIR.format(rank=rank)}/{RANK_WEIGHTS_FILE}"


def convert_tensor(
    name: str, tensor: torch.Tensor, mode: str, per_channel: bool = True, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """One checkpoint tensor -> the artifact tensors it becomes.

    `mode`: "keep" (as published; "mxfp4": gpt-oss's experts already split packed), "bf16"/"fp16"
    (cast floating tensors), "fp8"/"int8" (quantize the decoder's Linear weights into `X.weight` +
    `X.weight_scale`; everything else kept).
    """
    if mode in ("keep", "mxfp4"):
        return {name: tensor}
    if mode in CAST_DTYPES:
        return {name: tensor.to(CAST_DTYPES[mode]) if tensor.is_floating_point() else tensor}
    if mode not in ("fp8", "int8"):
        raise ValueError(f"unknown conversion mode {mode!r}")
    if not is_quantizable(name):
        return {name: tensor}
    w = tensor.to(device)
    q, scale = quantize_fp8(w, per_channel) if mode == "fp8" else quantize_int8(w)
    return {name: q.cpu(), name.removesuffix("weight") + "weight_scale": scale.cpu()}


class _Checkpoint:
    """Tensor names of a safetensors checkpoint and lazy access to each tensor."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.handles: dict[str, Any] = {}
        for f in weight_files(path):
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.handles[name] = handle
        if not self.handles:
            raise ValueError(f"{path}: the safetensors files hold no tensors")

    def names(self) -> list[str]:
        return sorted(self.handles)

    def get(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self.handles[name].get_tensor(name)
        return tensor


def _reading(
    ckpt: _Checkpoint, names: list[str], handled: Callable[[str], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each named checkpoint tensor in turn; `handled(name)` once its consumer asks for the next."""
    for name in names:
        yield name, ckpt.get(name)
        handled(name)


def write_rank_shards(
    checkpoint: Path,
    out: Path,
    config: ModelConfig,
    *,
    mode: str,
    tp: int,
    pp: int,
    per_channel: bool = True,
    device: str = "cpu",
    report: Callable[[float, str], None] | None = None,
) -> dict[str, list[str]]:
    """Convert and shard `checkpoint` into `out/rank-<r>/model.safetensors`; returns {rank: [paths]}."""
    progress = report or (lambda fraction, message: None)
    files: dict[str, list[str]] = {}
    with ExitStack() as stack:
        ckpt = _Checkpoint(checkpoint, stack)
        names = ckpt.names()
        per_stage = [
            [n for n in names if in_pp_stage(n, config.num_hidden_layers, s, pp, config.tie_word_embeddings)]
            for s in range(pp)
        ]
        total = sum(len(s) for s in per_stage) * tp or 1
        split = model_class(config).checkpoint_tensors
        experts = config.moe.num_experts if config.moe is not None and config.moe.expert_parallel else 0
        done = itertools.count(1)
        for stage in range(pp):
            for tp_rank in range(tp):
                rank = stage * tp + tp_rank
                part: dict[str, torch.Tensor] = {}
                handled = lambda name, rank=rank: progress(next(done) / total, f"rank {rank}: {name}")  # noqa: E731
                tensors = _reading(ckpt, per_stage[stage], handled)
                # fused (Phi-3) and stacked (gpt-oss) checkpoint tensors are split first: sharded and
                # quantized as Llama's and Qwen3-MoE's
                for plain, whole in split(tensors, config):
                    for out_name, t in convert_tensor(plain, whole, mode, per_channel, device).items():
                        shard = rank_tensor(out_name, t, tp_rank, tp, config.num_key_value_heads, experts)
                        if shard is not None:  # None: another rank's expert (expert parallel)
                            part[out_name] = shard.contiguous()
                rel = rank_file(rank)
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                save_file(part, str(out / rel), metadata={"format": "pt"})
                files[str(rank)] = [rel]
                del part
    return files
