"""The OpenAI-compatible HTTP server (FastAPI).

``create_app(model, ServeConfig(...))`` serves:

* ``POST /v1/chat/completions`` – streaming (SSE) and not; the request may carry a ``persona``
  object choosing the routing; every response carries ``persona: {"weights": {...}, "mode": ...}``;
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text);
* ``GET /`` – the chat page (``static/``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from personafuse.chat import prompt_ids
from personafuse.moe.routing import Routing
from personafuse.serving.batcher import Batcher, Job, QueueFull, Unavailable
from personafuse.serving.decode import RowSpec
from personafuse.serving.metrics import Metrics
from personafuse.serving.schemas import BadRequest, ChatCompletionRequest, parse_request
from personafuse.traits import TraitError

STATIC = Path(__file__).parent / "static"
CHAT = "/v1/chat/completions"
log = logging.getLogger("personafuse.serving")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 504: "timeout_error"}  # fmt: skip


@dataclass
class ServeConfig:
    model_name: str = "personafuse"
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    batch_wait_ms: float = 10.0
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    default_max_tokens: int = 256
    default_temperature: float = 0.7

    def __post_init__(self) -> None:
        # An empty key used to switch authentication off without a word (e.g. PERSONAFUSE_API_KEY=""
        # from an unset shell variable): refuse it; leave the key out to run without one.
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or leave it out (None) to serve without authentication")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ERROR_TYPES.get(status, "server_error")

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def parse_persona(persona: dict[str, Any] | None, request_seed: int | None) -> tuple[Routing, dict[str, Any]]:
    """The request's ``persona`` object → a Routing and the description echoed in responses.

    A missing ``mode`` is inferred: ``weights`` alone means fixed, ``pole`` alone means pole.
    A random route without its own seed uses the request's ``seed`` (fresh draw if neither).
    """
    data = dict(persona or {})
    if "mode" not in data:
        data["mode"] = "fixed" if "weights" in data else "pole" if "pole" in data else "router"
    if data["mode"] == "random" and "seed" not in data:
        data["seed"] = request_seed
    try:
        routing = Routing.from_dict(data)
    except TraitError as e:
        msg = str(e)
        raise APIError(400, msg if msg.startswith("persona") else f"persona: {msg}", "persona") from None
    except TypeError as e:
        raise APIError(400, f"persona: {e}", "persona") from None
    # the weights are echoed as the mixture used, the seed not at all
    desc = {k: v for k, v in routing.to_dict().items() if k not in ("weights", "seed")}
    return routing, desc


def endpoint_of(path: str) -> str:
    """The ``endpoint`` label of a request in ``personafuse_requests_total``."""
    return {CHAT: "chat_completions", "/v1/models": "models"}.get(path, "other")


class ChatService:
    """What the chat endpoint does, request by request: read and check the request, queue it,
    and answer in full or as a stream. One per app; ``create_app`` wires it to the routes."""

    def __init__(self, model: Any, cfg: ServeConfig, metrics: Metrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        # The request handlers count prompt tokens with their own tokenizer copy: a fast tokenizer
        # shared with the worker thread can fail with "Already borrowed" when both use it at once.
        self.count_tok = copy.deepcopy(model.tokenizer)
        self.context = int(getattr(getattr(model.base_model, "config", None), "max_position_embeddings", 0) or 0)
        self.batcher: Batcher | None = None

    def check_key(self, request: Request) -> None:
        if not self.cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
        if not secrets.compare_digest(given.encode(), self.cfg.api_key.encode()):
            raise APIError(401, "invalid API key")

    @staticmethod
    async def read_request(request: Request) -> ChatCompletionRequest:
        # JSON only: a browser can send text/plain or a form to any site without asking first
        # (no CORS preflight), so the API refuses every other content type.
        ctype = request.headers.get("content-type", "")
        mime = ctype.split(";")[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {ctype[:80]!r}", "Content-Type")
        try:
            return parse_request(await request.body())
        except BadRequest as e:
            raise APIError(400, e.message, e.param) from None

    def build_job(self, req: ChatCompletionRequest) -> tuple[Job, dict[str, Any]]:
        cfg = self.cfg
        routing, desc = parse_persona(req.persona, req.seed)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens_limit)
        if max_tokens > cfg.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param} is {max_tokens}; this server allows at most {cfg.max_tokens_limit}", param)
        try:
            messages = req.conversation()
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages: at least one message must have role 'user'", "messages")
        n_prompt = len(prompt_ids(self.count_tok, messages))  # the text model.chat_inputs sends
        if n_prompt > cfg.max_prompt_tokens:
            raise APIError(
                400, f"messages: the prompt is {n_prompt} tokens; this server allows at most {cfg.max_prompt_tokens}", "messages"
            )
        if self.context and n_prompt + max_tokens > self.context:
            raise APIError(
                400,
                f"max_tokens: prompt ({n_prompt}) + max_tokens ({max_tokens}) exceeds the model's context of {self.context} tokens",
                "max_tokens",
            )
        temperature = cfg.default_temperature if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p  # 0 is a value (keep the top token only)
        spec = RowSpec(max_tokens, temperature, top_p, req.seed, req.stop_list())
        return Job(messages, routing, spec, asyncio.get_running_loop()), desc

    def submit(self, job: Job) -> None:
        try:
            self.batcher.submit(job)  # type: ignore[union-attr]
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry shortly") from None
        except Unavailable as e:
            raise APIError(503, f"unavailable: {e}") from None

    async def handle(self, request: Request) -> Response:
        self.check_key(request)
        req = await self.read_request(request)
        job, desc = self.build_job(req)
        self.submit(job)
        try:
            kind, first = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if kind == "error":
            raise APIError(500, first)
        reply = _Reply(self, job, {"weights": first["weights"], **desc}, first["prompt_tokens"])
        if not req.stream:
            return await reply.complete()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(reply.stream(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Reply:
    """One accepted request's answer: the events of its job as one JSON body or an SSE stream."""

    def __init__(self, service: ChatService, job: Job, persona: dict[str, Any], prompt_tokens: int) -> None:
        self.service, self.job, self.persona, self.prompt_tokens = service, job, persona, prompt_tokens
        self.cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_name = service.cfg.model_name

    def usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def finish(self, completion_tokens: int, first_at: float | None) -> None:
        metrics, job = self.service.metrics, self.job
        metrics.tokens(self.prompt_tokens, completion_tokens)
        metrics.observe_latency(time.monotonic() - job.arrived)
        if first_at is not None:
            metrics.observe_first_token(first_at - job.arrived)
        metrics.request("chat_completions", 200)

    async def complete(self) -> JSONResponse:
        parts: list[str] = []
        first_at = None
        try:
            while True:
                kind, payload = await self.job.events.get()
                if kind == "delta":
                    first_at = first_at or time.monotonic()
                    parts.append(payload)
                elif kind == "error":
                    raise APIError(500, payload)
                elif kind == "end":
                    break
        except asyncio.CancelledError:
            self.job.cancelled = True  # client went away: free its row in the batch
            raise
        self.finish(payload["completion_tokens"], first_at)
        message = {"role": "assistant", "content": "".join(parts)}
        return JSONResponse(
            {
                "id": self.cid,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": payload["finish_reason"], "logprobs": None}],
                "usage": self.usage(payload["completion_tokens"]),
                "persona": self.persona,
            }
        )

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> str:
        obj = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name}
        obj["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        return f"data: {json.dumps({**obj, **extra})}\n\n"

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        done = False
        first_at = None
        try:
            # The weights are known before the first token: send them at once (the chat page
            # draws the trait display while the reply streams) and again with the last chunk.
            yield self.chunk({"role": "assistant", "content": ""}, persona=self.persona)
            while True:
                kind, payload = await self.job.events.get()
                if kind == "delta":
                    first_at = first_at or time.monotonic()
                    yield self.chunk({"content": payload})
                elif kind == "error":
                    err = {"message": payload, "type": "server_error", "param": None, "code": 500}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    self.service.metrics.request("chat_completions", 500)
                    break
                elif kind == "end":
                    yield self.chunk({}, payload["finish_reason"], persona=self.persona)
                    if include_usage:
                        yield self.chunk(None, usage=self.usage(payload["completion_tokens"]))
                    self.finish(payload["completion_tokens"], first_at)
                    break
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                self.job.cancelled = True


def create_app(model: Any, config: ServeConfig | None = None) -> FastAPI:
    cfg = config or ServeConfig()
    metrics = Metrics()
    service = ChatService(model, cfg, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher = Batcher(
            model, max_batch=cfg.max_batch, max_queue=cfg.max_queue, batch_wait_s=cfg.batch_wait_ms / 1000, metrics=metrics
        )
        yield
        await asyncio.to_thread(service.batcher.close)

    app = FastAPI(title="PersonaFuse", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.config = cfg
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.request(endpoint_of(request.url.path), exc.status)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and wrong methods answer in the same error shape as everything else.
        return await _api_error(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Anything unforeseen: a 500 in the API's shape; the exception itself stays in the log.
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return await _api_error(request, APIError(500, "internal server error (the details are in the server log)"))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "chat.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        b = service.batcher
        ok = b is not None and b.healthy
        body = {"status": "ok" if ok else "unavailable", "model": cfg.model_name,
                "queue_depth": b.queue_depth if b else 0, "running": b.running if b else 0}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "personafuse"}]}

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await service.handle(request)

    return app
