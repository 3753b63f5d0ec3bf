"""The OpenAI-compatible HTTP server around a serving core: app, protocol, streaming, metrics, drain."""
