"""Kiln's engine runtime: `kiln-engine build` turns a checkpoint into an artifact, `serve` runs it."""

__version__ = "0.1.0"
