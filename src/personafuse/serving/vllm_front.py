"""``personafuse serve --engine vllm``: the same OpenAI-compatible API in front of vLLM replicas.

The front is stateless: per request it checks the body exactly as ``personafuse serve`` does
(:class:`~personafuse.serving.server.ChatService`: limits, ``persona``, prompt length), resolves the
ten weights (the router, or the request's own routing), renders the prompt with the model's chat
template (``personafuse.chat.prompt_ids``: the token ids ``personafuse chat`` feeds the model) and
sends them to vLLM's ``/v1/completions`` for the stack adapter (``personafuse export --stack``)
with ``vllm_xargs: {"personafuse_weights": [...]}``; the personafuse plugin inside vLLM
(``vllm_plugin``) applies the mixture. vLLM's stream comes back as chat-completion chunks with the
``persona`` field. Any number of fronts can share any number of vLLM replicas behind a load
balancer: nothing is kept between requests.

Only the service's ``submit`` differs from the one-process server: a job's events (start, text
deltas, end) come from vLLM's stream instead of the local batcher, so the reply, streaming,
deadlines, client disconnects and draining are the server's own code.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from personafuse.chat import eos_token_ids, prompt_ids
from personafuse.serving.batcher import Job
from personafuse.serving.metrics import Metrics
from personafuse.serving.server import APIError, ChatService, ServeConfig, api_app
from personafuse.serving.vllm_plugin import WEIGHTS_KEY
from personafuse.traits import TRAIT_POLES

log = logging.getLogger("personafuse.serving.vllm")


class VLLMService(ChatService):
    """ChatService whose jobs run on a vLLM server (``vllm_url``) instead of the local batcher."""

    def __init__(self, model: Any, cfg: ServeConfig, metrics: Metrics, vllm_url: str, adapter: str) -> None:
        super().__init__(model, cfg, metrics)
        self.model, self.vllm_url, self.adapter = model, vllm_url.rstrip("/"), adapter
        self.eos = eos_token_ids(model.tokenizer, model.base_model)
        # the router runs here, one forward at a time, off the event loop
        self.route_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personafuse-route")
        self.client: httpx.AsyncClient | None = None
        self.tasks: dict[int, asyncio.Task] = {}

    def _discard(self, job: Job) -> None:
        job.cancelled = True
        task = self.tasks.pop(id(job), None)
        if task is not None:
            task.cancel()  # closes the stream to vLLM, which aborts the request there

    def submit(self, job: Job) -> None:
        if self.flight.draining:
            raise APIError(503, "unavailable: the server is shutting down")
        task = asyncio.get_running_loop().create_task(self._run(job))
        self.tasks[id(job)] = task
        task.add_done_callback(lambda _t: self.tasks.pop(id(job), None))

    def prepare(self, job: Job) -> tuple[list[float], list[int]]:
        """The job's ten weights and prompt ids (on the route thread: the router is a model forward)."""
        w = self.model.resolve_each([job.messages], [job.routing])[0].tolist()
        return w, prompt_ids(self.count_tok, job.messages)

    def body(self, job: Job, weights: list[float], ids: list[int]) -> dict[str, Any]:
        spec = job.spec
        out: dict[str, Any] = {
            "model": self.adapter, "prompt": ids, "max_tokens": spec.max_new_tokens, "temperature": spec.temperature,
            "top_p": spec.top_p, "stop_token_ids": self.eos, "skip_special_tokens": True, "stream": True,
            "stream_options": {"include_usage": True}, "vllm_xargs": {WEIGHTS_KEY: weights},
        }  # fmt: skip
        if spec.seed is not None:
            out["seed"] = spec.seed
        if spec.stop:
            out["stop"] = spec.stop
        return out

    async def _run(self, job: Job) -> None:
        try:
            loop = asyncio.get_running_loop()
            weights, ids = await loop.run_in_executor(self.route_pool, self.prepare, job)
            job.events.put_nowait(("start", {"weights": dict(zip(TRAIT_POLES, weights, strict=True)), "prompt_tokens": len(ids)}))
            await self._relay(job, self.body(job, weights, ids))
        except asyncio.CancelledError:
            raise
        except httpx.HTTPError as e:
            log.error("vLLM at %s: %s", self.vllm_url, e)
            job.events.put_nowait(("error", f"the vLLM server at {self.vllm_url} failed: {type(e).__name__}: {e}"))
        except Exception as e:  # noqa: BLE001 - the request fails, the front goes on
            log.error("request failed", exc_info=e)
            job.events.put_nowait(("error", f"generation failed: {e}"))

    async def _relay(self, job: Job, body: dict[str, Any]) -> None:
        """vLLM's SSE stream as the job's events."""
        assert self.client is not None
        finish, completion = "stop", 0
        async with self.client.stream("POST", f"{self.vllm_url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"vLLM answered {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}")
            async for data in _sse(resp):
                if data.get("usage"):
                    completion = int(data["usage"].get("completion_tokens") or 0)
                for choice in data.get("choices") or []:
                    if choice.get("text"):
                        job.events.put_nowait(("delta", choice["text"]))
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
                if "error" in data:
                    raise RuntimeError(f"vLLM: {data['error'].get('message', data['error'])}")
        if not job.cancelled:
            job.events.put_nowait(("end", {"finish_reason": finish, "completion_tokens": completion}))

    async def vllm_healthy(self) -> bool:
        if self.client is None:
            return False
        try:
            return (await self.client.get(f"{self.vllm_url}/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False


async def _sse(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def create_front_app(model: Any, vllm_url: str, config: ServeConfig | None = None, adapter: str = "personafuse") -> FastAPI:
    """The API of :func:`personafuse.serving.server.create_app`, generated by vLLM at ``vllm_url``."""
    cfg = config or ServeConfig()
    metrics = Metrics()
    service = VLLMService(model, cfg, metrics, vllm_url, adapter)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(cfg.request_timeout_s or None, connect=10.0)
        service.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=cfg.max_queue))
        yield
        for task in list(service.tasks.values()):
            task.cancel()
        await service.client.aclose()
        service.route_pool.shutdown(wait=False)
        service.tokenize_pool.shutdown(wait=False)

    async def health() -> tuple[bool, dict[str, Any]]:
        ok = not service.flight.draining and await service.vllm_healthy()
        return ok, {"status": "ok" if ok else "unavailable", "model": cfg.model_name, "engine": "vllm",
                    "vllm_url": service.vllm_url, "running": len(service.tasks)}  # fmt: skip

    return api_app("PersonaFuse (vLLM)", lifespan, service, health)

