"""Runtimes behind the same CLI: `torch` (Kiln's own serving core) and `tensorrt-llm` (NVIDIA's)."""

BACKENDS = ("torch", "tensorrt-llm")
