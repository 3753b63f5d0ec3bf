"""GPU product labels (GPU Feature Discovery's nvidia.com/gpu.product) and their CUDA architectures."""

from __future__ import annotations

import re

# Product label pattern → CUDA architecture, newest first. First match wins; matching ignores case.
GPU_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    (r"GB200|B200|B100", "sm100"),
    (r"H100|H200|H800|H20\b|GH200", "sm90"),
    (r"L40|L4\b|L20|RTX-?\d*-?ADA|RTX-4\d{3}|6000-Ada", "sm89"),
    (r"A10G?\b|A40|A16|A2\b|RTX-A\d+|RTX-3\d{3}", "sm86"),
    (r"A100|A30|A800", "sm80"),
    (r"T4\b|RTX-2\d{3}", "sm75"),
    (r"V100", "sm70"),
)
# e4m3 in hardware (an fp8 KV cache, fp8 tensor cores): Ada (8.9) and newer.
FP8_ARCHITECTURES = ("sm89", "sm90", "sm100")


def gpu_arch(product: str | None) -> str:
    """The CUDA architecture of a GPU product label; `cpu` without a GPU.

    Unknown products map to their own sanitised name, so they still get a distinct, stable key.
    """
    if not product:
        return "cpu"
    for pattern, arch in GPU_ARCHITECTURES:
        if re.search(pattern, product, flags=re.IGNORECASE):
            return arch
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", product.lower()).strip("-")


def products_pattern(fp8: bool) -> str:
    """A regular expression, in the syntax RE2 (CEL's `matches`) and Python share, for the product
    labels of the architectures with (`fp8`) or without e4m3 in hardware. A label is of an
    architecture without it exactly when it matches `products_pattern(False)` and not
    `products_pattern(True)`: the newer patterns come first in `gpu_arch`'s order."""
    return "(?i)" + "|".join(p for p, arch in GPU_ARCHITECTURES if (arch in FP8_ARCHITECTURES) == fp8)
