"""Loading a model to serve, from a Hugging Face checkpoint directory or a Kiln artifact directory.

Kiln artifact layout (written by `kiln-engine build`, read here; the names below are the contract):

    <artifact>/manifest.json                 MANIFEST_FILE, written last: its presence marks a
                                             complete artifact
    <artifact>/config.json                   the model's HF config.json; for fp8/int8 built by Kiln
                                             it carries "quantization_config": {"quant_method": "fp8"
                                             | "int8"}; AWQ/GPTQ configs stay as published
    <artifact>/tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja
                                             copied as found (TOKENIZER_FILES)
    <artifact>/rank-<r>/model.safetensors    RANK_DIR / RANK_WEIGHTS_FILE: tensor-parallel shard r,
                                             tensors under their HF names, sliced by
                                             `layers.sharding.rank_tensor`

manifest.json keys the loader reads (others are the build's business):
    "tensor_parallel_size": int (default 1)    MANIFEST_TP
    "pipeline_parallel_size": int (default 1)  MANIFEST_PP; rank r = stage * tp + tp_rank
    "expert_parallel": bool (default false)      MANIFEST_EP; experts whole, E / tp a rank
    "pipeline_stages": [{"stage", "first_layer", "end_layer", "ranks"}]  MANIFEST_STAGES (each
                                               stage's decoder layers; default: `pp_layer_range`)
    "quantization": "none"|"fp8"|"int8"|"int8-weight"|... (config.json's quantization_config wins)
                                               MANIFEST_QUANT
    "dtype": "bfloat16"|"float16"|"float32"    MANIFEST_DTYPE (activation/weight dtype)

Quantized tensors per Linear `X` are described in `kiln_engine.quantization`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kiln_engine.config import EngineConfig, ModelConfig, QuantConfig, with_expert_parallel
from kiln_engine.dtypes import DTYPES, checkpoint_dtype
from kiln_engine.layers.parallel import PPStage, global_rank, init_parallel, pipeline_stage
from kiln_engine.layers.sharding import in_pp_stage, rank_tensor
from kiln_engine.models import model_class
from kiln_engine.models.llama import LlamaForCausalLM
from kiln_engine.tokenizer import TOKENIZER_FILES, Tokenizer

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
RANK_DIR = "rank-{rank}"
RANK_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
MANIFEST_TP = "tensor_parallel_size"
MANIFEST_PP = "pipeline_parallel_size"
MANIFEST_EP = "expert_parallel"
MANIFEST_STAGES = "pipeline_stages"
MANIFEST_QUANT = "quantization"
MANIFEST_DTYPE = "dtype"
__all__ = [
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "RANK_DIR",
    "RANK_WEIGHTS_FILE",
    "TOKENIZER_FILES",
    "is_artifact",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "rank_weights_path",
]


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).exists()


def read_manifest(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(path) / MANIFEST_FILE).read_text())
    return data


def rank_weights_path(path: str | Path, rank: int) -> Path:
    return Path(path) / RANK_DIR.format(rank=rank) / RANK_WEIGHTS_FILE


def load_model_config(path: str | Path) -> ModelConfig:
    """config.json of a checkpoint or artifact; an artifact's manifest may name the quantization."""
    d = Path(path)
    if not (d / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{d} has no {CONFIG_FILE}: not a Hugging Face checkpoint or Kiln artifact")
    cfg = ModelConfig.from_file(d / CONFIG_FILE)
    if is_artifact(d):
        method = str(read_manifest(d).get(MANIFEST_QUANT) or "none")
        method = {"int8-weight": "int8"}.get(method, method)
        if method in ("fp8", "int8") and cfg.quant.method == "none":
            cfg = replace(cfg, quant=QuantConfig(method=method, bits=8))
    return cfg


def load_tokenizer(path: str | Path, model_config: ModelConfig | None = None) -> Tokenizer:
    extra = model_config.eos_token_ids if model_config else ()
    return Tokenizer.from_dir(path, extra_eos_token_ids=extra)


def resolve_dtype(name: str, device: torch.device, model_config: ModelConfig) -> torch.dtype:
    """ "auto" serves float32 on CPU and the checkpoint's half type (bfloat16 by default) on GPU."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        ckpt = checkpoint_dtype(model_config.torch_dtype)
        return torch.bfloat16 if ckpt == torch.float32 else ckpt
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}") from None


def weight_files(path: str | Path, rank: int = 0) -> list[Path]:
    """The safetensors files holding rank `rank`'s weights."""
    d = Path(path)
    if is_artifact(d):
        f = rank_weights_path(d, rank)
        if not f.exists():
            raise FileNotFoundError(f"artifact {d} has no weights for rank {rank} ({f})")
        return [f]
    if (d / HF_INDEX_FILE).exists():
        index = json.loads((d / HF_INDEX_FILE).read_text())
        return [d / name for name in sorted(set(index["weight_map"].values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no *.safetensors weights")
    return files


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, st.get_tensor(name)


def load_model(
    path: str | Path, engine_config: EngineConfig, max_positions: int, device: torch.device | None = None
) -> tuple[LlamaForCausalLM, ModelConfig, torch.dtype]:
    """Build the model for `path` on `device` and load its weights (this rank's shard)."""
    d = Path(path)
    device = device or torch.device(engine_config.device)
    cfg = load_model_config(d)
    ec = engine_config
    pp = ec.pipeline_parallel_size
    stage = pipeline_stage(cfg.num_hidden_layers, ec.pipeline_parallel_rank, pp)
    presharded = False
    expert_parallel = ec.expert_parallel
    if is_artifact(d):
        manifest = read_manifest(d)
        built_tp, built_pp = int(manifest.get(MANIFEST_TP, 1)), int(manifest.get(MANIFEST_PP, 1))
        if (built_tp, built_pp) != (ec.tensor_parallel_size, pp):
            raise ValueError(
                f"artifact was built for tensor_parallel_size {built_tp} x pipeline_parallel_size "
                f"{built_pp}, engine runs {ec.tensor_parallel_size} x {pp}"
            )
        built_ep = bool(manifest.get(MANIFEST_EP, False))
        if expert_parallel and not built_ep:
            raise ValueError("artifact was built without expert parallelism; rebuild it with it")
        expert_parallel = built_ep
        stage = manifest_stage(manifest, stage)
        presharded = True
    cfg = with_expert_parallel(cfg, expert_parallel, ec.tensor_parallel_size)
    if pp > 1 and not getattr(model_class(cfg), "supports_pipeline", False):
        raise ValueError(f"{cfg.architecture} does not support pipeline parallelism in this runtime")
    if stage.end_layer <= stage.first_layer:
        raise ValueError(f"pipeline stage {stage.rank} of {pp} holds no decoder layers")
    tp = init_parallel(ec.tensor_parallel_rank, ec.tensor_parallel_size, stage.rank, pp, device)
    name = engine_config.dtype
    if (
        name == "auto"
        and is_artifact(d)
        and MANIFEST_DTYPE in (manifest := read_manifest(d))
        and device.type != "cpu"
    ):
        name = str(manifest[MANIFEST_DTYPE])
    dtype = resolve_dtype(name, device, cfg)
    with torch.device(device):
        pp_arg = {"pp": stage} if pp > 1 else {}
        model = model_class(cfg)(cfg, max_positions, dtype, tp, **pp_arg)
    if engine_config.load_format == "dummy":
        init_dummy_weights(model, seed=engine_config.seed)
        model.eval()
        return model, cfg, dtype
    rank = global_rank(stage.rank, tp.rank, tp.size)
    weights = iter_weights(weight_files(d, rank if presharded else 0))
    if not presharded and pp > 1:
        tied = cfg.tie_word_embeddings
        weights = ((n, t) for n, t in weights if in_pp_stage(n, cfg.num_hidden_layers, stage.rank, pp, tied))
    if not presharded and tp.size > 1:
        experts = cfg.moe.num_experts if cfg.moe is not None and cfg.moe.expert_parallel else 0
        kv = cfg.num_key_value_heads
        parts = ((n, rank_tensor(n, t, tp.rank, tp.size, kv, experts)) for n, t in weights)
        weights = ((n, t) for n, t in parts if t is not None)
    with torch.no_grad():
        model.load_weights((n, t.to(device)) for n, t in weights)
    model.eval()
    return model, cfg, dtype


def manifest_stage(manifest: dict[str, Any], default: PPStage) -> PPStage:
    """This rank's stage as the artifact's manifest records it (older artifacts: the default split)."""
    for entry in manifest.get(MANIFEST_STAGES) or []:
        if int(entry["stage"]) == default.rank:
            return PPStage(default.rank, default.size, int(entry["first_layer"]), int(entry["end_layer"]))
    return default


# The std of a uniform random int8 in [-127, 127], and of the difference of two uniform random nibbles
# (an int4 weight minus its zero point), and of an MXFP4 value: dividing by these (MXFP4: the power of
# two nearest) makes dequantized weights spread like N(0, std).
INT8_SPREAD = 73.6
INT4_MINUS_ZERO_SPREAD = 6.52
MXFP4_SPREAD = 2.93  # RMS of e2m1 values over uniformly random codes: sqrt(68.5 / 8)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place, on the model's device: for speed benchmarks, where values do not matter.

    Float weights ~ N(0, std), norms 1; int8 and AWQ/GPTQ int4 weights random with positive scales
    that make their dequantized values spread about as N(0, std) does (a checkpoint's quantized
    weights spread like its float ones; wider random weights make a model so ill-conditioned that
    bf16 rounding alone moves its logits by more than the engine check's bound:
    bench/dummy_weight_spread.py); fp8 weights N(0, 1) with scales std / 4. Only config.json is
    needed, so an 8B-shaped model needs no 16 GB download.
    """
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dtype.is_floating_point and p.element_size() >= 2:
            p.normal_(0.0, std, generator=g)
        elif p.dtype == torch.float8_e4m3fn:
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, 1.0, generator=g).to(p.dtype))
        elif name.endswith("g_idx"):
            continue
        else:  # int8 weights, int4 packed words, MXFP4 bytes
            lo, hi = {torch.int8: (-127, 128), torch.uint8: (0, 256)}.get(p.dtype, (-(2**31), 2**31 - 1))
            p.copy_(
                torch.randint(lo, hi, p.shape, generator=g, device=p.device, dtype=torch.int64).to(p.dtype)
            )
        # Scales are drawn above like any float (so every other weight's values stay what they were
        # before these fills were added), then set.
        if name.endswith("scales"):  # AWQ/GPTQ group scales
            p.fill_(std / INT4_MINUS_ZERO_SPREAD)
        elif name.endswith("weight_scale") and p.dtype == torch.uint8:  # MXFP4 exponents
            p.fill_(127 + round(math.log2(std / MXFP4_SPREAD)))
        elif name.endswith("weight_scale"):
            fp8 = params[name.removesuffix("_scale")].dtype == torch.float8_e4m3fn
            p.fill_(std / 4 if fp8 else std / INT8_SPREAD)
