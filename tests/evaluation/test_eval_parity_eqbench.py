"""Parity of EQ-Bench with its reference, EQ-bench/EQ-Bench@d28c60c (MIT), and lm-eval's eq_bench scorer.

Expected outcomes below were derived by hand from the reference: lib/scoring.py ``parse_answers``
(``(\\w+):\\s+(\\d+)``, dict of all pairs: later duplicates win, nothing stripped),
``calculate_score`` (exactly 4 pairs naming the reference emotions exactly; all-zero -> None) and
``calculate_score_fullscale``; lib/eq_bench_utils.py ``process_question`` (an answer counts only if
the v1 ``calculate_score`` on ``reference_answer`` is not None, in every version; else retried, and
dropped after the last attempt); lib/scoring.py ``calculate_eq_bench_score`` (100 × mean/10 over
counted items); lib/run_bench.py (60 questions = v1; under 83.33 % parseable = FAILED).
``score_lm_eval``: lm_eval/tasks/eq_bench/utils.py ``calculate_score_fullscale`` (lm-eval 0.4.13).
The transcription below (reference functions, MIT licence, Samuel J. Paech) runs beside ours.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from eval_support import ChatServer, real_benchdata
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.data import DataError

CTX = ScoreContext()
REAL = real_benchdata()


# ---- transcription of EQ-bench/EQ-Bench@d28c60c lib/scoring.py (non-revise path) ---------------
def ref_parse_answers(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+):\s+(\d+)", text))


def ref_calculate_score(reference: dict, user: dict) -> float | None:
    if len(user.items()) != 4:
        return None
    emotions_dict = {e: True for e in user for i in range(1, 5) if e == reference[f"emotion{i}"]}
    if len(emotions_dict) != 4:
        return None
    total = sum(float(s) for s in user.values())
    if total <= 0:
        return None
    user = {e: float(s) / total * 10 for e, s in user.items()}
    tally = sum(abs(s - reference[f"emotion{i}_score"]) for e, s in user.items() for i in range(1, 5) if e == reference[f"emotion{i}"])
    return 10 - tally


def ref_calculate_score_fullscale(reference: dict, user: dict) -> float | None:
    if len(user.items()) != 4:
        return None
    emotions_dict = {e: True for e in user for i in range(1, 5) if e == reference[f"emotion{i}"]}
    if len(emotions_dict) != 4:
        return None
    tally = 0.0
    for e, s in user.items():
        for i in range(1, 5):
            if e == reference[f"emotion{i}"]:
                d = abs(float(s) - float(reference[f"emotion{i}_score"]))
                tally += 0 if d == 0 else (6.5 * (1 / (1 + math.e ** (-1.2 * (d - 4)))) if d <= 5 else d)
    return 10 - tally * 0.7477


def ref_item(q: dict, reply: str) -> float | None:
    """process_question for one attempt (REVISE off): the fullscale score if the answer counts."""
    ans = ref_parse_answers(reply)
    if ref_calculate_score(q["reference_answer"], ans) is None:
        return None
    return ref_calculate_score_fullscale(q["reference_answer_fullscale"], ans)


# ---- fixture: two made-up questions in the official format, 23 canned replies -----------------
def _ref(names: list[str], scores: list[int | str]) -> dict:
    return {**{f"emotion{i + 1}": n for i, n in enumerate(names)}, **{f"emotion{i + 1}_score": s for i, s in enumerate(scores)}}


Q1 = ["Hurt", "Amused", "Indifferent", "Suspicious"]
Q2 = ["Relieved", "Grateful", "Anxious", "Angry"]
QUESTIONS = {
    "1": {"prompt": "P1 " + ", ".join(Q1), "reference_answer": _ref(Q1, [6, 0, 0, 4]), "reference_answer_fullscale": _ref(Q1, ["8", 0, "1", "6"])},
    "2": {"prompt": "P2 " + ", ".join(Q2), "reference_answer": _ref(Q2, [5, 3, 2, 0]), "reference_answer_fullscale": _ref(Q2, ["7", "5", "3", 0])},
}


def f(d: float) -> float:  # the fullscale difference curve, from lib/scoring.py
    return 0.0 if d == 0 else (6.5 / (1 + math.exp(-1.2 * (d - 4))) if d <= 5 else d)


def v2(ds: list[float]) -> float:
    return 10 - 0.7477 * sum(f(d) for d in ds)


def ans(names: list[str], vals: list[int], sep: str = "\n") -> str:
    return sep.join(f"{n}: {v}" for n, v in zip(names, vals, strict=True))


# (question, reply, counts for the reference, item score 0–10 if it counts, lm-eval's eqbench 0–100)
CASES = [
    ("1", ans(Q1, [8, 0, 1, 6]), True, 10.0, 100.0),
    ("1", ans(Q1, [7, 0, 3, 6]), True, v2([1, 0, 2, 0]), 10 * v2([1, 0, 2, 0])),
    ("1", "**Hurt**: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6", False, None, 0.0),  # "Hurt**:" is no pair
    ("1", "hurt: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6", False, None, 0.0),  # names are case sensitive
    ("1", ans(Q1, [0, 0, 0, 0]), False, None, 10 * v2([8, 0, 1, 6])),  # all zero: v1 refuses, lm-eval scores
    ("1", "Hurt: 8\nAmused: 0\nIndifferent: 1", False, None, 0.0),
    ("1", ans(Q1, [8, 0, 1, 6]) + "\nNote: 1", False, None, 0.0),  # five pairs
    ("1", "Hurt: 8\n" + ans(Q1, [7, 0, 1, 6]), True, v2([1, 0, 0, 0]), 10 * v2([1, 0, 0, 0])),  # last Hurt wins
    ("1", "Hurt:8\nAmused: 0\nIndifferent: 1\nSuspicious: 6", False, None, 0.0),  # \s+ needs a space
    ("1", "Hurt: 8/10\nAmused: 0/10\nIndifferent: 1/10\nSuspicious: 6/10", True, 10.0, 100.0),
    ("1", "Hurt: 8.5\nAmused: 0\nIndifferent: 1\nSuspicious: 6", True, 10.0, 100.0),  # digits only: 8
    ("1", "First pass scores:\n" + ans(Q1, [2, 2, 2, 2]) + "\nRevised scores:\n" + ans(Q1, [8, 0, 1, 6]), True, 10.0, 100.0),
    ("1", ans(Q1, [8, 0, 1, 6], "\n\n"), True, 10.0, 100.0),
    ("1", "Hurt:\n8\nAmused: 0\nIndifferent: 1\nSuspicious: 6", True, 10.0, 100.0),  # \s+ spans the newline
    ("1", "", False, None, 0.0),
    ("1", "I cannot answer that.", False, None, 0.0),
    ("1", ans(Q1, [10, 10, 10, 10]), True, v2([2, 10, 9, 4]), 10 * v2([2, 10, 9, 4])),  # below zero
    ("1", ans(Q1, [3, 3, 3, 3]), True, v2([5, 3, 2, 3]), 10 * v2([5, 3, 2, 3])),
    ("1", "Emotion scores - " + ans(Q1, [8, 0, 1, 6], ", "), True, 10.0, 100.0),
    ("2", ans(Q2, [7, 5, 3, 0]), True, 10.0, 100.0),
    ("2", ans(Q2, [5, 3, 2, 0]), True, v2([2, 2, 1, 0]), 10 * v2([2, 2, 1, 0])),  # the v1 refs, v2-scored
    ("2", ans(Q2, [7, 5, 3, 0]) + "\nSad: 2", False, None, 0.0),
    ("2", "Reasoning: 5 is high.\n" + ans(Q2, [7, 5, 3, 0]), False, None, 0.0),
]


def _file(tmp_path: Path) -> Path:
    p = tmp_path / "eq_bench_v2_questions_171.json"
    p.write_text(json.dumps(QUESTIONS))
    return p


def test_eqbench_item_by_item_parity(tmp_path: Path) -> None:
    from lm_eval.tasks.eq_bench.utils import calculate_score_fullscale as lm_score

    assert len(CASES) >= 20
    b = get_benchmark("eqbench")
    items = {i.id: i for i in b.load(_file(tmp_path))}
    recs = []
    for qid, reply, counts, item_score, lm in CASES:
        rec = b.score_item(items[qid], [reply], CTX)
        ref = ref_item(QUESTIONS[qid], reply)
        assert (rec["score"] is not None, ref is not None) == (counts, counts), reply
        if counts:
            assert rec["score"] == pytest.approx(item_score) and ref == pytest.approx(item_score), reply
        assert b.needs_retry({"id": qid, **rec}) is (not counts)
        doc = {"reference_answer_fullscale": repr(QUESTIONS[qid]["reference_answer_fullscale"])}
        assert rec["lm_eval_eqbench"] == pytest.approx(lm) and lm_score(doc, [reply])["eqbench"] == pytest.approx(lm), reply
        recs.append({"id": qid, **rec})
    agg = b.aggregate(recs)
    counted = [c[3] for c in CASES if c[2]]
    assert agg["score"] == pytest.approx(100 * sum(counted) / len(counted) / 10)
    assert agg["parseable"] == len(counted) and agg["percent_parseable"] == pytest.approx(round(100 * len(counted) / len(CASES), 2))
    assert agg["failed"] is (len(counted) / len(CASES) < 0.8333)
    assert agg["score_lm_eval"] == pytest.approx(sum(c[4] for c in CASES) / len(CASES))
    xs = [10 * x for x in counted]
    m = sum(xs) / len(xs)
    assert agg["stderr"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)))


# ---- the request, from EQ-bench/EQ-Bench@d28c60c ----------------------------------------------
def ref_remove_revision_instructions(prompt: str) -> str:
    """lib/run_bench_helper_functions.py:129-135 (language 'en'), transcribed."""
    prompt = prompt.replace(" Then critique your answer by thinking it through step by step. Finally, give your revised scores.", "")
    prompt = prompt.replace("First pass scores:\n", "")
    prompt = prompt[: prompt.find("Critique: <your critique here>")] + "\n" + prompt[prompt.find("[End of answer]") :]
    return prompt + "\nYour answer:\n"


# instruction-templates/ChatML.yaml as lib/run_query.py:270-284 parse_yaml reads it (SmolLM2's and
# Qwen's format), and lib/run_query.py:286-301 generate_prompt_from_template with its
# default_system_message (line 289), which run_query's transformers path (:317-323) and
# run_llamacpp_query (:54-56) send.
CHATML = {"user": "user", "bot": "assistant",
          "turn_template": "<|im_start|><|user|>\n<|user-message|><|im_end|>\n<|im_start|><|bot|>\n<|bot-message|><|im_end|>\n",
          "context": "<|im_start|>system\n<|system-message|><|im_end|>\n"}  # fmt: skip


def ref_generate_prompt_from_template(prompt: str, template: dict) -> str:
    default_system_message = "You are an expert in emotional analysis."
    context = template["context"]
    if "<|system-message|>" in template["context"]:
        if "system_message" in template and template["system_message"].strip():
            context = context.replace("<|system-message|>", template["system_message"])
        else:
            context = context.replace("<|system-message|>", default_system_message)
    turn_template = template["turn_template"].replace("<|user|>", template["user"]).replace("<|bot|>", template["bot"])
    formatted_prompt = (context + turn_template).split("<|bot-message|>")[0]
    return formatted_prompt.replace("<|user-message|>", prompt)


def _v2_file() -> Path:
    from eval_support import FIXTURE_BENCHDATA

    real = REAL / "eq-bench" / "eq_bench_v2_questions_171.json" if REAL else None
    return real if real and real.is_file() else FIXTURE_BENCHDATA / "eq-bench" / "eq_bench_fixture_questions.json"


def test_request_for_one_real_item_is_the_references(tmp_path: Path) -> None:
    """What the runner sends for the file's first question. OpenAI-compatible endpoint:
    lib/eq_bench_utils.py:38 cuts the prompt, :48 run_query(..., history=[], COMPLETION_TOKENS=60
    (:6), temp) with temp 0.01 (:42), +0.15 a retry (:127); lib/run_query.py:216 messages =
    history + [user turn], :227-232 chat.completions.create(model, temperature, max_tokens,
    messages). Ours differs in one listed way: the first attempt is greedy (temperature 0)."""
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    qid, q = next(iter(json.loads(_v2_file().read_text()).items()))
    data = tmp_path / "one.json"
    data.write_text(json.dumps({qid: q}))  # the real file's first question, alone
    want = [{"role": "user", "content": ref_remove_revision_instructions(q["prompt"])}]
    with ChatServer(lambda m, b: "no scores") as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["eqbench"], out=str(tmp_path / "run"), data=str(data))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
    mine = [r for r in srv.requests if r["messages"] == want]
    assert len(mine) == 3, [r["messages"] for r in srv.requests]  # the item, then 2 retries (n_question_attempts=3)
    assert [(r["max_tokens"], round(r["temperature"], 2)) for r in mine] == [(60, 0.0), (60, 0.16), (60, 0.31)]
    assert set(mine[0]) == {"model", "messages", "max_tokens", "temperature"}


def test_local_subject_gets_the_official_local_prompt(tmp_path: Path) -> None:
    """A local subject (here the embedded SmolLM2, a ChatML model) receives, through its chat
    template, exactly the text the official transformers/llama.cpp path builds: the ChatML template
    with the default system message "You are an expert in emotional analysis."."""
    from personafuse.embedded import load_tokenizer, resolve

    data = _v2_file()
    q = next(iter(json.loads(data.read_text()).values()))
    want = ref_generate_prompt_from_template(ref_remove_revision_instructions(q["prompt"]), CHATML)
    tok = load_tokenizer(resolve("default"))
    b = get_benchmark("eqbench", {"subject": {"model": "default"}})
    item = b.load(data)[0]
    assert tok.apply_chat_template(b.send(item.prompt), tokenize=False, add_generation_prompt=True) == want
    assert b.protocol()["system_prompt"] == "You are an expert in emotional analysis."
    remote = get_benchmark("eqbench", {"subject": {"model": "openai:gpt-4o"}})
    assert remote.load(data)[0].prompt == ref_remove_revision_instructions(q["prompt"])  # no system turn
    own = get_benchmark("eqbench", {"subject": {"model": "default", "system_prompt": "Be brief."}})
    assert own.system is None and own.protocol()["system_prompt_source"].startswith("--system-prompt")


def test_eqbench_prompt_cut_as_remove_revision_instructions(tmp_path: Path) -> None:
    full = ("Intro. Then critique your answer by thinking it through step by step. Finally, give your revised scores.\n\n"
            "First pass scores:\nA: <score>\n\nCritique: <your critique here>\n\nRevised scores:\nA: <revised score>\n\n[End of answer]\n\nRemember.")
    q = {"1": {**QUESTIONS["1"], "prompt": full}}
    p = tmp_path / "q.json"
    p.write_text(json.dumps(q))
    # Hand-applied remove_revision_instructions (lib/run_bench_helper_functions.py, language "en").
    want = "Intro.\n\nA: <score>\n\n\n[End of answer]\n\nRemember.\nYour answer:\n"
    assert get_benchmark("eqbench").load(p)[0].prompt == want
    assert get_benchmark("eqbench", {"revise": True}).load(p)[0].prompt == full


@pytest.mark.skipif(REAL is None, reason="../shared/benchdata not present")
def test_real_files_v2_only_on_the_v2_file_and_v1_on_v1() -> None:
    d = REAL / "eq-bench"
    assert len(get_benchmark("eqbench").load(d)) == 171  # the folder gives the v2 file for v2
    with pytest.raises(DataError, match="eq_bench_v1_questions_60.json.*v1 questions file"):
        get_benchmark("eqbench").load(d / "eq_bench_v1_questions_60.json")
    with pytest.raises(DataError, match="eq_bench_v2_questions_171.json.*cannot give EQ-Bench v1"):
        get_benchmark("eqbench", {"version": "v1"}).load(d / "eq_bench_v2_questions_171.json")
    v1 = get_benchmark("eqbench", {"version": "v1"}).load(d)
    assert len(v1) == 60 and all("Critique" in it.prompt for it in v1)  # v1 keeps its full prompt
    from personafuse.evaluation.lm_eval_tasks import eq_bench_local

    with pytest.raises(DataError, match="v1 questions file"):
        eq_bench_local.load(eq_bench_file=str(d / "eq_bench_v1_questions_60.json"))


@pytest.mark.skipif(REAL is None, reason="../shared/benchdata not present")
def test_runner_scores_v2_on_171_items_with_the_retry_rule(tmp_path: Path) -> None:
    from personafuse.evaluation.runner import EvalConfig, Runner, read_records
    from personafuse.evaluation.subjects import OpenAISubject

    data = REAL / "eq-bench" / "eq_bench_v2_questions_171.json"
    refs = {q["prompt"]: q["reference_answer_fullscale"] for q in json.loads(data.read_text()).values()}
    cut = {get_benchmark("eqbench").load(data)[i].prompt: r for i, r in enumerate(refs.values())}

    def reply(messages: list[dict], body: dict) -> str:
        ref = cut[messages[-1]["content"]]
        if body.get("temperature", 0) < 0.1 and "Robert" in messages[-1]["content"]:
            return "**" + ref["emotion1"] + "**: 3"  # unparseable at first: retried at 0.16
        return "\n".join(f"{ref[f'emotion{i}']}: {int(float(ref[f'emotion{i}_score']))}" for i in range(1, 5))

    with ChatServer(reply) as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["eqbench"], out=str(tmp_path), data=str(data))
        res = Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
        assert {r["max_tokens"] for r in srv.requests} == {60}
    eq = res["benchmarks"]["eqbench"]
    assert eq["n_items"] == 171 and eq["score"] == pytest.approx(100.0) and eq["parseable"] == 171 and not eq["failed"]
    recs = read_records(tmp_path / "eqbench.jsonl")
    assert len(recs) == 171 and all("response" in r and "id" in r for r in recs.values())
    assert any(r["attempts"] == 2 for r in recs.values())
