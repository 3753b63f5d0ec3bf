"""Float type names as config.json's `torch_dtype` and the CLI's `--dtype` spell them, as torch types."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def checkpoint_dtype(torch_dtype: str) -> torch.dtype:
    """The float type a checkpoint's config.json names; bfloat16 where it names none we know."""
    return DTYPES.get(torch_dtype, torch.bfloat16)
