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
model's dtype (or re-quantized by the build's `--quantization`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln_engine.config import ModelConfig
from kiln_engine.dtypes import checkpoint_dtype
from kiln_engine.models.moe import MoeForCausalLM

# stacked expert tensors of a float checkpoint -> (projection, parameter)
STACKED = {
    "experts.gate_up_proj": ("gate_up_proj", "weight"),
    "experts.gate_up_proj_bias": ("gate_up_proj", "bias"),
    "experts.down_proj": ("down_proj", "weight"),
    "experts.down_proj_bias": ("down_proj", "bias"),
}
# e2m1: sign, two exponent bits, one mantissa bit; code i is FP4_VALUES[i]
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # values sharing one exponent


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 [out, G, 16] uint8 blocks and [out, G] uint8 exponents -> [out, G * 32] in `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.uint8)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1).flatten(-2)
    exponents = scales.to(torch.int32)[..., None] - 127
    return torch.ldexp(values, exponents).flatten(-2).to(dtype)


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
        for e in range(blocks.shape[0]):  # dense [out, in] per expert
            dense = dequantize_mxfp4(blocks[e], scales[e], checkpoint_dtype(cfg.torch_dtype))
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
