"""The OpenAI-compatible server: protocol.py (request schemas, errors), app.py (routes, SSE)."""

from qwen2.serve.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
