"""Kiln's Kubernetes API (kiln.dev): models, CRD generation and the engine key."""
