"""Test and demo helpers: tiny random checkpoints with a real tokenizer (`make_tiny_checkpoint`)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "make_tiny_artifact",
    "make_tiny_checkpoint",
    "make_tiny_eagle3_head",
    "make_tiny_eagle_head",
    "make_tiny_mxfp4_checkpoint",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m kiln_engine.testing.tiny` does not import the module twice.
    if name in __all__:
        from kiln_engine.testing import tiny

        return getattr(tiny, name)
    raise AttributeError(name)
