"""An OpenAI-compatible endpoint (vLLM's server, llama.cpp, Ollama, TGI, hosted APIs, ``personafuse
serve``) for teachers, subjects and judges alike, every request under the retry and deadline policy
of :mod:`personafuse.endpoint`: one deadline per attempt, 429s on their own wait budget, 5xx /
timeouts / bodies that are not a completion retried with jittered backoff, 401/403/404 fatal.

Extra request fields go in ``extra_body`` and are sent as they are: a vLLM server's ``vllm_xargs``
(``{"personafuse_weights": [...]}`` for the personafuse plugin), our server's ``persona``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from personafuse.backends.base import OPENAI, Messages
from personafuse.endpoint import (
    Clock,
    EndpointClient,
    EndpointStats,
    RetryPolicy,
    chat_reply,
    completion_reply,
)


def resolve_api_key(api_key: str | None, base_url: str | None) -> str | None:
    """The key to send: the given one, else ``OPENAI_API_KEY``, else a placeholder when a base URL
    (given or ``OPENAI_BASE_URL``) points at a local server that needs none; ``None`` otherwise."""
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    return "EMPTY" if (base_url or os.environ.get("OPENAI_BASE_URL")) else None


@dataclass
class Reply:
    """One accepted completion: its text, finish reason and the whole response body (usage,
    routing weights our server reports beside the message)."""

    text: str
    finish_reason: str
    data: dict[str, Any]
    seconds: float

    @property
    def usage(self) -> dict[str, Any]:
        u = self.data.get("usage")
        return u if isinstance(u, dict) else {}


class OpenAIBackend:
    """Chat and raw completions against one endpoint, at most ``max_in_flight`` requests in flight.
    A request that fails for good raises :class:`personafuse.endpoint.EndpointFailure` (``cause``:
    an endpoint_* reason); an endpoint that cannot serve at all :class:`~personafuse.endpoint.EndpointFatal`."""

    capabilities = OPENAI

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None, max_in_flight: int = 32,
                 timeout: float = 300.0, max_retries: int = 5, backoff: float = 1.0, backoff_max: float = 30.0,
                 max_rate_limit_wait: float = 600.0, extra_body: dict[str, Any] | None = None,
                 clock: Clock | None = None, name: str | None = None):
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        policy = RetryPolicy(max_retries=max_retries, backoff=backoff, backoff_max=backoff_max,
                             max_rate_limit_wait=max_rate_limit_wait, timeout=timeout)
        self.endpoint = EndpointClient(self.base_url, api_key, policy=policy, clock=clock,
                                       max_in_flight=max_in_flight, name=name or model)
        self.extra_body = extra_body

    @property
    def stats(self) -> EndpointStats:
        return self.endpoint.stats

    def _body(self, key: str, value: Any, max_tokens: int, temperature: float, top_p: float | None,
              seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, key: value, "max_tokens": max_tokens, "temperature": temperature}
        if top_p is not None:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        return {**body, **(self.extra_body or {})}

    async def chat(self, messages: Messages, *, max_tokens: int, temperature: float, top_p: float | None = None,
                   seed: int | None = None, require_content: bool = True) -> Reply:
        """``POST /chat/completions``; ``require_content``: an empty or null reply is an endpoint
        fault and retried (a teacher's view), else a valid if poor answer (a subject's)."""
        body = self._body("messages", messages, max_tokens, temperature, top_p, seed)
        return await self._post("/chat/completions", body, chat_reply, require_content)

    async def complete(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float | None = None,
                       seed: int | None = None, require_content: bool = True) -> Reply:
        """``POST /completions`` with a raw prompt (no chat template)."""
        body = self._body("prompt", prompt, max_tokens, temperature, top_p, seed)
        return await self._post("/completions", body, completion_reply, require_content)

    async def _post(self, path: str, body: dict[str, Any], reply: Any, require_content: bool) -> Reply:
        def check(data: Any) -> tuple[str, str, dict[str, Any]]:
            text, finish, _ = reply(data, require_content=require_content)
            return text, finish, data

        t0 = time.perf_counter()
        text, finish, data = await self.endpoint.post(path, body, check)
        return Reply(text, finish, data, time.perf_counter() - t0)

    async def aclose(self) -> None:
        """Close the connections (they belong to the event loop that opened them)."""
        await self.endpoint.aclose()
