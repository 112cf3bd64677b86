"""Serving PersonaFuse to programs and people: an OpenAI-compatible server with per-request
personas (``server``), its micro-batching queue (``batcher``) and decode loop (``decode``), a chat
page (``static/``) and a pairwise human-evaluation app (``annotation``)."""

from personafuse.serving.server import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
