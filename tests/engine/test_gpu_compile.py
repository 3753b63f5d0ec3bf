"""Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The kernel tests run under Triton's interpreter, which executes a kernel's Python but never lowers
it, so a kernel the GPU compiler refuses passes them and fails first on a GPU (an early `return`
under a constexpr branch did: the interpreter ran it, the code generator rejected its two return
types). Triton compiles for a named target without a device, through its own bundled ptxas; these
tests do that for the kernels' GPU variants (bf16 activations, the weight formats they read).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytestmark = pytest.mark.engine
triton = pytest.importorskip("triton")
pytest.importorskip("torch")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(kernel: Any, types: dict[str, str], constexprs: dict[str, Any]) -> set[str]:
    """The stages Triton produced compiling `kernel` for sm_90; parameters not in `types` or
    `constexprs` are 32-bit integers."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()}
    )
    return set(triton.compile(src, target=H100).asm)


MOE_POINTERS = {"c_ptr": "*bf16", "weight_ptr": "*fp32", "sorted_ptr": "*i32", "block_expert_ptr": "*i32"}
MOE_VARIANTS = {
    "mxfp4": {"a_ptr": "*bf16", "b_ptr": "*u8", "scale_ptr": "*u8"},  # tl.dot_scaled
    "mxfp4-fp16": {"a_ptr": "*fp16", "b_ptr": "*u8", "scale_ptr": "*u8"},  # decoded in the kernel
    "fp8": {"a_ptr": "*bf16", "b_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
    "fp8a8": {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "a_scale_ptr": "*fp32"},
    "bf16": {"a_ptr": "*bf16", "b_ptr": "*bf16", "scale_ptr": "*fp32"},
    "bf16-bias": {"a_ptr": "*bf16", "b_ptr": "*bf16", "scale_ptr": "*fp32", "bias_ptr": "*bf16"},  # gpt-oss
}


@pytest.mark.parametrize("weights", list(MOE_VARIANTS))
def test_the_expert_gemm_compiles_for_each_weight_format(weights: str) -> None:
    from kiln_engine.layers.fused_moe import _moe_gemm_kernel

    constexprs = {
        "TOKEN_DIV": 2,
        "MUL_WEIGHT": True,
        "HAS_SCALE": not weights.startswith("bf16"),
        "A_SCALED": weights == "fp8a8",
        "HAS_BIAS": weights == "bf16-bias",
        "MXFP4": weights.startswith("mxfp4"),
        "SCALED_DOT": weights == "mxfp4",
        "BLOCK_M": 16,
        "BLOCK_N": 64,
        "BLOCK_K": 128,
    }
    unused = {"a_scale_ptr": "*fp32", "bias_ptr": "*bf16"}  # pointers a variant passes but never reads
    types = {**MOE_POINTERS, **unused, **MOE_VARIANTS[weights], "total_ptr": "*i32"}
    assert "cubin" in compile_for_h100(_moe_gemm_kernel, types, constexprs)


def test_the_lora_kernels_compile() -> None:
    from kiln_engine.layers.lora_kernels import _expand_kernel, _shrink_kernel

    slots = {"slot_ptr": "*i32"}
    shrink = {"x_ptr": "*bf16", "a_ptr": "*bf16", "h_ptr": "*fp32", **slots}
    assert "cubin" in compile_for_h100(_shrink_kernel, shrink, {"BLOCK_K": 64, "BLOCK_IN": 128})
    expand = {"h_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16", **slots}
    assert "cubin" in compile_for_h100(_expand_kernel, expand, {"BLOCK_K": 64, "BLOCK_N": 128})


def test_the_clamped_swiglu_kernel_compiles() -> None:
    from kiln_engine.layers.fused import _clamped_swiglu_kernel

    types = {"x_ptr": "*bf16", "out_ptr": "*bf16", "limit": "fp32", "alpha": "fp32"}
    assert "cubin" in compile_for_h100(_clamped_swiglu_kernel, types, {"BLOCK": 1024})
