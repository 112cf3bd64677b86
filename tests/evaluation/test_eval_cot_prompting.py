"""Persona-CoT prompting (the paper's training-free baseline): the evaluated model runs the data
pipeline's three steps as its own teacher (cues, traits, then the benchmark's own prompt with the
analysis in front); a failed or cut step is the benchmark's unparsed answer, counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_support import FIXTURE_BENCHDATA, ChatServer
from personafuse.chat import Generation, RawPrompt
from personafuse.evaluation.cot_prompting import (
    REASONING_TOKENS,
    PersonaCoTPrompting,
    item_text,
    with_analysis,
    with_persona_cot,
)
from personafuse.evaluation.runner import EvalConfig, RunMismatch, Runner
from personafuse.evaluation.subjects import OpenAISubject

CUES = '{"social_cue": "The person wants a number.", "task_cue": "Arithmetic with two steps."}'
TRAITS = '{"social": [{"pole": "High Agreeableness", "reason": "friendly"}], "task": [{"pole": "High Conscientiousness", "reason": "careful"}]}'


def test_the_analysis_precedes_the_benchmarks_prompt_in_its_own_form():
    chat = with_analysis([{"role": "system", "content": "Answer with A-D."}, {"role": "user", "content": "Q?"}], "ANALYSIS")
    assert chat == [{"role": "system", "content": "ANALYSIS\n\nAnswer with A-D."}, {"role": "user", "content": "Q?"}]
    assert with_analysis("Q?", "ANALYSIS") == [{"role": "system", "content": "ANALYSIS"}, {"role": "user", "content": "Q?"}]
    raw = with_analysis(RawPrompt("Question: 2+2?\nAnswer:"), "ANALYSIS")
    assert isinstance(raw, RawPrompt) and raw == "ANALYSIS\n\nQuestion: 2+2?\nAnswer:"  # still a raw completion
    assert item_text([{"role": "system", "content": "s"}, {"role": "user", "content": "the item"}]) == "the item"


class _Scripted:
    """A subject answering by step (recognised from the pipeline's own step prompts)."""

    name = "scripted"

    def __init__(self, cues=CUES, traits=TRAITS, cut=None):
        self.cues, self.traits, self.cut, self.calls = cues, traits, cut, []

    def generate(self, prompts, *, max_new_tokens, do_sample=False, temperature=None, seed=None):
        out = []
        for p in prompts:
            text = str(p) if isinstance(p, RawPrompt) else p[0]["content"]
            step = "cues" if '"social_cue"' in text else "traits" if "Trait Activation Theory" in text else "answer"
            self.calls.append((step, p, max_new_tokens))
            reply = {"cues": self.cues, "traits": self.traits, "answer": "B"}[step]
            out.append(Generation(reply, {"high_C": 1.0}, finish_reason="length" if step == self.cut else "stop"))
        return out

    def describe(self):
        return {"kind": "scripted"}


def test_three_steps_per_item_with_the_model_as_its_own_teacher():
    inner = _Scripted()
    gens = PersonaCoTPrompting(inner, reasoning_tokens=100).generate([RawPrompt("Q1\nAnswer:"), [{"role": "user", "content": "Q2"}]], max_new_tokens=3)
    assert [c[0] for c in inner.calls] == ["cues", "cues", "traits", "traits", "answer", "answer"]  # three requests per item
    assert [c[2] for c in inner.calls] == [100, 100, 100, 100, 3, 3]  # steps 1-2: the reasoning budget; step 3: the benchmark's cap
    raw, chat = inner.calls[4][1], inner.calls[5][1]
    assert isinstance(raw, RawPrompt) and raw.endswith("\n\nQ1\nAnswer:") and "High Conscientiousness: careful" in raw
    assert chat[0]["role"] == "system" and "Social cue: The person wants a number." in chat[0]["content"] and chat[1]["content"] == "Q2"
    assert [g.text for g in gens] == ["B", "B"] and gens[0].extra["persona_cot"]["failed_step"] is None
    assert gens[0].extra["persona_cot"]["cues"] == CUES


@pytest.mark.parametrize(("kw", "step"), [({"cues": "no idea"}, "cues"), ({"traits": "none"}, "traits"), ({"cut": "cues"}, "cues"),
                                          ({"cut": "traits"}, "traits")])
def test_a_failed_or_cut_step_is_an_unparsed_answer(kw, step):
    inner = _Scripted(**kw)
    (g,) = PersonaCoTPrompting(inner, reasoning_tokens=50).generate(["Q"], max_new_tokens=3)
    assert g.text == "" and g.extra["persona_cot"]["failed_step"] == step
    assert "answer" not in [c[0] for c in inner.calls]  # the benchmark's prompt is never sent
    with pytest.raises(ValueError, match="reasoning_tokens"):
        PersonaCoTPrompting(inner, 0)
    assert with_persona_cot(inner, None) is inner


def _reply(messages, body):
    text = messages[0]["content"]
    if '"social_cue"' in text:
        return CUES
    if "Trait Activation Theory" in text:
        return TRAITS if "helmet" not in messages[-1]["content"] else "I cannot say."
    assert "prompt" in body and body["prompt"].startswith("Situation analysis")  # GSM8K stays a raw completion
    return " 12*5 = 60 and 60-7 = 53\n#### 53" if "rolls an hour" in body["prompt"] else " 5"


def test_a_run_makes_three_requests_per_item_and_counts_failed_steps(tmp_path: Path):
    cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA), persona_cot=REASONING_TOKENS)
    with ChatServer(_reply) as srv:
        res = Runner(cfg, lambda: with_persona_cot(OpenAISubject("m", base_url=srv.base_url, api_key="k"), cfg.persona_cot), progress=False).run()
        n = res["benchmarks"]["gsm8k"]["n"]
        assert len(srv.requests) == 3 * n - 1  # the helmet item's traits step failed: no third request
    lines = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert sum(r["persona_cot"]["failed_step"] == "traits" for r in lines) == 1
    assert res["benchmarks"]["gsm8k"]["persona_cot_failed"] == {"traits": 1}
    assert res["benchmarks"]["gsm8k"]["score"] == pytest.approx(1 / n)
    assert res["subject"]["persona_cot_prompting"]["steps"] == ["cues", "traits", "answer"]
    plain = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA))
    with pytest.raises(RunMismatch):  # the directory holds Persona-CoT replies: a plain run may not resume it
        Runner(plain, lambda: None, progress=False).run()
