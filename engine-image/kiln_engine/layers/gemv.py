"""Small-batch linear layers: a weight-streaming Triton kernel for decode steps of a few rows.

At batch 1 a decode step is a race to read every weight once, and `torch._scaled_mm` at a handful
of rows is far from that (it is built for tiles of 64+ rows, and each call also needs a kernel to
quantize the activations). This kernel reads the weight (fp8 e4m3 with per-output-channel scales,
or bf16/fp16) exactly once, converts it in registers, multiplies by the unquantized activations and
applies the scale to the fp32 sums: a weight-only fp8 GEMV, more accurate than the fp8 x fp8 path.

Two paths: a single-row multiply-accumulate (one reduction at the end), and `tl.dot` on a 16-row
tile, which serves 2..16 rows and competes for one row too. On CUDA the path and tile shape are
autotuned per (N, K, one row or more) on first use, which the model runner's warm-up does before
the decode graphs are captured; elsewhere (CPU tests, under TRITON_INTERPRET=1) a fixed shape runs.
Launched with programmatic dependent launch (layers/pdl.py), each program reads its first weight
tile before waiting for the kernel before it, so the weight stream starts during that kernel's tail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from kiln_engine.layers import pdl
from kiln_engine.layers.pdl import wait_then_release

MAX_ROWS = 16  # above this the GEMM libraries' tiles are full enough to win
# Unquantized weights: "auto" streams one row and times this kernel against cuBLAS once per shape
# for more; "library" and "stream" force one (bench/decode_breakdown.py compares them).
DENSE_POLICY = "auto"
# Under programmatic dependent launch, read each program's first weight tile while the previous
# kernel drains (bench/decode_breakdown.py compares with and without).
PREFETCH_FIRST_TILE = True
_dense_choice: dict[tuple[int, int, int, torch.dtype], bool] = {}


@triton.jit
def _small_m_linear_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # 1 or MAX_ROWS: only the autotuner's key and pruning read it
    stride_xm,
    stride_wn,
    stride_om,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # read the first weight tile before waiting for the previous kernel
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, ROWS)
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if ROWS == 1:  # elementwise products, reduced once after the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_start = 0
    if PREFETCH:
        # The weights are no earlier kernel's output: read the first tile before waiting for it.
        offs_k = tl.arange(0, BLOCK_K)
        w_mask = n_mask[:, None] & (offs_k < K)[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0)
        wait_then_release(USE_PDL)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        acc = _mac(acc, x, w, ROWS)
        k_start = BLOCK_K
    else:
        wait_then_release(USE_PDL)
    for k0 in range(k_start, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_mask = n_mask[:, None] & (offs_k < K)[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        acc = _mac(acc, x, w, ROWS)
    if ROWS == 1:
        acc = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N], the tile path's shape with one row
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _mac(acc, x, w, ROWS: tl.constexpr):  # type: ignore[no-untyped-def]
    """acc plus x [ROWS, BLOCK_K] times the weight tile w [BLOCK_N, BLOCK_K]^T.

    One row multiplies elementwise into acc [BLOCK_N, BLOCK_K] (reduced after the loop, so the
    loop is nothing but loads, converts and FMAs); more rows run `tl.dot` on the tensor cores into
    acc [ROWS, BLOCK_N], the weight converted to the activations' dtype in registers (exact for
    fp8 and int8)."""
    if ROWS == 1:  # noqa: SIM108  (Triton compiles the branch taken only)
        acc = acc + w.to(tl.float32) * x.to(tl.float32)
    else:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    return acc


def _config(rows: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"ROWS": rows, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


_CONFIGS = [
    *(
        _config(1, *c)
        for c in [
            (4, 1024, 4, 3),
            (8, 512, 4, 3),
            (8, 1024, 8, 3),
            (16, 256, 4, 4),
            (16, 512, 8, 3),
            (32, 256, 8, 3),
            (2, 2048, 4, 3),
        ]
    ),
    *(
        _config(MAX_ROWS, *c)
        for c in [
            (16, 256, 4, 4),
            (16, 512, 4, 3),
            (32, 256, 4, 4),
            (32, 512, 8, 3),
            (64, 128, 4, 4),
            (64, 256, 8, 3),
        ]
    ),
]


def _prune(configs: list[triton.Config], named_args: dict[str, object], **_: object) -> list[triton.Config]:
    """The single-row path computes one row only; the tile path serves every row count."""
    many = int(named_args["M"]) > 1  # type: ignore[call-overload]
    return [c for c in configs if not many or c.kwargs["ROWS"] > 1]


_tuned_kernel = triton.autotune(
    configs=_CONFIGS, key=["N", "K", "M_BUCKET"], prune_configs_by={"early_config_prune": _prune}
)(_small_m_linear_kernel)


def small_m_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) times weight [N, K]^T (times scale [N]) plus bias -> [..., N]."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"small_m_linear takes at most {MAX_ROWS} rows, got {m}")
    if weight.stride(-1) != 1:
        raise ValueError("small_m_linear needs a row-major weight")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    launch = pdl.launch_args(x)
    common = {
        "HAS_SCALE": scale is not None,
        "HAS_BIAS": bias is not None,
        # Without PDL there is nothing to overlap, except on CPU, where the tests cover both paths.
        "PREFETCH": PREFETCH_FIRST_TILE and (launch["USE_PDL"] or not x.is_cuda),
        **launch,
    }
    args = (x2, weight, scale if scale is not None else weight, bias if bias is not None else weight, out)
    dims = (m, n, k, 1 if m == 1 else MAX_ROWS, x2.stride(0), weight.stride(0), out.stride(0))
    if x.is_cuda:
        _tuned_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, *dims, **common)
    else:
        rows = 1 if m == 1 else MAX_ROWS
        _small_m_linear_kernel[(triton.cdiv(n, 16),)](
            *args, *dims, **common, ROWS=rows, BLOCK_N=16, BLOCK_K=64
        )
    return out.reshape(*shape[:-1], n)


def streams_dense(rows: int, weight: torch.Tensor) -> bool:
    """Whether `small_m_linear` should compute `rows` rows times this unquantized weight.

    One row always streams: in a decode graph (back-to-back kernels, overlapped by PDL) it beat
    cuBLAS on every Llama-3-8B shape in every H200 run (bench/decode_breakdown.py), while a timing
    of single calls, which sees neither, picked cuBLAS for the small projections in one run. More
    rows are measured: both kernels are timed once per (shape, dtype), outside any CUDA-graph
    capture (the model runner's warm-up comes first); a capture that meets an unmeasured shape
    keeps the library kernel.
    """
    if rows > MAX_ROWS or not weight.is_cuda or DENSE_POLICY == "library":
        return False
    if DENSE_POLICY == "stream" or rows == 1:
        return True
    key = (weight.shape[0], weight.shape[1], MAX_ROWS, weight.dtype)
    choice = _dense_choice.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        x = torch.randn(MAX_ROWS, weight.shape[1], dtype=weight.dtype, device=weight.device)
        small_m_linear(x, weight)  # autotune first, so the timing below is of the chosen tile
        library_ms = do_bench(lambda: F.linear(x, weight))
        stream_ms = do_bench(lambda: small_m_linear(x, weight))
        choice = _dense_choice[key] = stream_ms < library_ms
    return choice
