"""Teachers: the LLMs that write Persona-CoT data, behind one small async interface.

* :class:`HFTeacher` - any local Hugging Face causal LM (default: the embedded SmolLM2-135M-Instruct
  GGUF). Concurrent requests are gathered into padded batches (dynamic batching) and run in a
  worker thread, so the pipeline code is the same for every teacher. It can also *score* option
  strings by log-likelihood, which the constrained mode uses.
* :class:`OpenAITeacher` - any OpenAI-compatible chat endpoint (vLLM server, llama.cpp, Ollama, TGI,
  hosted APIs) under the retry and deadline policy shared with evaluation (:mod:`personafuse.endpoint`).
* :class:`VLLMTeacher` - vLLM's offline engine (``pip install 'personafuse[vllm]'``) for large runs
  on a GPU node.

Spec strings (``--teacher``): ``default``, ``hf:ID_OR_PATH``, ``openai:MODEL``, ``vllm:ID``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse import chat
from personafuse.endpoint import (
    Clock,
    EndpointClient,
    EndpointFailure,
    EndpointFatal,
    EndpointStats,
    RetryPolicy,
    chat_reply,
)

Messages = list[dict[str, str]]


class TeacherError(RuntimeError):
    """A problem that stops the run: missing package or model, bad credentials, unknown model."""


class TeacherRequestError(RuntimeError):
    """One request failed for good (after retries, or a non-retryable reply); the query is rejected
    with ``reason``: an endpoint_* reason for HTTP teachers, ``teacher_error`` for a local crash."""

    def __init__(self, detail: str, reason: str = "teacher_error"):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # local teachers only; small models loop under greedy decoding


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length" (the teacher ran out of tokens)
    seconds: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def embedded_teacher_path() -> tuple[str, str]:
    """Folder and file name of the embedded SmolLM2-135M-Instruct GGUF."""
    from personafuse.embedded import ModelNotFoundError, resolve

    try:
        src = resolve("default")
    except ModelNotFoundError as e:  # the message names the pip command
        raise TeacherError(f"the embedded teacher is unavailable: {e}") from None
    return src.path, src.gguf_file or ""


class Teacher(ABC):
    """One LLM. ``complete`` may be called concurrently; implementations batch or limit as they need."""

    name: str = "teacher"
    supports_scoring: bool = False
    endpoint_stats: EndpointStats | None = None  # HTTP teachers: requests, retries, statuses, waits

    @abstractmethod
    async def complete(self, messages: Messages, params: GenParams) -> Completion: ...

    async def score(self, messages: Messages, options: Sequence[str]) -> list[float]:
        """Mean per-token log-likelihood of each option as the assistant's reply to ``messages``."""
        raise TeacherError(f"teacher {self.name} cannot score options; use a local hf: teacher for constrained mode")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


# --------------------------------------------------------------------------------- dynamic batching


class _Batcher:
    """Gathers concurrent calls with the same key into batches run by ``fn`` in a worker thread."""

    def __init__(self, fn: Callable[[Any, list[Any]], list[Any]], max_batch: int):
        self.fn = fn
        self.max_batch = max_batch
        self.pending: dict[Any, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, key: Any, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._wake is None:
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future[Any] = loop.create_future()
        self.pending.setdefault(key, []).append((item, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            # Let every coroutine that is ready this tick enqueue its request before batching.
            for _ in range(3):
                await asyncio.sleep(0)
            if not any(self.pending.values()):
                self._wake.clear()
                continue
            key = max(self.pending, key=lambda k: len(self.pending[k]))
            batch = self.pending[key][: self.max_batch]
            self.pending[key] = self.pending[key][self.max_batch:]
            if not self.pending[key]:
                del self.pending[key]
            try:
                results = await asyncio.to_thread(self.fn, key, [item for item, _ in batch])
            except BaseException as e:  # noqa: BLE001 - hand the error to every waiting caller
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


# ---------------------------------------------------------------------------------------- HF local


class HFTeacher(Teacher):
    """A local causal LM with batched greedy/sampled generation and option scoring."""

    supports_scoring = True

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "hf", max_batch: int = 8,
                 score_batch: int = 32):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tok = tokenizer
        self.name = name
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = next(model.parameters()).device
        # One model call at a time: generation and scoring batches run in worker threads, and two
        # concurrent forwards would only fight over the same cores.
        self._lock = threading.Lock()
        self._gen = _Batcher(self._locked(self._generate_batch), max_batch)
        self._score = _Batcher(self._locked(self._score_batch), score_batch)
        from personafuse.moe.decoding import cache_kwarg

        self._cache_kw = cache_kwarg(model)

    @classmethod
    def from_pretrained(cls, id_or_path: str, *, gguf_file: str | None = None, device: str | None = None,
                        dtype: str | None = None, name: str | None = None, **kw: Any) -> HFTeacher:
        from personafuse import devices
        from personafuse.embedded import ModelSource, load_causal_lm, load_tokenizer

        # --device / --dtype as every command reads them: the first accelerator, the teacher's own
        # dtype, else bfloat16 on a GPU and float32 on the CPU (a GGUF is converted to it)
        device = devices.resolve_device(device)
        dtype = devices.resolve_dtype(dtype, device, devices.source_dtype(id_or_path, gguf_file))
        name = name or f"hf:{id_or_path}"
        src = ModelSource(id_or_path, id_or_path, gguf_file)  # a local GGUF loads from its converted copy
        try:
            tok = load_tokenizer(src)
            model = load_causal_lm(src, dtype)
        except OSError as e:
            raise TeacherError(f"could not load teacher model {id_or_path!r}: {e}") from None
        return cls(model.to(device), tok, name=name, **kw)

    @classmethod
    def embedded(cls, **kw: Any) -> HFTeacher:
        folder, fname = embedded_teacher_path()
        return cls.from_pretrained(folder, gguf_file=fname, name="default:SmolLM2-135M-Instruct", **kw)

    def _locked(self, fn: Callable[[Any, list[Any]], list[Any]]) -> Callable[[Any, list[Any]], list[Any]]:
        def run(key: Any, items: list[Any]) -> list[Any]:
            with self._lock:
                return fn(key, items)

        return run

    def _prompt_text(self, messages: Messages) -> str:
        return chat.prompt_text(self.tok, list(messages))

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        return await self._gen.submit(params, messages)

    async def score(self, messages: Messages, options: Sequence[str]) -> list[float]:
        futs = [self._score.submit("score", (messages, opt)) for opt in options]
        return list(await asyncio.gather(*futs))

    def _generate_batch(self, params: GenParams, batch: list[Messages]) -> list[Completion]:
        torch = self.torch
        t0 = time.perf_counter()
        enc = chat.encode_prompts(self.tok, batch).to(self.device)  # left-padded, the one prompt format
        kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.tok.pad_token_id,
                              "repetition_penalty": params.repetition_penalty}
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        eos_ids = set(chat.eos_token_ids(self.tok, self.model))
        dt = time.perf_counter() - t0
        res = []
        for row, mask in zip(new.tolist(), enc["attention_mask"].tolist(), strict=True):
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            ids = row if stop is None else row[:stop]
            res.append(Completion(
                self.tok.decode(ids, skip_special_tokens=True).strip(),
                "length" if stop is None else "stop",
                dt,
                int(sum(mask)),
                len(ids),
            ))
        return res

    def _score_batch(self, _key: str, items: list[tuple[Messages, str]]) -> list[float]:
        # Options that share a prompt are scored from one cached prefix: the prompt runs once and
        # only the short option tokens run per option (about 5x less compute than full sequences).
        groups: dict[str, list[int]] = {}
        for i, (messages, _) in enumerate(items):
            groups.setdefault(self._prompt_text(messages), []).append(i)
        out = [0.0] * len(items)
        for prompt, idx in groups.items():
            for i, s in zip(idx, self._score_group(prompt, [items[i][1] for i in idx]), strict=True):
                out[i] = s
        return out

    def _score_group(self, prompt: str, options: list[str]) -> list[float]:
        from personafuse.moe import decoding

        torch = self.torch
        p = self.tok(prompt, add_special_tokens=chat.adds_special_tokens(self.tok))["input_ids"]
        opts = [self.tok(o, add_special_tokens=False)["input_ids"] for o in options]
        n, width = len(opts), max(len(o) for o in opts)
        pad = self.tok.pad_token_id
        with torch.inference_mode():
            pre = self.model(input_ids=torch.tensor([p], device=self.device), use_cache=True)
            cache = decoding.output_cache(pre)
            cache.batch_repeat_interleave(n)
            ids = torch.tensor([o + [pad] * (width - len(o)) for o in opts], device=self.device)
            # right padding: pads come after every real token, so they never affect the scores
            mask = torch.ones(n, len(p) + width, dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **{self._cache_kw: cache}).logits
        first = torch.log_softmax(pre.logits[0, -1].float(), -1)  # predicts each option's first token
        logp = torch.log_softmax(logits.float(), -1)
        res = []
        for i, o in enumerate(opts):
            if not o:
                res.append(float("-inf"))
                continue
            total = first[o[0]] + sum((logp[i, t - 1, o[t]] for t in range(1, len(o))), torch.tensor(0.0))
            res.append(float(total) / len(o))
        return res


# ------------------------------------------------------------------------------- OpenAI-compatible


class OpenAITeacher(Teacher):
    """Chat completions over HTTP under the shared endpoint policy (:mod:`personafuse.endpoint`):
    at most ``max_in_flight`` requests in flight, one deadline per request, 429s on their own
    wait budget, 5xx / timeouts / non-completion bodies / empty content retried with jittered
    backoff. A request that fails for good raises :class:`TeacherRequestError` whose ``reason`` is
    the endpoint_* reject reason; an endpoint that cannot serve the run raises :class:`TeacherError`.

    ``base_url``/``api_key`` default to ``OPENAI_BASE_URL``/``OPENAI_API_KEY``. Local servers that
    need no key get a placeholder key when a base URL is given.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 max_in_flight: int = 32, timeout: float = 300.0, max_retries: int = 5,
                 backoff: float = 1.0, backoff_max: float = 30.0, max_rate_limit_wait: float = 600.0,
                 extra_body: dict[str, Any] | None = None, clock: Clock | None = None):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not base_url:
                raise TeacherError("openai teacher: pass --api-key or set OPENAI_API_KEY (or --base-url for a local server)")
            api_key = "EMPTY"
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = base_url
        policy = RetryPolicy(max_retries=max_retries, backoff=backoff, backoff_max=backoff_max,
                             max_rate_limit_wait=max_rate_limit_wait, timeout=timeout)
        self.endpoint = EndpointClient(base_url, api_key, policy=policy, clock=clock, max_in_flight=max_in_flight,
                                       name=self.name)
        self.endpoint_stats = self.endpoint.stats
        self.extra_body = extra_body

    @property
    def retries(self) -> int:  # counted for reports and tests
        return self.endpoint.stats.retries

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, **(self.extra_body or {})}
        t0 = time.perf_counter()
        try:
            text, finish, data = await self.endpoint.post("/chat/completions", body, _chat_with_body)
        except EndpointFatal as e:
            raise TeacherError(str(e)) from None
        except EndpointFailure as e:
            raise TeacherRequestError(e.detail, reason=e.cause) from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Completion(text, "length" if finish == "length" else "stop", time.perf_counter() - t0,
                          usage.get("prompt_tokens"), usage.get("completion_tokens"))

    async def aclose(self) -> None:
        await self.endpoint.aclose()


def _chat_with_body(data: Any) -> tuple[str, str, dict[str, Any]]:
    text, finish, _ = chat_reply(data)
    return text, finish, data


# ------------------------------------------------------------------------------------- vLLM offline


class VLLMTeacher(Teacher):
    """vLLM's offline engine: requests are gathered into large batches for ``LLM.chat``."""

    def __init__(self, model_id: str, *, max_batch: int = 512, **engine_kw: Any):
        if importlib.util.find_spec("vllm") is None:
            raise TeacherError("vllm: teachers need vLLM on a GPU machine: pip install 'personafuse[vllm]'")
        from vllm import LLM, SamplingParams

        self._sampling = SamplingParams
        self.llm = LLM(model=model_id, **engine_kw)
        self.name = f"vllm:{model_id}"
        self._gen = _Batcher(self._generate_batch, max_batch)

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        return await self._gen.submit(params, messages)

    def _generate_batch(self, params: GenParams, batch: list[Messages]) -> list[Completion]:
        t0 = time.perf_counter()
        sp = self._sampling(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p)
        outs = self.llm.chat(batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append(Completion(c.text, "length" if c.finish_reason == "length" else "stop", dt,
                                  len(o.prompt_token_ids or []), len(c.token_ids or [])))
        return res


# ------------------------------------------------------------------------------------------ specs


@dataclass
class TeacherOptions:
    base_url: str | None = None
    api_key: str | None = None
    max_in_flight: int = 32
    timeout: float = 300.0  # one request, send to last byte
    max_retries: int = 5
    backoff: float = 1.0
    max_rate_limit_wait: float = 600.0  # cumulative 429 waiting per request
    clock: Clock | None = None  # tests and benchmarks run on a fast clock
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    gguf_file: str | None = None


def make_teacher(spec: str, opts: TeacherOptions | None = None) -> Teacher:
    """Build a teacher from ``default``, ``hf:ID_OR_PATH``, ``openai:MODEL`` or ``vllm:ID``."""
    opts = opts or TeacherOptions()
    kind, _, arg = spec.partition(":")
    if spec == "default":
        return HFTeacher.embedded(device=opts.device, dtype=opts.dtype, max_batch=opts.batch_size)
    if kind == "hf" and arg:
        gguf = opts.gguf_file
        if gguf is None and arg.endswith(".gguf") and Path(arg).is_file():
            arg, gguf = str(Path(arg).parent), Path(arg).name
        return HFTeacher.from_pretrained(arg, gguf_file=gguf, device=opts.device, dtype=opts.dtype,
                                         max_batch=opts.batch_size)
    if kind == "openai" and arg:
        return OpenAITeacher(arg, base_url=opts.base_url, api_key=opts.api_key, max_in_flight=opts.max_in_flight,
                             timeout=opts.timeout, max_retries=opts.max_retries, backoff=opts.backoff,
                             max_rate_limit_wait=opts.max_rate_limit_wait, clock=opts.clock)
    if kind == "vllm" and arg:
        return VLLMTeacher(arg)
    raise TeacherError(f"unknown teacher {spec!r}; use default, hf:ID_OR_PATH, openai:MODEL or vllm:ID")
