"""Persona-CoT prompting (the paper's training-free baseline): the model names cues and poles, then
answers; only the answer section is scored, a reply without one is the benchmark's unparsed answer,
and the reasoning gets its own budget on top of the benchmark's answer cap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tokenizer
from eval_support import FIXTURE_BENCHDATA, ChatServer
from personafuse.chat import Generation, RawPrompt
from personafuse.evaluation.cot_prompting import (
    REASONING_TOKENS,
    PersonaCoTPrompting,
    answer_section,
    instruction,
    with_instruction,
    with_persona_cot,
)
from personafuse.evaluation.runner import EvalConfig, RunMismatch, Runner
from personafuse.evaluation.subjects import OpenAISubject

STEPS = "Social Cue: the person wants a number.\nTask Cue: arithmetic.\nTraits:\n- High Conscientiousness: careful steps\n"


def test_only_the_answer_section_is_the_answer():
    reply = STEPS + "## Response: 12*5 = 60\nReasoning: 60-7 = 53\n#### 53"
    assert answer_section(reply) == "12*5 = 60\nReasoning: 60-7 = 53\n#### 53"  # heading-like lines stay in it
    assert answer_section(STEPS + "#### 53") == ""  # steps but no answer section: unparsed
    assert answer_section("#### 53") == ""  # no procedure at all: unparsed too
    assert answer_section(STEPS + "**Response:** B") == "B"


def test_the_instruction_follows_the_benchmarks_own_system_prompt():
    chat = with_instruction([{"role": "system", "content": "Answer with A-D."}, {"role": "user", "content": "Q?"}])
    assert chat[0]["content"].startswith("Answer with A-D.\n\n") and chat[0]["content"].endswith(instruction())
    assert [m["role"] for m in chat] == ["system", "user"]
    raw = with_instruction(RawPrompt("Question: 2+2?\nAnswer:"))
    assert raw == [{"role": "system", "content": instruction()}, {"role": "user", "content": "Question: 2+2?\nAnswer:"}]
    assert "High Agreeableness" in instruction() and "Low Neuroticism" in instruction()


class _Scripted:
    """A subject that returns fixed replies, recording what it was asked (the cap needs a tokenizer)."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.calls, self.tokenizer = replies, [], make_tokenizer()

    def generate(self, prompts, *, max_new_tokens, do_sample=False, temperature=None, seed=None):
        self.calls.append((prompts, max_new_tokens))
        return [Generation(r, {"high_C": 1.0}) for r in self.replies]

    def describe(self):
        return {"kind": "scripted"}


def test_the_reasoning_has_its_own_budget_and_the_answer_keeps_the_benchmarks_cap():
    inner = _Scripted([STEPS + "## Response: i am feel i am feel", STEPS])
    subject = PersonaCoTPrompting(inner, reasoning_tokens=100)
    gens = subject.generate(["hi", "there"], max_new_tokens=3)
    assert inner.calls[0][1] == 3 + 100
    assert [g.text for g in gens] == ["i am feel", ""]  # cut to 3 tokens; no section: empty
    assert gens[0].weights == {"high_C": 1.0} and gens[0].extra["persona_cot"].startswith("Social Cue:")
    assert subject.describe()["persona_cot_prompting"]["reasoning_tokens"] == 100
    assert with_persona_cot(inner, None) is inner
    with pytest.raises(ValueError, match="reasoning_tokens"):
        PersonaCoTPrompting(inner, -1)


def _cot_reply(messages, body):
    assert messages[0]["role"] == "system" and messages[0]["content"].endswith(instruction())
    user = messages[-1]["content"]
    if "rolls an hour" in user:
        return STEPS + "## Response: 12*5 = 60 and 60-7 = 53\n#### 53"
    if "helmet" in user:
        return STEPS + "The total is $1,300.\n#### 1,300"  # right number, but no answer section
    return STEPS + "## Response: I think 5."


def test_a_run_scores_the_answer_sections_and_keeps_the_whole_reply(tmp_path: Path):
    cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA), persona_cot=REASONING_TOKENS)
    with ChatServer(_cot_reply) as srv:
        res = Runner(cfg, lambda: with_persona_cot(OpenAISubject("m", base_url=srv.base_url, api_key="k"), cfg.persona_cot), progress=False).run()
        assert {b["max_tokens"] for b in srv.requests} == {256 + REASONING_TOKENS}
        assert all("messages" in b for b in srv.requests)  # GSM8K's raw completion became a chat
    assert res["benchmarks"]["gsm8k"]["score"] == pytest.approx(1 / 3)  # the "#### 1,300" outside a section does not count
    lines = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert [r["response"] for r in lines] == ["12*5 = 60 and 60-7 = 53\n#### 53", "", "I think 5."]
    assert all(r["persona_cot"].startswith("Social Cue:") for r in lines)
    assert res["subject"]["persona_cot_prompting"]["reasoning_tokens"] == REASONING_TOKENS
    # the directory holds Persona-CoT replies: a plain run may not resume it
    plain = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA))
    with pytest.raises(RunMismatch):
        Runner(plain, lambda: None, progress=False).run()
