"""Persona-CoT prompting, the paper's training-free baseline (Table 3): the evaluated model runs the
data pipeline's three Persona-CoT steps as its own teacher, and only the last step's reply is scored.

1. the social and task cues of the item (``personafuse.data.prompts.cue_messages``, a chat call on
   the item's text, read with the pipeline's ``parse_cues``);
2. the Big Five poles those cues call for (``traits_messages``, read with ``parse_traits``);
3. the benchmark's own prompt, in exactly the form every other variant gets it, preceded by the
   analysis of steps 1-2: as a system message for a chat prompt (before the benchmark's own
   system text, if any), as a text prefix for a raw-completion prompt (GSM8K, GPQA, SafetyBench,
   Shop-MMLU), so the benchmark's answer format and parser are unchanged.

A step whose reply cannot be parsed, or that stops at its token limit, ends the item: its reply
reaches the benchmark as an empty answer (the benchmark's own unparsed case), and the failure is
counted in the record (``persona_cot.failed_step``). Steps 1 and 2 each have ``reasoning_tokens``;
step 3 has the benchmark's own cap. Each item costs three requests (one or two when a step fails).
The steps' replies are kept in each item record under ``persona_cot``.

The item's text for steps 1-2 is the prompt's last user message (chat prompts) or the whole raw
prompt (raw-completion prompts, few-shot examples included: that is the text the model will see).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from personafuse.chat import Generation, Prompt, RawPrompt, as_messages
from personafuse.data import prompts as pipeline
from personafuse.data.parsing import parse_cues, parse_traits
from personafuse.data.prompts import pole_label
from personafuse.data.validation import Rejection
from personafuse.evaluation.config import REASONING_TOKENS

STEPS = ("cues", "traits", "answer")


def item_text(prompt: Prompt) -> str:
    """What steps 1-2 analyse: the last user message of a chat prompt, or the raw prompt."""
    if isinstance(prompt, RawPrompt):
        return str(prompt)
    msgs = as_messages(prompt)
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return users[-1] if users else msgs[-1]["content"]


def analysis_text(social: str, task: str, traits: Sequence[tuple[str, str, str]]) -> str:
    """Steps 1-2 as the text step 3 reads before the benchmark's prompt."""
    lines = [f"- {pole_label(pole)}" + (f": {reason}" if reason else "") for _, pole, reason in traits]
    return ("Situation analysis to answer with (the person's social cue, the task cue, and the personality traits they "
            f"call for).\nSocial cue: {social}\nTask cue: {task}\nTraits to show:\n" + "\n".join(lines))


def with_analysis(prompt: Prompt, analysis: str) -> Prompt:
    """The benchmark's prompt, unchanged in form, preceded by the analysis: a system message for
    a chat prompt, a prefix for a raw one."""
    if isinstance(prompt, RawPrompt):
        return RawPrompt(f"{analysis}\n\n{prompt}")
    msgs = as_messages(prompt)
    if msgs and msgs[0]["role"] == "system":
        return [{"role": "system", "content": f"{analysis}\n\n{msgs[0]['content']}"}, *msgs[1:]]
    return [{"role": "system", "content": analysis}, *msgs]


def describe_prompts() -> str:
    """A digest of the wording steps 1-3 use (recorded in results.json)."""
    sample = pipeline.cue_messages("Q") + pipeline.traits_messages("Q", "S", "T") + [{"role": "system", "content": analysis_text("S", "T", [])}]
    return hashlib.sha256(repr(sample).encode()).hexdigest()[:16]


class PersonaCoTPrompting:
    """Wraps any subject: the same model, asked for the cues and traits first, then the benchmark's
    prompt with that analysis in front of it."""

    def __init__(self, inner: Any, reasoning_tokens: int = REASONING_TOKENS) -> None:
        if reasoning_tokens < 1:
            raise ValueError(f"reasoning_tokens must be >= 1, got {reasoning_tokens}")
        self.inner = inner
        self.reasoning_tokens = reasoning_tokens
        self.name = f"{inner.name}+persona-cot-prompting"

    def _step(self, msgs: list[list[dict[str, str]]], seed: int | None) -> list[Generation]:
        return self.inner.generate(msgs, max_new_tokens=self.reasoning_tokens, do_sample=False, seed=seed) if msgs else []

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        texts = [item_text(p) for p in prompts]
        state: list[dict[str, Any]] = [{} for _ in prompts]
        failed: dict[int, str] = {}
        # step 1: the cues
        for i, g in enumerate(self._step([pipeline.cue_messages(t) for t in texts], seed)):
            state[i]["cues"] = g.text
            try:
                if g.finish_reason == "length":
                    raise Rejection("truncated_response", "cut at the token limit", "cues")
                state[i]["_cues"] = parse_cues(g.text)
            except Rejection:
                failed[i] = "cues"
        # step 2: the traits, for the items whose cues were read
        alive = [i for i in range(len(prompts)) if i not in failed]
        msgs = [pipeline.traits_messages(texts[i], state[i]["_cues"].social, state[i]["_cues"].task) for i in alive]
        for i, g in zip(alive, self._step(msgs, seed), strict=True):
            state[i]["traits"] = g.text
            try:
                choice = parse_traits(g.text)
                if g.finish_reason == "length" or not choice.poles:
                    raise Rejection("truncated_response" if g.finish_reason == "length" else "no_traits", "unusable", "traits")
                c = state[i]["_cues"]
                state[i]["analysis"] = analysis_text(c.social, c.task, choice.triples())
            except Rejection:
                failed[i] = "traits"
        # step 3: the benchmark's own prompt with the analysis in front
        alive = [i for i in range(len(prompts)) if i not in failed]
        answers = self.inner.generate([with_analysis(prompts[i], state[i]["analysis"]) for i in alive], max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, temperature=temperature, seed=seed) if alive else []
        by_item = dict(zip(alive, answers, strict=True))
        out = []
        for i in range(len(prompts)):
            steps = {k: v for k, v in state[i].items() if not k.startswith("_")}
            if i in failed:  # an unparsed reply: the benchmark's own unparsed case
                out.append(Generation("", None, finish_reason="persona_cot_failed", extra={"persona_cot": {**steps, "failed_step": failed[i]}}))
                continue
            g = by_item[i]
            out.append(Generation(g.text, g.weights, g.prompt_tokens, g.completion_tokens, g.finish_reason,
                                  {**g.extra, "persona_cot": {**steps, "failed_step": None}}))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "persona_cot_prompting": {
                "reasoning_tokens": self.reasoning_tokens,
                "steps": list(STEPS),
                "prompt_version": pipeline.PROMPT_VERSION,
                "prompts_sha": describe_prompts(),
            },
        }


def with_persona_cot(subject: Any, reasoning_tokens: int | None) -> Any:
    """``subject`` wrapped for Persona-CoT prompting, or as it is when ``reasoning_tokens`` is None."""
    return subject if reasoning_tokens is None else PersonaCoTPrompting(subject, reasoning_tokens)
