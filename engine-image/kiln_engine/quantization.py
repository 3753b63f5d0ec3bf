"""Weight quantization: pure converters for the build command and the Linear kernels that run them.

Stored layouts (per Linear `X`, as the artifact and published checkpoints hold them):

* fp8:  `X.weight` float8_e4m3fn [out, in], `X.weight_scale` float32 [out] (per channel) or [] / [1]
        (per tensor). Real weight = weight * scale[:, None].
* int8: `X.weight` int8 [out, in], `X.weight_scale` float32 [out]; weight-only, symmetric.
* awq:  `X.qweight` int32 [in, out/8], `X.qzeros` int32 [in/g, out/8], `X.scales` [in/g, out];
        nibbles packed in AutoAWQ's order (0, 2, 4, 6, 1, 3, 5, 7). Real weight^T = (q - z) * s.
* gptq: `X.qweight` int32 [in/8, out], `X.qzeros` int32 [in/g, out/8], `X.scales` [in/g, out],
        `X.g_idx` int32 [in]; nibbles in order; zeros stored minus one (GPTQ v1 format).
* mxfp4 (gpt-oss experts only): `X.weight` uint8 [out, in/2], two e2m1 values a byte, low nibble
        first; `X.weight_scale` uint8 [out, in/32], one e8m0 exponent (bias 127) per 32 inputs.
        Real weight = e2m1 value * 2^(scale - 127). OpenAI's checkpoints hold the same bytes as
        `*_blocks` [.., in/32, 16] and `*_scales`.

Every method keeps scales per output channel internally (a per-tensor fp8 scale is broadcast when
loaded), so q/k/v and gate/up projections can be merged into one matmul by concatenating along the
output dimension. On CUDA sm89+ fp8 goes through `torch._scaled_mm` (activations quantized per
token); elsewhere weights are dequantized on the fly (correct, not fast).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln_engine.config import QuantConfig

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


# w1/w2/w3: Mixtral experts (Qwen3-MoE experts use the dense names); routers (`gate`) stay unquantized
QUANTIZABLE_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
)


# -- pure converters (used by `kiln-engine build`) ----------------------------------------------------
def is_quantizable(name: str) -> bool:
    """Whether checkpoint tensor `name` is a Linear weight that fp8/int8 quantization converts.

    Embeddings, the LM head, norms and biases stay in the serving dtype.
    """
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZABLE_MODULES


def quantize_state_dict(
    weights: dict[str, torch.Tensor], method: str, per_channel: bool = True
) -> dict[str, torch.Tensor]:
    """Apply fp8 or int8 to every quantizable weight: `X.weight` -> `X.weight` + `X.weight_scale`."""
    if method not in ("fp8", "int8"):
        raise ValueError(f"quantize_state_dict converts fp8 or int8, not {method!r}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if not is_quantizable(name):
            out[name] = tensor
            continue
        q, scale = quantize_fp8(tensor, per_channel) if method == "fp8" else quantize_int8(tensor)
        out[name] = q
        out[name.removesuffix("weight") + "weight_scale"] = scale
    return out


def quantize_fp8(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (float8_e4m3fn weight, float32 scale [out] or scalar [])."""
    w = weight.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w / (scale[:, None] if per_channel else scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.to(torch.float32)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 weight, float32 per-output-channel scale [out]), symmetric."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())
    return (weight.float() * s).to(dtype)


# e2m1: sign, two exponent bits, one mantissa bit; code i is FP4_VALUES[i]
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # values sharing one exponent


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 [..., out, in/2] uint8 values and [..., out, in/32] uint8 exponents -> [..., out, in].

    Exact in bfloat16 and wider: every e2m1 value times a power of two is representable there."""
    groups = scales.shape[-1]
    if packed.shape[:-1] != scales.shape[:-1] or packed.shape[-1] != groups * MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 values {tuple(packed.shape)} do not match exponents {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    codes = packed.to(torch.uint8)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1).flatten(-2)
    values = values.unflatten(-1, (groups, MXFP4_BLOCK))
    exponents = scales.to(torch.int32)[..., None] - 127
    return torch.ldexp(values, exponents).flatten(-2).to(dtype)


def _unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Split each int32 into 8 nibbles (lowest first) along `dim`, which grows 8-fold."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    x = packed.to(torch.int32).unsqueeze(-1) >> shifts  # [..., 8]
    x = (x & 0xF).movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(packed.shape)
    shape[dim] *= 8
    return x.reshape(shape)


@functools.cache
def _awq_order(device: torch.device) -> torch.Tensor:
    """AWQ_REVERSE_ORDER on `device`, made once (a fresh host->device copy per call would sync)."""
    return torch.tensor(AWQ_REVERSE_ORDER, device=device)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AWQ tensors -> dense weight [out, in] in the dtype of `scales`."""
    order = _awq_order(qweight.device)

    def unpack_cols(t: torch.Tensor) -> torch.Tensor:
        u = (
            t.to(torch.int32).unsqueeze(-1) >> torch.arange(0, 32, 4, device=t.device, dtype=torch.int32)
        ) & 0xF
        return u[..., order].reshape(t.shape[0], t.shape[1] * 8)

    q = unpack_cols(qweight)  # [in, out]
    z = unpack_cols(qzeros)  # [in/g, out]
    group = q.shape[0] // z.shape[0]
    z = z.repeat_interleave(group, dim=0)
    s = scales.repeat_interleave(group, dim=0)
    return ((q - z).to(scales.dtype) * s).t().contiguous()


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None
) -> torch.Tensor:
    """GPTQ (v1) tensors -> dense weight [out, in] in the dtype of `scales`."""
    q = _unpack_int4(qweight, 0)  # [in, out]
    z = _unpack_int4(qzeros, 1) + 1  # [in/g, out]
    if g_idx is None or g_idx.numel() == 0:
        group = q.shape[0] // z.shape[0]
        g_idx = torch.arange(q.shape[0], device=q.device) // group
    g = g_idx.long()
    return ((q - z[g]).to(scales.dtype) * scales[g]).t().contiguous()


# -- Linear methods (own the parameters of a Linear and its matmul) -----------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """Where a parameter's output channels lie (for merging q/k/v and TP sharding) and its packing."""

    output_dim: int | None  # None: not split along outputs (e.g. g_idx)
    input_dim: int | None  # None: not split along inputs
    pack_factor: int = 1  # output channels per stored element along output_dim (8 for int4 in int32)
    input_pack_factor: int = 1


class LinearMethod:
    """Creates the parameters of a Linear layer and computes x @ W^T with them."""

    name = "none"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.register_parameter(
            "weight", nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        )

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec(output_dim=0, input_dim=1)}

    def streamed_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight [out, in], per-output-channel scale or None) for `small_m_linear`, or None where
        this method's product must go through `apply` (packed layouts). An unquantized weight
        streams only where `gemv.streams_dense` measured it faster than the library."""
        return (_get(layer, "weight"), None) if type(self) is LinearMethod else None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, _get(layer, "weight"), bias)


def _get(layer: nn.Module, name: str) -> torch.Tensor:
    t = getattr(layer, name)
    assert isinstance(t, torch.Tensor)
    return t


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)


class Fp8LinearMethod(LinearMethod):
    """fp8 e4m3 weights with per-output-channel float32 scales."""

    name = "fp8"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.register_parameter("weight", _param((out_features, in_features), FP8_DTYPE))
        layer.register_parameter("weight_scale", _param((out_features,), torch.float32))

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec(0, 1), "weight_scale": ParamSpec(0, None)}

    def streamed_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return _get(layer, "weight"), _get(layer, "weight_scale")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _supports_fp8_mm(x.device.index):
            return _fp8_scaled_mm(x, _get(layer, "weight"), _get(layer, "weight_scale"), bias)
        return F.linear(x, dequantize_fp8(_get(layer, "weight"), _get(layer, "weight_scale"), x.dtype), bias)


@functools.cache
def _supports_fp8_mm(device_index: int | None) -> bool:
    """fp8 tensor cores: Ada (sm89) and Hopper (sm90) or newer."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return (major, minor) >= (8, 9)


def _fp8_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Per-token activation quantization and a row-wise scaled fp8 GEMM."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    from kiln_engine.layers.fused import quant_fp8_per_token  # one pass, not five (CUDA-only path)

    xq, x_scale = quant_fp8_per_token(x2)
    out = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=x_scale,
        scale_b=weight_scale.reshape(1, -1),
        bias=bias,
        out_dtype=x.dtype,
    )
    return out.reshape(*shape[:-1], weight.shape[0])


# Above this many rows an int8 product casts the weight and calls the GEMM library: the cast costs
# one pass over the weight, small next to a large batch's GEMM, where the library's tuned tiles beat
# the Triton kernel's fixed ones. Below it the cast costs as much as the product. A first guess, to be
# set from `bench/weight_only_gemm.py` on a GPU (not run yet).
INT8_KERNEL_MAX_ROWS = 256


class Int8LinearMethod(LinearMethod):
    """int8 weight-only: (x @ W_int8^T) * scale, as in gpt-fast; on the fast path a Triton GEMM that
    converts the int8 tiles in registers (layers/weight_only_gemm.py), small batches streamed (gemv)."""

    name = "int8"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.register_parameter("weight", _param((out_features, in_features), torch.int8))
        layer.register_parameter("weight_scale", _param((out_features,), torch.float32))

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec(0, 1), "weight_scale": ParamSpec(0, None)}

    def streamed_weight(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return _get(layer, "weight"), _get(layer, "weight_scale")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight, scale = _get(layer, "weight"), _get(layer, "weight_scale")
        if _fast(layer) and x.numel() // x.shape[-1] <= INT8_KERNEL_MAX_ROWS:
            from kiln_engine.layers.weight_only_gemm import int8_linear  # Triton: only on the fast path

            return int8_linear(x, weight, scale, bias)
        out = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
        return out + bias if bias is not None else out


class AwqLinearMethod(LinearMethod):
    """AWQ int4 (GEMM layout): the packed weight goes straight into a Triton GEMM on the fast path
    (layers/weight_only_gemm.py); the reference unpacks a dense weight per call."""

    name = "awq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        g = self.group_size if self.group_size > 0 else in_features
        layer.register_parameter("qweight", _param((in_features, out_features // 8), torch.int32))
        layer.register_parameter("qzeros", _param((in_features // g, out_features // 8), torch.int32))
        layer.register_parameter("scales", _param((in_features // g, out_features), dtype))

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "qweight": ParamSpec(1, 0, pack_factor=8),
            "qzeros": ParamSpec(1, 0, pack_factor=8),
            "scales": ParamSpec(1, 0),
        }

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        qweight, qzeros, scales = _get(layer, "qweight"), _get(layer, "qzeros"), _get(layer, "scales")
        if _fast(layer):
            from kiln_engine.layers.weight_only_gemm import (
                int4_linear,
            )  # Triton: only where the fast path runs

            return int4_linear(x, qweight, qzeros, scales, bias)
        return F.linear(x, unpack_awq(qweight, qzeros, scales).to(x.dtype), bias)


class GptqLinearMethod(LinearMethod):
    """GPTQ int4 (v1 zeros, optional act-order g_idx): packed into a Triton GEMM on the fast path
    (layers/weight_only_gemm.py); the reference unpacks a dense weight per call."""

    name = "gptq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        g = self.group_size if self.group_size > 0 else in_features
        layer.register_parameter("qweight", _param((in_features // 8, out_features), torch.int32))
        layer.register_parameter("qzeros", _param((in_features // g, out_features // 8), torch.int32))
        layer.register_parameter("scales", _param((in_features // g, out_features), dtype))
        g_idx = _param((in_features,), torch.int32)
        g_idx.data.copy_(torch.arange(in_features, dtype=torch.int32) // g)
        layer.register_parameter("g_idx", g_idx)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "qweight": ParamSpec(1, 0, input_pack_factor=8),
            "qzeros": ParamSpec(1, 0, pack_factor=8),
            "scales": ParamSpec(1, 0),
            "g_idx": ParamSpec(None, 0),
        }

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        qweight, qzeros, scales = _get(layer, "qweight"), _get(layer, "qzeros"), _get(layer, "scales")
        g_idx = _get(layer, "g_idx")
        if _fast(layer):
            from kiln_engine.layers.weight_only_gemm import (
                int4_linear,
            )  # Triton: only where the fast path runs

            act_order = g_idx if _act_order(layer, g_idx) else None
            return int4_linear(x, qweight, qzeros, scales, bias, gptq=True, g_idx=act_order)
        return F.linear(x, unpack_gptq(qweight, qzeros, scales, g_idx).to(x.dtype), bias)


def _act_order(layer: nn.Module, g_idx: torch.Tensor) -> bool:
    """Whether a GPTQ layer's input rows are permuted across groups (act-order), decided on its first
    fast-path call and kept: the runner's warm-up makes that call before any CUDA graph capture,
    where reading the answer back from the device could not run."""
    known = layer.__dict__.get("gptq_act_order")
    if known is None:
        rows = g_idx.numel()
        plain = torch.arange(rows, device=g_idx.device) // max(1, rows // int(_get(layer, "qzeros").shape[0]))
        known = layer.__dict__["gptq_act_order"] = bool((g_idx != plain).any())
    return bool(known)


def _fast(layer: nn.Module) -> bool:
    """Whether the model runner turned the layer's Triton fast path on (LinearBase.fused)."""
    return bool(getattr(layer, "fused", False))


def linear_method(quant: QuantConfig) -> LinearMethod:
    """The Linear implementation for a checkpoint's quantization."""
    if quant.method in ("none", "mxfp4"):  # mxfp4: only the experts (`layers.moe`) are quantized
        return LinearMethod()
    if quant.method == "fp8":
        return Fp8LinearMethod()
    if quant.method == "int8":
        return Int8LinearMethod()
    if quant.method == "awq":
        return AwqLinearMethod(quant.group_size)
    if quant.method == "gptq":
        return GptqLinearMethod(quant.group_size)
    raise ValueError(f"unknown quantization method {quant.method!r}")
