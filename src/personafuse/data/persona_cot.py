"""The Persona-CoT procedure (three steps) and the baseline modes: one query to one record.

Free mode (capable teachers): (1) cues as JSON, (2) poles per cue with reasons as JSON -> ``p``,
(3) the response in headed sections with a rationale; or all three in one request
(``single_call``). Constrained mode (small local teachers): the teacher writes a one-sentence
social cue and task cue and the response, but each cue's poles are chosen by comparing the
teacher's log-likelihood of the ten pole options, calibrated against a content-free prompt
(so a model's general preference for some words does not decide the label).

A query the teacher fails on raises a :class:`Rejection` carrying its :class:`QueryTrace` (raw
replies, timings); the run loop over a whole source (:mod:`personafuse.data.run`) writes every query
as exactly one line: a record or a counted rejection that keeps the raw text.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from personafuse.data import prompts
from personafuse.data.config import MODES as MODES  # re-exported: callers import them from here
from personafuse.data.config import PipelineConfig
from personafuse.data.config import endpoint_failure_limit as endpoint_failure_limit
from personafuse.data.parsing import (
    ResponseParts,
    TraitChoice,
    parse_cues,
    parse_full,
    parse_response,
    parse_traits,
)
from personafuse.data.schema import make_record
from personafuse.data.sources import Query
from personafuse.data.teachers import Completion, GenParams, Teacher, TeacherError, TeacherRequestError
from personafuse.data.validation import (
    TRUNCATED,
    UNPARSEABLE,
    Rejection,
    activation_from_poles,
    check_response,
    trim_to_sentence,
)
from personafuse.traits import TRAIT_POLES, TRAITS


@dataclass
class QueryTrace:
    """What one query's steps left behind: each step's raw reply and timing, and the step in flight."""

    raw: dict[str, Any] = field(default_factory=lambda: {k: None for k in ("cues", "traits", "response", "rationale", "scores")})
    timings: dict[str, float | None] = field(default_factory=lambda: {k: None for k in ("cues", "traits", "response", "total")})
    step: str | None = None  # the step whose request is in flight (named in endpoint rejects)


class PersonaCoT:
    """Turns one query into a record (dict) or raises :class:`Rejection` carrying the raw text."""

    def __init__(self, teacher: Teacher, cfg: PipelineConfig):
        if cfg.constrained and not teacher.capabilities.scoring:
            raise TeacherError(f"constrained mode needs a teacher that can score options; {teacher.name} cannot")
        self.teacher = teacher
        self.cfg = cfg
        self._baseline: dict[str, list[float]] = {}
        self._baseline_lock = asyncio.Lock()

    async def _ask(self, ctx: QueryTrace, step: str, messages: prompts.Messages, max_tokens: int) -> Completion:
        """One request; a repeated ask of a step replaces its raw text (raw shows the reply used)."""
        t0 = time.perf_counter()
        ctx.step = step
        c = await self._complete(messages, self._params(max_tokens))
        ctx.timings[step] = (ctx.timings[step] or 0.0) + time.perf_counter() - t0
        ctx.raw[step] = c.text
        return c

    async def _ask_whole(self, ctx: QueryTrace, step: str, messages: prompts.Messages, max_tokens: int) -> Completion:
        """Steps 1 and 2: a reply cut at the token limit would lose cues or poles, so it is asked
        once more with twice the budget and rejected as ``truncated_response`` if cut again."""
        c = await self._ask(ctx, step, messages, max_tokens)
        if c.finish_reason == "length":
            c = await self._ask(ctx, step, messages, 2 * max_tokens)
            if c.finish_reason == "length":
                raise Rejection(TRUNCATED, f"{step} reply cut at the token limit twice "
                                           f"({max_tokens}, then {2 * max_tokens} tokens)", step)
        return c

    async def _answer(self, ctx: QueryTrace, messages: prompts.Messages, max_tokens: int,
                      parse: Callable[[str], Any], parts_of: Callable[[Any], ResponseParts]) -> tuple[Completion, Any]:
        """The response step (or the single call): a reply cut before its rationale heading has a
        cut answer (or a cut earlier section), so it is asked once more with twice the budget and
        then rejected as ``truncated_response``. With ``trim_truncated`` (constrained mode, local
        baselines) a cut answer is trimmed by :meth:`_finish` instead."""
        for budget in (max_tokens, 2 * max_tokens):
            c = await self._ask(ctx, "response", messages, budget)
            if c.finish_reason != "length" or self.cfg.trim_truncated:
                return c, parse(c.text)
            try:
                parsed = parse(c.text)
            except Rejection:  # a cut reply that lost a section: the cut, not the teacher, is to blame
                continue
            if parts_of(parsed).had_rationale_heading:
                return c, parsed
        raise Rejection(TRUNCATED, f"response cut at the token limit twice ({max_tokens}, then {2 * max_tokens} tokens)",
                        "response")

    async def _complete(self, messages: prompts.Messages, params: GenParams) -> Completion:
        """Teacher call; a failure inside the teacher (not its text) counts as ``teacher_error``."""
        try:
            return await self.teacher.complete(messages, params)
        except (TeacherError, TeacherRequestError):
            raise
        except Exception as e:  # e.g. a local model running out of memory
            raise TeacherRequestError(f"{type(e).__name__}: {e}"[:500]) from e

    async def _score(self, messages: prompts.Messages, options: list[str]) -> list[float]:
        try:
            return await self.teacher.score(messages, options)
        except (TeacherError, TeacherRequestError):
            raise
        except Exception as e:
            raise TeacherRequestError(f"{type(e).__name__}: {e}"[:500]) from e

    def _params(self, max_tokens: int) -> GenParams:
        return GenParams(max_tokens, self.cfg.temperature, repetition_penalty=self.cfg.repetition_penalty)

    async def run(self, q: Query) -> dict[str, Any]:
        ctx = QueryTrace()
        t0 = time.perf_counter()
        try:
            if self.cfg.mode != "persona_cot":
                rec = await self._baseline_mode(ctx, q)
            elif self.cfg.constrained:
                rec = await self._constrained(ctx, q)
            elif self.cfg.single_call:
                rec = await self._single(ctx, q)
            else:
                rec = await self._free(ctx, q)
        except Rejection as r:
            ctx.timings["total"] = time.perf_counter() - t0
            r.ctx = ctx
            raise
        except TeacherRequestError as e:
            ctx.timings["total"] = time.perf_counter() - t0
            raise Rejection(e.reason, str(e), ctx.step, ctx=ctx) from None
        except TeacherError:
            raise
        except Exception as e:  # a parser bug must not stop the run: reject with the raw text kept
            ctx.timings["total"] = time.perf_counter() - t0
            raise Rejection(UNPARSEABLE, f"{type(e).__name__}: {e}"[:500], ctx=ctx) from None
        ctx.timings["total"] = time.perf_counter() - t0
        return self._record(q, ctx, rec)

    # -- record layout (data/schema.py; docs/data.md documents it). Every key has one type per
    # output folder (strings are "" rather than null when absent): datasets infers a column's type
    # from the first shard, and a small shard written after a resume must not pin a column to null.
    def _record(self, q: Query, ctx: QueryTrace, part: dict[str, Any]) -> dict[str, Any]:
        return make_record(
            id=q.id,
            query=q.text,
            situation=q.situation or "",
            source=q.source,
            mode=self.cfg.mode,
            cues=part.get("cues"),
            traits=part.get("traits"),
            trait_reasons=part.get("trait_reasons"),
            p=part.get("p"),
            response=part["response"],
            rationale=part.get("rationale") or "",
            teacher=self.teacher.name,
            prompt_version=prompts.PROMPT_VERSION,
            constrained=self.cfg.constrained and self.cfg.mode == "persona_cot",
            timings={k: (round(v, 4) if v is not None else None) for k, v in ctx.timings.items()},
            raw=ctx.raw,
        )

    def _finish(self, c: Completion, parts: ResponseParts, *, asked_rationale: bool) -> tuple[str, str | None]:
        """Apply the truncation rule and the empty check to a parsed step-3 reply."""
        response, rationale = parts.response, parts.rationale
        if c.finish_reason == "length":
            if asked_rationale and parts.had_rationale_heading:
                # The answer itself is complete; only the rationale was cut.
                rationale = trim_to_sentence(rationale or "", min_chars=1) or rationale
            elif self.cfg.trim_truncated and (cut := trim_to_sentence(response)):
                response = cut
            else:
                raise Rejection(TRUNCATED, f"teacher stopped at the token limit after {len(response)} chars", "response")
        return check_response(response), rationale

    # -- baselines
    async def _baseline_mode(self, ctx: QueryTrace, q: Query) -> dict[str, Any]:
        msgs = prompts.direct_messages(q.text) if self.cfg.mode == "direct" else prompts.human_like_messages(q.text)
        c = await self._ask(ctx, "response", msgs, self.cfg.response_tokens)
        response, _ = self._finish(c, ResponseParts(c.text.strip(), None), asked_rationale=False)
        return {"response": response}

    # -- free mode, three requests
    async def _free(self, ctx: QueryTrace, q: Query) -> dict[str, Any]:
        c1 = await self._ask_whole(ctx, "cues", prompts.cue_messages(q.text), self.cfg.cue_tokens)
        cues = parse_cues(c1.text)
        c2 = await self._ask_whole(ctx, "traits", prompts.traits_messages(q.text, cues.social, cues.task),
                                   self.cfg.traits_tokens)
        choice = parse_traits(c2.text)
        p = self._activation(choice.poles)
        c3, parts = await self._answer(ctx, prompts.response_messages(q.text, cues.social, cues.task, choice.triples()),
                                       self.cfg.response_tokens, parse_response, _same)
        response, rationale = self._finish(c3, parts, asked_rationale=True)
        return self._persona_part(cues.social, cues.task, choice, p, response, rationale)

    async def _single(self, ctx: QueryTrace, q: Query) -> dict[str, Any]:
        c, full = await self._answer(ctx, prompts.single_call_messages(q.text),
                                     self.cfg.cue_tokens + self.cfg.traits_tokens + self.cfg.response_tokens,
                                     parse_full, lambda f: f.parts)
        p = self._activation(full.traits.poles)
        response, rationale = self._finish(c, full.parts, asked_rationale=True)
        return self._persona_part(full.cues.social, full.cues.task, full.traits, p, response, rationale)

    def _activation(self, poles: list[str]) -> list[int]:
        """``p`` for the chosen poles, under this run's rules (``allow_both_poles``)."""
        return activation_from_poles(poles, allow_both_poles=self.cfg.allow_both_poles)

    @staticmethod
    def _persona_part(social: str, task: str, choice: TraitChoice, p: list[int], response: str,
                      rationale: str | None) -> dict[str, Any]:
        return {
            "cues": {"social": social, "task": task},
            "traits": choice.poles,
            "trait_reasons": choice.as_json(),
            "p": p,
            "response": response,
            "rationale": rationale,
        }

    # -- constrained mode (small local teachers)
    async def _constrained(self, ctx: QueryTrace, q: Query) -> dict[str, Any]:
        t0 = time.perf_counter()
        params = self._params(min(self.cfg.cue_tokens, 40))  # one sentence
        cs, ct = await asyncio.gather(
            self._complete(prompts.local_cue_messages(q.text, "social"), params),
            self._complete(prompts.local_cue_messages(q.text, "task"), params),
        )
        ctx.timings["cues"] = time.perf_counter() - t0
        ctx.raw["cues"] = f"social: {cs.text}\ntask: {ct.text}"
        social, task = _one_sentence(cs.text), _one_sentence(ct.text)
        if not social or not task:
            raise Rejection(UNPARSEABLE, "teacher wrote no usable cue sentence", "cues")

        t0 = time.perf_counter()
        options = [prompts.pole_option_text(p) for p in TRAIT_POLES]
        (s_soc, s_task), base_soc, base_task = await asyncio.gather(
            asyncio.gather(
                self._score(prompts.pole_choice_messages(q.text, "social", social), options),
                self._score(prompts.pole_choice_messages(q.text, "task", task), options),
            ),
            self._content_free("social", options),
            self._content_free("task", options),
        )
        cal_soc = [a - b for a, b in zip(s_soc, base_soc, strict=True)]
        cal_task = [a - b for a, b in zip(s_task, base_task, strict=True)]
        soc_poles = _pick(cal_soc, self.cfg.poles_per_cue, exclude=set())
        task_poles = _pick(cal_task, self.cfg.poles_per_cue, exclude={_opposite(p) for p in soc_poles})
        ctx.timings["traits"] = time.perf_counter() - t0
        ctx.raw["scores"] = {
            "social": dict(zip(TRAIT_POLES, map(_r4, cal_soc), strict=True)),
            "task": dict(zip(TRAIT_POLES, map(_r4, cal_task), strict=True)),
        }
        ctx.raw["traits"] = f"social: {', '.join(soc_poles)}\ntask: {', '.join(task_poles)}"
        choice = TraitChoice(
            social=[(p, f"calibrated log-likelihood {cal_soc[TRAIT_POLES.index(p)]:+.3f}") for p in soc_poles],
            task=[(p, f"calibrated log-likelihood {cal_task[TRAIT_POLES.index(p)]:+.3f}") for p in task_poles],
        )
        p = self._activation(choice.poles)

        poles = choice.poles
        c3 = await self._ask(ctx, "response", prompts.local_response_messages(q.text, social, task, poles),
                             self.cfg.response_tokens)
        response, _ = self._finish(c3, ResponseParts(c3.text.strip(), None), asked_rationale=False)
        t0 = time.perf_counter()
        c4 = await self._complete(prompts.local_rationale_messages(response, poles), self._params(40))
        ctx.timings["response"] = (ctx.timings["response"] or 0.0) + time.perf_counter() - t0
        ctx.raw["rationale"] = c4.text
        rationale = _one_sentence(c4.text) if c4.finish_reason == "length" else c4.text.strip()
        return self._persona_part(social, task, choice, p, response, rationale or None)

    async def _content_free(self, kind: str, options: list[str]) -> list[float]:
        async with self._baseline_lock:
            if kind not in self._baseline:
                self._baseline[kind] = await self._score(prompts.pole_choice_messages("N/A", kind, "N/A"), options)
        return self._baseline[kind]


def _same(parts: ResponseParts) -> ResponseParts:
    return parts


def _r4(x: float) -> float:
    return round(float(x), 4)


def _opposite(pole: str) -> str:
    level, code = pole.split("_")
    return f"{'low' if level == 'high' else 'high'}_{code}"


def _pick(cal: list[float], k: int, exclude: set[str]) -> list[str]:
    """Best pole of each trait, traits ranked by score; the first always, more only if above zero."""
    best = []
    for t in TRAITS:
        cands = [p for p in (f"high_{t}", f"low_{t}") if p not in exclude]
        if cands:
            best.append(max(cands, key=lambda p: cal[TRAIT_POLES.index(p)]))
    best.sort(key=lambda p: -cal[TRAIT_POLES.index(p)])
    chosen = best[:1] + [p for p in best[1:k] if cal[TRAIT_POLES.index(p)] > 0]
    return [p for p in TRAIT_POLES if p in chosen]


_SENT = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)


def _one_sentence(text: str) -> str:
    s = re.sub(r"\s+", " ", text.strip().strip('"').strip())
    m = _SENT.match(s)
    out = m.group(1) if m else s
    return out.strip() if len(out.strip()) >= 8 else ""
