"""Kiln's router: an OpenAI-compatible proxy that picks a deployment's replica by prompt-prefix affinity."""

__version__ = "0.1.0"
