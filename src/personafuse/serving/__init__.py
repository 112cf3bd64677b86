"""Serving PersonaFuse to programs and people: an OpenAI-compatible server with per-request
personas (``server``), its micro-batching queue (``batcher``) and decode loop (``decode``), a chat
page (``static/``), and the vLLM route: a stateless front (``vllm_front``) and the plugin vLLM loads
(``vllm_plugin``). The pairwise human-evaluation app is :mod:`personafuse.evaluation.annotation`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from personafuse.serving.server import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: vLLM imports personafuse.serving.vllm_plugin in its own venv, which has neither peft
    # nor the server's dependencies; importing the package must not pull the server in.
    if name in __all__:
        return getattr(importlib.import_module("personafuse.serving.server"), name)
    raise AttributeError(f"module 'personafuse.serving' has no attribute {name!r}")
