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
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from personafuse.chat import prompt_ids
from personafuse.moe.routing import Routing
from personafuse.serving.batcher import Batcher, Job, QueueFull, Unavailable
from personafuse.serving.config import ServeConfig
from personafuse.serving.decode import RowSpec
from personafuse.serving.lifecycle import GONE, SHUTDOWN, TIMEOUT, Guard, InFlight
from personafuse.serving.metrics import Metrics
from personafuse.serving.schemas import BadRequest, ChatCompletionRequest, parse_request
from personafuse.traits import TraitError

STATIC = Path(__file__).parent / "static"
CHAT = "/v1/chat/completions"
log = logging.getLogger("personafuse.serving")
# nginx's status for "client closed the request": how /metrics counts a request whose client left.
CLIENT_GONE = 499
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 504: "timeout_error"}  # fmt: skip


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
        # One thread runs it, off the event loop, so a long prompt never stalls /health or a stream.
        self.count_tok = copy.deepcopy(model.tokenizer)
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personafuse-tokenize")
        self.context = int(getattr(getattr(model.base_model, "config", None), "max_position_embeddings", 0) or 0)
        self.batcher: Batcher | None = None
        self.flight = InFlight(self._discard)

    def _discard(self, job: Job) -> None:
        if self.batcher is not None:
            self.batcher.discard(job)
        else:
            job.cancelled = True

    def check_key(self, request: Request) -> None:
        if not self.cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
        if not secrets.compare_digest(given.encode(), self.cfg.api_key.encode()):
            raise APIError(401, "invalid API key")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes ``max_body_bytes``: never held whole."""
        cap = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than this server's limit of {cap} bytes (--max-body-bytes)")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > cap):
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_request(self, request: Request) -> ChatCompletionRequest:
        # JSON only: a browser can send text/plain or a form to any site without asking first
        # (no CORS preflight), so the API refuses every other content type.
        ctype = request.headers.get("content-type", "")
        mime = ctype.split(";")[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {ctype[:80]!r}", "Content-Type")
        raw = await self.read_body(request)
        try:
            return parse_request(raw)
        except BadRequest as e:
            raise APIError(400, e.message, e.param) from None

    def check_request(self, req: ChatCompletionRequest) -> tuple[Routing, dict[str, Any], list[dict[str, str]], int]:
        """The checks that need no tokenizer: routing, max_tokens, messages and their length."""
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
        chars = sum(len(m["content"]) for m in messages)
        if chars > cfg.max_prompt_chars:  # type: ignore[operator]
            raise APIError(
                400,
                f"messages: the conversation is {chars} characters; this server reads at most {cfg.max_prompt_chars} "
                f"(prompts up to {cfg.max_prompt_tokens} tokens)",
                "messages",
            )
        return routing, desc, messages, max_tokens

    async def build_job(self, req: ChatCompletionRequest) -> tuple[Job, dict[str, Any]]:
        cfg = self.cfg
        routing, desc, messages, max_tokens = self.check_request(req)
        loop = asyncio.get_running_loop()
        # the text model.chat_inputs sends, tokenised off the event loop
        n_prompt = len(await loop.run_in_executor(self.tokenize_pool, prompt_ids, self.count_tok, messages))
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
        return Job(messages, routing, spec, loop), desc

    def drain(self, bound_s: float | None = None) -> None:
        """Begin a graceful stop (``serve`` calls it on SIGTERM/SIGINT): new requests get 503,
        /health turns 503, and requests still in flight after the bound end with a 503."""
        self.flight.drain(self.cfg.drain_timeout_s if bound_s is None else bound_s)
        if self.batcher is not None:
            self.batcher.begin_close()

    def submit(self, job: Job) -> None:
        if self.flight.draining:
            raise APIError(503, "unavailable: the server is shutting down")
        try:
            self.batcher.submit(job)  # type: ignore[union-attr]
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry shortly") from None
        except Unavailable as e:
            raise APIError(503, f"unavailable: {e}") from None

    def failure(self, kind: str, payload: Any) -> APIError:
        """The error a job's early end (or its failure in the worker) answers with."""
        if kind == TIMEOUT:
            return APIError(504, f"the reply was not complete within this server's deadline of {self.cfg.request_timeout_s:g} s")
        if kind == SHUTDOWN:
            return APIError(503, "unavailable: the server is shutting down; retry")
        if kind == GONE:
            return APIError(CLIENT_GONE, "the client closed the connection")
        return APIError(500, str(payload))

    async def handle(self, request: Request) -> Response:
        self.check_key(request)
        req = await self.read_request(request)
        job, desc = await self.build_job(req)
        self.submit(job)
        guard = self.flight.add(job, request.receive, self.cfg.request_timeout_s)
        handed_over = False
        try:
            kind, first = await job.events.get()
            if kind != "start":
                raise self.failure(kind, first)
            reply = _Reply(self, job, guard, {"weights": first["weights"], **desc}, first["prompt_tokens"])
            if not req.stream:
                return await reply.complete()
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            guard.stop_listening()  # the streaming response watches the connection from here
            handed_over = True
            return StreamingResponse(reply.stream(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finally:
            if not handed_over:  # answered, failed or cancelled here: the stream's own cleanup is not coming
                guard.close()
                self.flight.release(job)


class _Reply:
    """One accepted request's answer: the events of its job as one JSON body or an SSE stream."""

    def __init__(self, service: ChatService, job: Job, guard: Guard, persona: dict[str, Any], prompt_tokens: int) -> None:
        self.service, self.job, self.guard, self.persona, self.prompt_tokens = service, job, guard, persona, prompt_tokens
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
        while True:
            kind, payload = await self.job.events.get()
            if kind == "delta":
                first_at = first_at or time.monotonic()
                parts.append(payload)
            elif kind == "end":
                break
            else:  # the worker's error, the deadline, the client gone, the drain bound
                raise self.service.failure(kind, payload)
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
                elif kind == "end":
                    yield self.chunk({}, payload["finish_reason"], persona=self.persona)
                    if include_usage:
                        yield self.chunk(None, usage=self.usage(payload["completion_tokens"]))
                    self.finish(payload["completion_tokens"], first_at)
                    break
                else:  # headers are sent: the error goes in the stream, in the API's error shape
                    err = self.service.failure(kind, payload)
                    body = {"message": err.message, "type": err.kind, "param": None, "code": err.status}
                    yield f"data: {json.dumps({'error': body})}\n\n"
                    self.service.metrics.request("chat_completions", err.status)
                    break
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client left mid-stream
                self.service.metrics.request("chat_completions", CLIENT_GONE)
            self.guard.close()
            self.service.flight.release(self.job)


def create_app(model: Any, config: ServeConfig | None = None) -> FastAPI:
    cfg = config or ServeConfig()
    metrics = Metrics()
    service = ChatService(model, cfg, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher = Batcher(
            model, max_batch=cfg.max_batch, max_queue=cfg.max_queue, batch_wait_s=cfg.batch_wait_ms / 1000, metrics=metrics,
            scheduler=cfg.scheduler, prefill_chunk=cfg.prefill_chunk, mixture=not cfg.base_only,
        )  # fmt: skip
        yield
        await asyncio.to_thread(service.batcher.close)
        service.tokenize_pool.shutdown(wait=False)

    async def health() -> tuple[bool, dict[str, Any]]:
        b = service.batcher
        ok = b is not None and b.healthy
        return ok, {"status": "ok" if ok else "unavailable", "model": cfg.model_name,
                    "queue_depth": b.queue_depth if b else 0, "running": b.running if b else 0}  # fmt: skip

    return api_app("PersonaFuse", lifespan, service, health)


def api_app(title: str, lifespan: Any, service: Any, health: Any) -> FastAPI:
    """The OpenAI-compatible app around a chat service: the chat page, /health (``health()`` gives
    ok and the body), /metrics, /v1/models, chat completions, and errors in the API's shape. One
    definition for the in-process server and the vLLM front."""
    cfg, metrics = service.cfg, service.metrics
    app = FastAPI(title=title, lifespan=lifespan)
    app.state.metrics, app.state.config, app.state.drain = metrics, cfg, service.drain
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
    async def health_check() -> JSONResponse:
        ok, body = await health()
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


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Run ``app`` (from :func:`create_app`) with uvicorn. On SIGTERM or SIGINT the server stops
    accepting, lets requests in flight finish for ``drain_timeout_s`` and ends the rest with 503."""
    import uvicorn

    drain_s = app.state.config.drain_timeout_s

    class _DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            app.state.drain()  # before uvicorn waits for the connections to finish
            await super().shutdown(sockets)

    # uvicorn's own bound is the backstop: it cancels what is left a little after ours.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(drain_s) + 5)
    _DrainingServer(config).run()
