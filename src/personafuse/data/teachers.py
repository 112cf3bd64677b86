"""Teachers: the LLMs that write Persona-CoT data, behind one small async interface.

* :class:`HFTeacher` - any local Hugging Face causal LM (default: the embedded SmolLM2-135M-Instruct
  GGUF). Concurrent requests are gathered into padded batches (dynamic batching) and run in a
  worker thread, so the pipeline code is the same for every teacher. It can also *score* option
  strings by log-likelihood, which the constrained mode uses.
* :class:`OpenAITeacher` - any OpenAI-compatible chat endpoint (vLLM server, llama.cpp, Ollama, TGI,
  hosted APIs) under the retry and deadline policy shared with evaluation (:mod:`personafuse.endpoint`).
* :class:`VLLMTeacher` - vLLM's offline engine (``pip install 'personafuse[vllm]'``) for large runs
  on a GPU node.

Each is a thin user of its backend (:mod:`personafuse.backends`), whose capabilities it carries.

Spec strings (``--teacher``): ``default``, ``hf:ID_OR_PATH``, ``openai:MODEL``, ``vllm:ID``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personafuse.backends.base import (
    CHAT_ONLY,
    HF,
    OPENAI,
    VLLM,
    BackendError,
    Capabilities,
    Completion,
    GenParams,
    Messages,
    teacher_backend,
)
from personafuse.backends.local_hf import HFBackend, load_hf
from personafuse.backends.openai_compat import OpenAIBackend, resolve_api_key
from personafuse.backends.vllm_offline import VLLMBackend
from personafuse.data.teacher_options import TeacherOptions
from personafuse.endpoint import Clock, EndpointFailure, EndpointFatal, EndpointStats

__all__ = ["Completion", "GenParams", "HFTeacher", "OpenAITeacher", "Teacher", "TeacherError", "TeacherOptions",
           "TeacherRequestError", "VLLMTeacher", "embedded_teacher_path", "make_teacher"]


class TeacherError(RuntimeError):
    """A problem that stops the run: missing package or model, bad credentials, unknown model."""


class TeacherRequestError(RuntimeError):
    """One request failed for good (after retries, or a non-retryable reply); the query is rejected
    with ``reason``: an endpoint_* reason for HTTP teachers, ``teacher_error`` for a local crash."""

    def __init__(self, detail: str, reason: str = "teacher_error"):
        super().__init__(detail)
        self.reason = reason


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
    capabilities: Capabilities = CHAT_ONLY  # what its backend can do (personafuse.backends)
    endpoint_stats: EndpointStats | None = None  # HTTP teachers: requests, retries, statuses, waits

    @abstractmethod
    async def complete(self, messages: Messages, params: GenParams) -> Completion: ...

    async def score(self, messages: Messages, options: Sequence[str]) -> list[float]:
        """Mean per-token log-likelihood of each option as the assistant's reply to ``messages``."""
        raise TeacherError(f"teacher {self.name} cannot score options; use a local hf: teacher for constrained mode")

    @property
    def supports_scoring(self) -> bool:  # the name the pipeline used before capabilities
        return self.capabilities.scoring

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


# ---------------------------------------------------------------------------------------- HF local


class HFTeacher(Teacher):
    """A local causal LM (:class:`personafuse.backends.local_hf.HFBackend`): batched greedy/sampled
    generation and option scoring."""

    capabilities = HF

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "hf", max_batch: int = 8,
                 score_batch: int = 32):
        self.backend = HFBackend(model, tokenizer, max_batch=max_batch, score_batch=score_batch)
        self.name = name

    @property
    def model(self) -> Any:
        return self.backend.model

    @property
    def tok(self) -> Any:
        return self.backend.tok

    @classmethod
    def from_pretrained(cls, id_or_path: str, *, gguf_file: str | None = None, device: str | None = None,
                        dtype: str | None = None, name: str | None = None, **kw: Any) -> HFTeacher:
        from personafuse import devices

        # --device / --dtype as every command reads them: the first accelerator, the teacher's own
        # dtype, else bfloat16 on a GPU and float32 on the CPU (a GGUF is converted to it)
        try:
            model, tok = load_hf(id_or_path, gguf_file=gguf_file, dtype=dtype, device=devices.resolve_device(device))
        except OSError as e:
            raise TeacherError(f"could not load teacher model {id_or_path!r}: {e}") from None
        return cls(model, tok, name=name or f"hf:{id_or_path}", **kw)

    @classmethod
    def embedded(cls, **kw: Any) -> HFTeacher:
        folder, fname = embedded_teacher_path()
        return cls.from_pretrained(folder, gguf_file=fname, name="default:SmolLM2-135M-Instruct", **kw)

    def _prompt_text(self, messages: Messages) -> str:
        return self.backend.prompt_text(messages)

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        return await self.backend.complete(messages, params)

    async def score(self, messages: Messages, options: Sequence[str]) -> list[float]:
        return await self.backend.score(messages, options)


# ------------------------------------------------------------------------------- OpenAI-compatible


class OpenAITeacher(Teacher):
    """Chat completions over HTTP (:class:`personafuse.backends.openai_compat.OpenAIBackend`) under
    the shared endpoint policy (:mod:`personafuse.endpoint`): at most ``max_in_flight`` requests in
    flight, one deadline per request, 429s on their own wait budget, 5xx / timeouts /
    non-completion bodies / empty content retried with jittered backoff. A request that fails for
    good raises :class:`TeacherRequestError` whose ``reason`` is the endpoint_* reject reason; an
    endpoint that cannot serve the run raises :class:`TeacherError`.

    ``base_url``/``api_key`` default to ``OPENAI_BASE_URL``/``OPENAI_API_KEY``. Local servers that
    need no key get a placeholder key when a base URL is given.
    """

    capabilities = OPENAI

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 max_in_flight: int = 32, timeout: float = 300.0, max_retries: int = 5,
                 backoff: float = 1.0, backoff_max: float = 30.0, max_rate_limit_wait: float = 600.0,
                 extra_body: dict[str, Any] | None = None, clock: Clock | None = None):
        key = resolve_api_key(api_key, base_url)
        if key is None:
            raise TeacherError("openai teacher: pass --api-key or set OPENAI_API_KEY (or --base-url for a local server)")
        self.model = model
        self.name = f"openai:{model}"
        self.backend = OpenAIBackend(model, base_url=base_url, api_key=key, max_in_flight=max_in_flight,
                                     timeout=timeout, max_retries=max_retries, backoff=backoff, backoff_max=backoff_max,
                                     max_rate_limit_wait=max_rate_limit_wait, extra_body=extra_body, clock=clock,
                                     name=self.name)
        self.base_url = self.backend.base_url
        self.endpoint = self.backend.endpoint
        self.endpoint_stats = self.backend.stats
        self.extra_body = extra_body

    @property
    def retries(self) -> int:  # counted for reports and tests
        return self.endpoint.stats.retries

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        try:
            r = await self.backend.chat(messages, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                        top_p=params.top_p)
        except EndpointFatal as e:
            raise TeacherError(str(e)) from None
        except EndpointFailure as e:
            raise TeacherRequestError(e.detail, reason=e.cause) from None
        return Completion(r.text, "length" if r.finish_reason == "length" else "stop", r.seconds,
                          r.usage.get("prompt_tokens"), r.usage.get("completion_tokens"))

    async def aclose(self) -> None:
        await self.backend.aclose()


# ------------------------------------------------------------------------------------- vLLM offline


class VLLMTeacher(Teacher):
    """vLLM's offline engine (:class:`personafuse.backends.vllm_offline.VLLMBackend`)."""

    capabilities = VLLM

    def __init__(self, model_id: str, *, max_batch: int = 512, **engine_kw: Any):
        try:
            self.backend = VLLMBackend(model_id, max_batch=max_batch, **engine_kw)
        except BackendError as e:
            raise TeacherError(str(e)) from None
        self.name = f"vllm:{model_id}"

    async def complete(self, messages: Messages, params: GenParams) -> Completion:
        return await self.backend.complete(messages, params)


# ------------------------------------------------------------------------------------------ specs


def make_teacher(spec: str, opts: TeacherOptions | None = None) -> Teacher:
    """Build a teacher from ``default``, ``hf:ID_OR_PATH``, ``openai:MODEL`` or ``vllm:ID``."""
    opts = opts or TeacherOptions()
    try:
        b = teacher_backend(spec)
    except BackendError as e:
        raise TeacherError(str(e)) from None
    if b.kind == "hf" and b.embedded:
        return HFTeacher.embedded(device=opts.device, dtype=opts.dtype, max_batch=opts.batch_size)
    if b.kind == "hf":
        arg, gguf = b.target, opts.gguf_file
        if gguf is None and arg.endswith(".gguf") and Path(arg).is_file():
            arg, gguf = str(Path(arg).parent), Path(arg).name
        return HFTeacher.from_pretrained(arg, gguf_file=gguf, device=opts.device, dtype=opts.dtype,
                                         max_batch=opts.batch_size)
    if b.kind == "openai":
        return OpenAITeacher(b.target, base_url=opts.base_url, api_key=opts.api_key, max_in_flight=opts.max_in_flight,
                             timeout=opts.timeout, max_retries=opts.max_retries, backoff=opts.backoff,
                             max_rate_limit_wait=opts.max_rate_limit_wait, clock=opts.clock)
    return VLLMTeacher(b.target)
