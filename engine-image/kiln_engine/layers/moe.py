"""The sparse mixture-of-experts MLP: a top-k router and SwiGLU experts held as stacked tensors.

Experts are stored fused, as the Triton kernel wants them: `w13_weight` [E, 2*I/tp, H] (each
expert's gate rows, then its up rows) and `w2_weight` [E, H, I/tp]. Under tensor parallelism every
rank holds every expert's 1/tp slice of the intermediate dimension (gate/up split by output rows,
down by input columns, as the dense MLP), so the block's partial sums are all-reduced once.
fp8 and int8 experts keep per-output-channel float32 scales (`w13_weight_scale` [E, 2*I/tp],
`w2_weight_scale` [E, H]), the layout of `kiln_engine.quantization` per expert. MXFP4 experts
(gpt-oss) keep two e2m1 values a byte along the input dimension and one exponent per 32 inputs:
`w13_weight` uint8 [E, 2*I/tp, H/2] with `w13_weight_scale` [E, 2*I/tp, H/32], `w2_weight` [E, H,
I/tp/2] with `w2_weight_scale` [E, H, I/tp/32] (so down's exponents split with its inputs).
With expert parallelism (`MoeConfig.expert_parallel`) a rank holds E/tp experts whole instead of a
slice of every one, and leaves the pairs routed elsewhere out: the same all-reduce sums the parts.

The torch path (CPU, tests, the reference) loops over the experts that received tokens, in the
order transformers does; on GPU with `fused` set, `layers.fused_moe` runs one grouped GEMM per
projection over the tokens sorted by expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln_engine.config import ModelConfig, MoeConfig
from kiln_engine.layers.linear import load_slice
from kiln_engine.layers.parallel import TPGroup, divide
from kiln_engine.quantization import FP8_DTYPE, MXFP4_BLOCK, dequantize_mxfp4


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k]).

    Softmax in float32 over all experts, then the top k; with `renormalize` the k weights are
    divided by their sum (Mixtral; Qwen3-MoE when norm_topk_prob), as transformers does.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[n, 2I] (gate, then up) -> silu(gate) * up [n, I]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def clamped_swiglu(h: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's expert activation, as transformers computes it, on [n, 2I] (gate, then up)."""
    gate, up = h.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@dataclass(frozen=True)
class ClampedSwiGLU:
    """`clamped_swiglu` with its parameters; the fused path runs it as one kernel
    (`layers.fused.clamped_swiglu_and_mul`), not as these torch ops."""

    limit: float
    alpha: float

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(h, self.limit, self.alpha)


def expert_activation(moe: MoeConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The experts' activation when it is not plain SwiGLU (which the fused path has a kernel for)."""
    if moe.swiglu_limit is None:
        return None
    return ClampedSwiGLU(moe.swiglu_limit, moe.swiglu_alpha)


def experts_reference(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) with gated experts, one expert at a time;
    pairs with id -1 are left out (the down projection's bias, added once after any all-reduce, is
    `FusedMoE.down_bias`'s). `fp8_activations`: each GEMM's input rows rounded through fp8 per row
    first, the function of the fused path's fp8-by-fp8 GEMMs."""
    rows = fp8_rounded_rows if fp8_activations else _identity
    out = torch.zeros_like(x)
    flat = ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        if e < 0:  # another rank's expert (expert parallel)
            continue
        token, slot = torch.where(ids == e)
        up_w, down_w = expert_weight(w13, w13_scale, e, x.dtype), expert_weight(w2, w2_scale, e, x.dtype)
        h = (activation or swiglu)(F.linear(rows(x[token]), up_w, None if w13_bias is None else w13_bias[e]))
        y = F.linear(rows(h), down_w) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def fp8_rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` [M, K] quantized to fp8 e4m3 per row and back (`layers.fused.quant_fp8_per_token`'s rule:
    scale = max(|row|) / 448, at least 1e-12)."""
    scale = (x.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def expert_weight(w: torch.Tensor, scale: torch.Tensor | None, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert `e`'s [out, in] weight in `dtype`: as stored, or dequantized (per channel, or MXFP4)."""
    if scale is None:
        return w[e]
    if w.dtype == torch.uint8:
        return dequantize_mxfp4(w[e], scale[e], dtype)
    return (w[e].float() * scale[e, :, None]).to(dtype)


class FusedMoE(nn.Module):
    """All experts of one layer; `load(param, tensor, (expert, part))` takes one checkpoint tensor."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.tp = tp
        h = cfg.hidden_size
        # expert parallel: this rank holds experts first_expert .. first_expert + num_local - 1, whole
        self.expert_parallel = cfg.moe.expert_parallel and tp.size > 1
        if self.expert_parallel:
            self.num_local = divide(cfg.moe.num_experts, tp.size)
            self.first_expert = tp.rank * self.num_local
            self.inter = cfg.moe.intermediate_size
        else:
            self.num_local, self.first_expert = cfg.moe.num_experts, 0
            self.inter = divide(cfg.moe.intermediate_size, tp.size)
        e = self.num_local
        quant = cfg.quant.method
        if quant not in ("none", "fp8", "int8", "mxfp4"):
            raise ValueError(f"{quant} experts are not supported")
        self.quantized = quant != "none"
        self.mxfp4 = quant == "mxfp4"
        wdtype = {"none": dtype, "fp8": FP8_DTYPE, "int8": torch.int8, "mxfp4": torch.uint8}[quant]

        def param(*shape: int, dt: torch.dtype = wdtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dt), requires_grad=False)

        if self.mxfp4:
            for what, inputs in (("hidden size", h), ("experts' intermediate size per rank", self.inter)):
                if inputs % MXFP4_BLOCK:
                    raise ValueError(f"MXFP4 experts need a {what} divisible by {MXFP4_BLOCK}, not {inputs}")
            self.w13_weight = param(e, 2 * self.inter, h // 2)
            self.w2_weight = param(e, h, self.inter // 2)
            self.w13_weight_scale = param(e, 2 * self.inter, h // MXFP4_BLOCK)
            self.w2_weight_scale = param(e, h, self.inter // MXFP4_BLOCK)
        else:
            self.w13_weight = param(e, 2 * self.inter, h)
            self.w2_weight = param(e, h, self.inter)
        if self.quantized and not self.mxfp4:
            self.w13_weight_scale = param(e, 2 * self.inter, dt=torch.float32)
            self.w2_weight_scale = param(e, h, dt=torch.float32)
        self.biased = cfg.moe.biased
        if self.biased:  # down's bias is added after the all-reduce, for every expert: all of them
            self.w13_bias = param(e, 2 * self.inter, dt=dtype)
            self.w2_bias = param(cfg.moe.num_experts, h, dt=dtype)
        self.activation = expert_activation(cfg.moe)
        self.fused = False  # set by the model runner: the Triton grouped GEMMs
        self.loaded: set[tuple[str, int, int]] = set()

    def load(self, name: str, tensor: torch.Tensor, shard: str | int | tuple[int, int] | None) -> None:
        """One expert's gate (part 0), up (1) or down (2) weight or scale, whole or this rank's slice."""
        assert isinstance(shard, tuple), shard
        expert, part = shard
        param: torch.Tensor = getattr(self, name)
        local = expert if name == "w2_bias" else expert - self.first_expert
        if not 0 <= local < param.shape[0]:
            return  # another rank's expert (expert parallel)
        dst = param.data[local]
        if name.startswith("w13"):
            dst = dst.narrow(0, part * self.inter, self.inter)
            dim: int | None = 0
        else:  # down's scale (but MXFP4's, per input group too) and bias are per output channel: whole
            dim = 1 if name == "w2_weight" or (name == "w2_weight_scale" and self.mxfp4) else None
        index, count = (0, 1) if self.expert_parallel else (self.tp.rank, self.tp.size)
        load_slice(dst, tensor, dim, index, count, f"experts.{expert}.{name}[{part}]")
        self.loaded.add((name, expert, part))

    def missing(self) -> list[str]:
        """Expert tensors no checkpoint tensor was loaded into (checked after loading)."""
        local = range(self.first_expert, self.first_expert + self.num_local)
        need = [(n, e, p) for e in local for n, p in (("w13_weight", 0), ("w13_weight", 1), ("w2_weight", 2))]
        if self.quantized:
            need += [(n.replace("weight", "weight_scale"), e, p) for n, e, p in need]
        if self.biased:
            need += [("w13_bias", e, p) for e in local for p in (0, 1)]
            need += [("w2_bias", e, 2) for e in range(self.w2_bias.shape[0])]
        return [f"experts.{e}.{n}[{p}]" for n, e, p in need if (n, e, p) not in self.loaded]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's part of the experts' output: its slice of every expert, or (expert parallel)
        its own experts whole, the others' pairs left out (id -1); the all-reduce sums the parts."""
        if self.expert_parallel:
            ids = ids - self.first_expert
            ids = torch.where((ids >= 0) & (ids < self.num_local), ids, -1)
        s13 = self.w13_weight_scale if self.quantized else None
        s2 = self.w2_weight_scale if self.quantized else None
        b13 = self.w13_bias if self.biased else None
        if self.fused:
            from kiln_engine.layers.fused_moe import fused_experts  # Triton: only where it runs

            return fused_experts(
                x, weights, ids, self.w13_weight, self.w2_weight, s13, s2, b13, self.activation,
                foreign_pairs=self.expert_parallel,
            )  # fmt: skip
        return experts_reference(
            x, weights, ids, self.w13_weight, self.w2_weight, s13, s2, b13, self.activation
        )

    def down_bias(self, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """sum_k weights[t, k] * down bias of expert ids[t, k], [T, H]; None without biases."""
        if not self.biased:
            return None
        return (self.w2_bias[ids] * weights[..., None]).sum(dim=1)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) + experts; one all-reduce of the experts' output."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.top_k, self.renormalize = cfg.moe.top_k, cfg.moe.renormalize
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=cfg.moe.biased, dtype=dtype)
        self.gate.requires_grad_(False)
        self.experts = FusedMoE(cfg, dtype, tp)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.tp.all_reduce(self.experts(x, weights, ids))
        bias = self.experts.down_bias(weights, ids)
        return out if bias is None else out + bias
