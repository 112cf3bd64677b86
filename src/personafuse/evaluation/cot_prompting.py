"""Persona-CoT prompting, the paper's training-free baseline (Table 3): at inference the model
itself names the social and task cues, the personality poles they call for, and then answers;
only the answer is scored.

The steps are the ones Persona-CoT data is written with (cues, traits, response), and the reply is
read with the parser that reads teachers' Persona-CoT replies (:func:`personafuse.data.parsing.
parse_response`, an answer section required). Everything after the answer heading is the answer
(a benchmark's answer may hold lines that look like headings, e.g. "Reasoning: ..."). A reply
with no answer section reaches the benchmark as an empty answer: the benchmark's own unparsed case.

Budget: a benchmark's generation cap is meant for its answer, so the model may write
``reasoning_tokens`` more for the cues and traits, and the answer is then cut to the benchmark's
cap in the subject's own tokens (subjects without a tokenizer, i.e. endpoints, are not cut).
Raw-completion prompts (GSM8K, GPQA, SafetyBench, Shop-MMLU) become one user message: the
procedure needs a chat. The full reply is kept in each item record under ``persona_cot``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

from personafuse.chat import Generation, Prompt, RawPrompt, as_messages
from personafuse.data.parsing import parse_response
from personafuse.data.prompts import pole_label
from personafuse.data.validation import Rejection
from personafuse.traits import TRAIT_POLES

# Room for the cues and traits before the answer (the teacher's Persona-CoT sections run to
# about 150-300 tokens).
REASONING_TOKENS = 512


@functools.cache
def instruction() -> str:
    """The system text that asks for the three steps (its hash is recorded in results.json)."""
    menu = ", ".join(pole_label(p) for p in TRAIT_POLES)
    return (
        "Before you answer, think about the situation in three short steps, each under its heading:\n"
        "Social Cue: how the person sounds and feels, and what they want from the exchange.\n"
        "Task Cue: what the task is and what a good answer looks like.\n"
        "Traits: the personality poles these cues call for, one bullet each, like "
        f"'- High Agreeableness: why'. Choose from: {menu}; never both poles of one trait.\n"
        "## Response: then your answer, written with those traits, in exactly the format the task "
        "asks for."
    )


def with_instruction(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as a chat whose system message asks for the three steps (after the
    benchmark's own system prompt, if it has one)."""
    msgs = as_messages(str(prompt)) if isinstance(prompt, RawPrompt) else as_messages(prompt)
    if msgs and msgs[0]["role"] == "system":
        return [{"role": "system", "content": msgs[0]["content"] + "\n\n" + instruction()}, *msgs[1:]]
    return [{"role": "system", "content": instruction()}, *msgs]


def answer_section(reply: str) -> str:
    """The answer of a Persona-CoT reply: everything after its answer heading; "" when it has none."""
    try:
        parts = parse_response(reply, require_sections=True)
    except Rejection:
        return ""
    start = reply.find(parts.response) if parts.response else -1
    return reply[start:].strip() if start >= 0 else parts.response.strip()


def _tokenizer_of(subject: Any) -> Any:
    tok = getattr(subject, "tokenizer", None)
    return tok if tok is not None else getattr(getattr(subject, "model", None), "tokenizer", None)


def cap_tokens(text: str, tokenizer: Any, limit: int) -> str:
    """``text`` cut to its first ``limit`` tokens (unchanged when it is shorter)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= limit else tokenizer.decode(ids[:limit], skip_special_tokens=True).strip()


class PersonaCoTPrompting:
    """Wraps any subject: the same model, asked to reason through the Persona-CoT steps first."""

    def __init__(self, inner: Any, reasoning_tokens: int = REASONING_TOKENS) -> None:
        if reasoning_tokens < 0:
            raise ValueError(f"reasoning_tokens must be >= 0, got {reasoning_tokens}")
        self.inner = inner
        self.reasoning_tokens = reasoning_tokens
        self.name = f"{inner.name}+persona-cot-prompting"

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        gens = self.inner.generate(
            [with_instruction(p) for p in prompts],
            max_new_tokens=max_new_tokens + self.reasoning_tokens,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed,
        )
        tok = _tokenizer_of(self.inner)
        out = []
        for g in gens:
            answer = answer_section(g.text)
            if answer and tok is not None:
                answer = cap_tokens(answer, tok, max_new_tokens)
            extra = {**g.extra, "persona_cot": g.text}
            out.append(Generation(answer, g.weights, g.prompt_tokens, g.completion_tokens, g.finish_reason, extra))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "persona_cot_prompting": {
                "reasoning_tokens": self.reasoning_tokens,
                "instruction_sha": hashlib.sha256(instruction().encode()).hexdigest()[:16],
            },
        }


def with_persona_cot(subject: Any, reasoning_tokens: int | None) -> Any:
    """``subject`` wrapped for Persona-CoT prompting, or as it is when ``reasoning_tokens`` is None."""
    return subject if reasoning_tokens is None else PersonaCoTPrompting(subject, reasoning_tokens)
