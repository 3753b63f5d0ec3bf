"""Kiln: a Kubernetes operator for LLM inference."""

__version__ = "0.1.0"
