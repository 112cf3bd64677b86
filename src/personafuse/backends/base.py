"""What every backend shares: its kind's :class:`Capabilities`, the parsed spec, and the request and
reply types of a generation call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]


class BackendError(RuntimeError):
    """A backend cannot be built: unknown spec, missing package or model."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; callers ask these instead of reading a spec's prefix."""

    placement: bool  # weights load in this process on --device in --dtype, batched by --batch-size
    endpoint: bool  # HTTP under personafuse.endpoint's retry and deadline policy, with request counters
    chat: bool  # chat messages (the model's template, or the endpoint's)
    completion: bool  # raw prompts with no template (RawPrompt; the endpoint's /completions)
    scoring: bool  # mean per-token log-likelihood of option strings (constrained data mode)
    batching: bool  # concurrent requests are gathered into batches by the backend itself
    seed: bool  # a request's seed reaches the sampler
    repetition_penalty: bool  # honours GenParams.repetition_penalty


HF = Capabilities(placement=True, endpoint=False, chat=True, completion=True, scoring=True, batching=True,
                  seed=True, repetition_penalty=True)
OPENAI = Capabilities(placement=False, endpoint=True, chat=True, completion=True, scoring=False, batching=False,
                      seed=True, repetition_penalty=False)
# vLLM places its weights and sizes its batches itself (--device/--batch-size do not reach it).
VLLM = Capabilities(placement=False, endpoint=False, chat=True, completion=False, scoring=False, batching=True,
                    seed=False, repetition_penalty=False)
# A chat model known only by its interface (a stand-in teacher or subject).
CHAT_ONLY = Capabilities(placement=False, endpoint=False, chat=True, completion=False, scoring=False, batching=False,
                         seed=False, repetition_penalty=False)
NOTHING = Capabilities(placement=False, endpoint=False, chat=False, completion=False, scoring=False, batching=False,
                       seed=False, repetition_penalty=False)
CAPABILITIES: dict[str, Capabilities] = {"hf": HF, "openai": OPENAI, "vllm": VLLM}

TEACHER_KINDS = ("default", "hf", "openai", "vllm")  # the --teacher grammar's heads
EMBEDDED = "default"


@dataclass(frozen=True)
class BackendSpec:
    """A parsed spec: backend ``kind`` (a key of :data:`CAPABILITIES`), its ``target`` (path, Hub
    id, endpoint model name, or :data:`EMBEDDED`) and the text it came from."""

    kind: str
    target: str
    text: str

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES[self.kind]

    @property
    def embedded(self) -> bool:
        return self.target == EMBEDDED


def teacher_kind(spec: str) -> str:
    """The head of a ``--teacher`` spec (``default`` for ``default``), unchecked."""
    return str(spec).split(":", 1)[0]


def teacher_backend(spec: str) -> BackendSpec:
    """``default`` (the embedded SmolLM2, run by hf), ``hf:ID_OR_PATH``, ``openai:MODEL``, ``vllm:ID``."""
    if spec == "default":
        return BackendSpec("hf", EMBEDDED, spec)
    kind, _, arg = spec.partition(":")
    if kind in CAPABILITIES and arg:
        return BackendSpec(kind, arg, spec)
    raise BackendError(f"unknown teacher {spec!r}; use default, hf:ID_OR_PATH, openai:MODEL or vllm:ID")


def teacher_capabilities(spec: str) -> Capabilities:
    """What a ``--teacher`` spec's backend can do; an unknown spec can do nothing (the run that
    builds it names the problem)."""
    try:
        return teacher_backend(spec).capabilities
    except BackendError:
        return NOTHING


def model_backend(spec: Any) -> BackendSpec:
    """The backend of a ``--model`` / ``--judge`` spec (:mod:`personafuse.specs`): a PersonaFuse
    checkpoint, a LoRA adapter and a plain model all run by hf; ``openai:MODEL`` by openai. A
    spec that does not parse raises ``ValueError`` naming it."""
    from personafuse.specs import ModelSpec

    s = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    return BackendSpec("openai" if s.kind == "openai" else "hf", s.target, s.text)


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # local backends only; small models loop under greedy decoding


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length" (the model ran out of tokens)
    seconds: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
