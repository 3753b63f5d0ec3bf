"""gpt-oss (GptOssForCausalLM): a mixture-of-experts decoder with attention sinks.

The Llama decoder with what gpt-oss adds: q/k/v and o biases, a learned sink logit per head in
every softmax (`LlamaAttention.sinks`), a sliding window on every other layer (`layer_types`),
YaRN, a biased router (softmax over the top k logits, that is the renormalised top k) and biased
experts with a clamped SwiGLU (`layers.moe.clamped_swiglu`).

Its checkpoints stack the experts: `mlp.experts.gate_up_proj` [E, H, 2I] with gate and up
interleaved column by column, `mlp.experts.down_proj` [E, I, H], and biases [E, 2I] / [E, H];
the router is `mlp.router`. `split_experts` turns them into one tensor per expert and projection
under Qwen3-MoE's names ([out, in], gate and up apart), so the MoE loader, tensor-parallel sharding
and fp8/int8 quantization apply unchanged; the build converts through it, as the loader does.
OpenAI's checkpoints hold the expert weights in MXFP4 (`*_blocks` [E, out, in/32, 16]: two e2m1
values a byte, low nibble first; `*_scales` [E, out, in/32]: one e8m0 exponent per 32 values):
they are dequantized, one expert at a time, once both halves have been read, and served in the
model's dtype (or re-quantized by the build's `--quantization`); or, when the model's quantization
is mxfp4 (a build with `--quantization mxfp4`), kept packed, one [out, in/2] tensor and its
[out, in/32] exponents (`weight_scale`) per expert and projection, as `layers.moe` serves them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln_engine.config import ModelConfig
from kiln_engine.dtypes import checkpoint_dtype
from kiln_engine.models.moe import MoeForCausalLM
from kiln_engine.quantization import MXFP4_BLOCK, dequantize_mxfp4

# stacked expert tensors of a float checkpoint -> (projection, parameter)
STACKED = {
    "experts.gate_up_proj": ("gate_up_proj", "weight"),
    "experts.gate_up_proj_bias": ("gate_up_proj", "bias"),
    "experts.down_proj": ("down_proj", "weight"),
    "experts.down_proj_bias": ("down_proj", "bias"),
}


def split_experts(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, pending: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """One gpt-oss checkpoint tensor -> the Qwen3-MoE-named tensors it holds (itself otherwise).

    An MXFP4 tensor's first half (blocks or scales) waits in `pending` (the caller's, one per pass
    over a checkpoint) and yields nothing; its second half yields the dequantized experts."""
    block, _, param = name.rpartition(".mlp.")
    if not param:
        yield name, tensor
        return
    prefix = f"{block}.mlp."
    if param in ("router.weight", "router.bias"):
        yield prefix + "gate." + param.removeprefix("router."), tensor
    elif param.endswith(("_blocks", "_scales")):
        stem, _, half = name.rpartition("_")
        other = pending.pop(f"{stem}_{'scales' if half == 'blocks' else 'blocks'}", None)
        if other is None:
            pending[name] = tensor
            return
        blocks, scales = (tensor, other) if half == "blocks" else (other, tensor)
        projection = stem.rpartition(".experts.")[2]
        if blocks.shape[-1] != MXFP4_BLOCK // 2 or blocks.shape[:-1] != scales.shape:
            raise ValueError(
                f"{stem}: MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
            )
        for e in range(blocks.shape[0]):  # dense [out, in] per expert
            packed = blocks[e].flatten(-2)  # [out, in/32, 16] -> [out, in/2]
            if cfg.quant.method == "mxfp4":  # served packed
                yield from _expert_parts(prefix, e, projection, "weight", packed)
                yield from _expert_parts(prefix, e, projection, "weight_scale", scales[e])
            else:  # dense [out, in]
                dense = dequantize_mxfp4(packed, scales[e], checkpoint_dtype(cfg.torch_dtype))
                yield from _expert_parts(prefix, e, projection, "weight", dense)
    elif param in STACKED:
        projection, kind = STACKED[param]
        for e in range(tensor.shape[0]):  # weights [in, out] as stored -> [out, in]
            part = tensor[e] if kind == "bias" else tensor[e].t()
            yield from _expert_parts(prefix, e, projection, kind, part)
    else:
        yield name, tensor


def _expert_parts(
    prefix: str, expert: int, projection: str, kind: str, tensor: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    """One expert's [out, ...] gate_up (gate and up interleaved by output row) or down tensor."""
    base = f"{prefix}experts.{expert}."
    if projection == "gate_up_proj":
        yield f"{base}gate_proj.{kind}", tensor[0::2].contiguous()
        yield f"{base}up_proj.{kind}", tensor[1::2].contiguous()
    elif projection == "down_proj":
        yield f"{base}down_proj.{kind}", tensor.contiguous()
    else:
        raise ValueError(f"{prefix}experts: unknown expert projection {projection!r}")


class GptOssForCausalLM(MoeForCausalLM):
    block_name = "mlp"

    @staticmethod
    def split_checkpoint_tensor(
        name: str, tensor: torch.Tensor, config: ModelConfig, pending: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return split_experts(name, tensor, config, pending)
