"""Programmatic dependent launch (Hopper+): each Triton kernel of a step starts while the one before drains.

A decode step at small batch is a chain of a few hundred short kernels, and each one's launch
latency and ramp-up otherwise idles the memory system between two weight streams. Launched with
PDL, a kernel may start as soon as every program of the kernel before it has started; it reads
what does not depend on that kernel (its first weight tile) right away, and waits (`gdc_wait`)
before reading anything an earlier kernel wrote. Every Triton kernel on the step's path calls
`wait_then_release` before its first such read, so the chain stays ordered whatever launches early.

`ENABLED = False` (or KILN_PDL=0 in the environment) launches them plainly; bench/decode_breakdown.py
compares the two.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("KILN_PDL", "1") != "0"


def launch_args(t: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments for launching a `USE_PDL` kernel whose tensors live where `t` does."""
    if ENABLED and t.is_cuda and _supported(t.device.index):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@functools.cache
def _supported(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """Wait for the kernels before this one, then let the next one launch once all our programs run."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
