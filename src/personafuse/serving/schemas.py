"""Request bodies of the OpenAI-compatible API (pydantic), plus the PersonaFuse ``persona`` field.

Unknown OpenAI fields (``logprobs``, ``user``, ...) are accepted and ignored so that stock clients
work; fields whose meaning we cannot honour (``n`` > 1) are rejected with a message.

Ranges follow OpenAI's API (openai/openai-openapi, ``CreateChatCompletionRequest``: temperature in
[0, 2], top_p in [0, 1]) and vLLM's where OpenAI gives none (vllm-project/vllm,
``vllm/entrypoints/openai/protocol.py``: ``seed`` is a 64-bit signed integer). A value inside those
ranges is served, never refused: temperature below 1e-5 is greedy, and top_p keeps at least the
most likely token (see ``decode.py``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Deeper than any request this API reads (messages -> content parts -> part is 4 levels; OpenAI
# tool schemas, accepted and ignored, rarely pass 20): a bound, so that a body of brackets is a
# clear 400 rather than a parser recursion error.
MAX_JSON_DEPTH = 64
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class BadRequest(ValueError):
    """A request the API refuses (HTTP 400); ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    # OpenAI clients may send a list of content parts; only text parts are meaningful here.
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content[{i}]: only text parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "\n".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    # PersonaFuse extension: how this request's ten mixture weights are chosen (see Routing.from_dict).
    persona: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def conversation(self) -> list[dict[str, str]]:
        """Messages as plain dicts; ``developer`` is OpenAI's newer name for ``system``."""
        out = []
        for i, m in enumerate(self.messages):
            try:
                text = m.text()
            except ValueError as e:
                raise ValueError(f"messages[{i}].{e}") from None
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON (RFC 8259) has no such values.
    raise BadRequest(f"the request body is not valid JSON: {name} is not a JSON value")


def _loc(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "body"


def check_tree(value: Any) -> None:
    """Walk the parsed body without recursion: every string must be valid Unicode (a lone
    surrogate such as "\\ud800" cannot be encoded, tokenised or echoed back) and nesting is bounded."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(f"{_loc(path)}: the text contains an unpaired surrogate; send valid Unicode", _loc(path)) from None
        elif isinstance(v, dict | list):
            if len(path) >= MAX_JSON_DEPTH:
                raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", _loc(path[:1]))
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                stack.append((k, path))  # keys are strings too
                stack.append((x, (*path, k)))


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or :class:`BadRequest` with a message a client can act on."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise BadRequest("the request body is not valid JSON: a number has too many digits") from None


def validation_message(e: ValidationError) -> tuple[str, str]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "body"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{more}", loc


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Bytes of a chat request → the checked request, or :class:`BadRequest` naming the field."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_tree(body)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        msg, loc = validation_message(e)
        raise BadRequest(msg, loc) from None
