"""Request bodies of the OpenAI-compatible API (pydantic), plus the PersonaFuse ``persona`` field.

Unknown OpenAI fields (``logprobs``, ``user``, ...) are accepted and ignored so that stock clients
work; fields whose meaning we cannot honour (``n`` > 1) are rejected with a message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
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
