"""Judges: verdict parsers, Bradley–Terry on constructed tables, and the whole judge path against a
real OpenAI-compatible HTTP server on loopback that returns good and malformed verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval_support import FIXTURE_BENCHDATA, ChatServer
from personafuse.evaluation.judges import (
    CONTINUE_PROMPT,
    ArenaJudgeConfig,
    Battle,
    MentalJudgePrompt,
    battles_from_verdict,
    bootstrap_win_rate,
    bradley_terry,
    parse_arena_verdict,
    parse_mental_verdict,
    win_rate,
)
from personafuse.evaluation.runner import EvalConfig, Runner
from personafuse.evaluation.subjects import OpenAISubject

# The single-mental-v1 output format: "Rating: [[n]]" and "[consultation metric]: [[n]]".
GOOD_MENTAL = "Short explanation.\nRating: [[7]]\nActive Listening: [[7]]\nEmpathy & Validation: [[8]]\nSafety & Trustworthiness: [[9]]\nOpen-mindedness & Non-judgment: [[8]]\nClarity & Encouragement: [[6]]\nBoundaries & Ethical: [[7]]\nHolistic Approach: [[5]]"
ARENA_CFG = ArenaJudgeConfig.from_yaml(FIXTURE_BENCHDATA / "arena-hard-v0.1" / "judge_config.yaml")
MENTAL_PROMPT = MentalJudgePrompt.from_judgment_file(FIXTURE_BENCHDATA / "mentalchat16k" / "model_judgment" / "gpt-4_single.jsonl")


def test_parse_arena_verdict() -> None:
    rx = ARENA_CFG.regex_pattern  # read from judge_config.yaml, as gen_judgment.py does
    assert parse_arena_verdict("reasoning...\nMy final verdict is [[B>A]]", rx) == "B>A"
    assert parse_arena_verdict("[[A>>B]] ... as said, [[A>>B]]", rx) == "A>>B"
    assert parse_arena_verdict("[[A>B]] or maybe [[B>A]]", rx) is None  # disagreeing labels
    assert parse_arena_verdict("A is better", rx) is None
    assert parse_arena_verdict("[[C>A]]", rx) is None
    assert parse_arena_verdict("[[ A>B ]]", rx) is None  # the reference's regex allows no spaces
    assert parse_arena_verdict("[[A<B]]", rx) == "A<B"  # matched, though no battle label (see battles)
    assert battles_from_verdict("m", "base", "A<B", model_is_a=True, group="q") == []


def test_parse_mental_verdict() -> None:
    v = parse_mental_verdict(GOOD_MENTAL, MENTAL_PROMPT.metrics)
    assert v["overall"] == 7 and v["holistic"] == 5 and v["boundaries"] == 7 and v["rating_labelled"] == 7
    assert set(v) == {"active_listening", "empathy", "safety", "open_mindedness", "clarity", "boundaries", "holistic", "overall", "rating_labelled"}
    # No [[n]] or [n] at all: the reference's -1 (here None, left out of the mean).
    assert parse_mental_verdict("Rating: 7, Empathy: 8", MENTAL_PROMPT.metrics)["overall"] is None
    # A missing metric line leaves only that metric unrated.
    w = parse_mental_verdict(GOOD_MENTAL.replace("Holistic Approach: [[5]]", ""), MENTAL_PROMPT.metrics)
    assert w["holistic"] is None and w["empathy"] == 8
    bold = parse_mental_verdict(GOOD_MENTAL.replace("Empathy & Validation:", "**Empathy & Validation:**"), MENTAL_PROMPT.metrics)
    assert bold["empathy"] == 8  # markdown bold around the name


def test_bradley_terry_two_players_matches_closed_form() -> None:
    # Weighted table, model vs baseline: 2 strong wins (×3), 3 wins, 4 ties, 5 losses, 1 strong loss (×3).
    # Wins = 6 + 3 + 4/2 = 11 out of 6 + 3 + 4 + 5 + 3 = 21 → win rate 11/21.
    battles = []
    battles += battles_from_verdict("m", "base", "B>>A", model_is_a=False, group="q1") * 2
    battles += battles_from_verdict("m", "base", "A>B", model_is_a=True, group="q2") * 3
    battles += battles_from_verdict("m", "base", "A=B", model_is_a=True, group="q3") * 4
    battles += battles_from_verdict("m", "base", "A>B", model_is_a=False, group="q4") * 5
    battles += battles_from_verdict("m", "base", "A>>B", model_is_a=False, group="q5")
    assert battles_from_verdict("m", "base", None, model_is_a=True, group="q6") == []
    r = bradley_terry(battles, anchor="base")
    assert r["base"] == pytest.approx(1000.0)
    assert win_rate(r, "m", "base") == pytest.approx(11 / 21, abs=1e-8)


def test_bradley_terry_three_players_satisfies_likelihood_equations() -> None:
    table = {("a", "b"): (7, 3), ("b", "c"): (6, 4), ("a", "c"): (8, 2)}
    battles = []
    for (x, y), (wx, wy) in table.items():
        battles += [Battle(x, y, "a")] * wx + [Battle(x, y, "b")] * wy
    r = bradley_terry(battles, anchor="c")
    p = {k: 10 ** ((v - 1000) / 400) for k, v in r.items()}
    # At the MLE each player's expected wins equal its observed wins.
    for i in "abc":
        observed = sum(wx if x == i else wy for (x, y), (wx, wy) in table.items() if i in (x, y))
        expected = sum((wx + wy) * p[i] / (p[i] + p[y if x == i else x]) for (x, y), (wx, wy) in table.items() if i in (x, y))
        assert expected == pytest.approx(observed, abs=1e-6)
    assert r["a"] > r["b"] > r["c"] == pytest.approx(1000.0)


def test_bootstrap_interval_brackets_the_estimate() -> None:
    battles = [Battle("m", "base", "a" if i % 3 else "b", 1.0, f"q{i}") for i in range(60)]
    bt = bootstrap_win_rate(battles, "m", "base", rounds=50, seed=1)
    assert bt["win_rate"] == pytest.approx(40 / 60)
    assert bt["ci_low"] < bt["win_rate"] < bt["ci_high"] and bt["rounds"] == 50
    assert bootstrap_win_rate(battles, "m", "base", rounds=50, seed=1) == bt  # seeded


def _reply(messages: list[dict[str, str]], body: dict) -> str:
    """Model answers, then judge verdicts: the arena judge prefers the model on q1 (both orders),
    rambles without a label on q2's games (also when asked to continue), and the mental judge is
    malformed on one question."""
    user = messages[-1]["content"]
    if user == CONTINUE_PROMPT:
        return "Still hard to say."
    if "<|User Prompt|>" in user:
        if "soft yolk" in user:
            model_first = user.index("MODEL-ANSWER") < user.index("six minutes")
            return "Thinking...\nMy verdict: [[A>B]]" if model_first else "[[B>>A]]"
        return "Both answers look fine to me, hard to say."  # no label: the reference asks again
    if "[The Start of Assistant's Answer]" in user:
        if "lonely" in user:
            return "I would rate it highly overall."  # malformed
        return GOOD_MENTAL
    return "MODEL-ANSWER for: " + user[:40]


def test_judge_path_over_loopback_http(tmp_path: Path) -> None:
    with ChatServer(_reply) as srv:
        cfg = EvalConfig(model="openai:subject", benchmarks=["arenahard", "mentalchat"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA), judge="openai:judge", options={"arenahard": {"bootstrap": 20}})
        runner = Runner(
            cfg,
            lambda: OpenAISubject("subject", base_url=srv.base_url, api_key="k"),
            judge_factory=lambda: OpenAISubject("judge", base_url=srv.base_url, api_key="k"),
            progress=False,
        )
        res = runner.run()
        requests = list(srv.requests)
    arena = res["benchmarks"]["arenahard"]
    # q1: model wins both games (one strong ×3, one slight) → 4 weighted wins; q2: both unparseable.
    assert arena["n_unparseable_verdicts"] == 2 and arena["n_games"] == 4 and arena["n_battles"] == 4
    assert arena["score"] == pytest.approx(100.0)
    mental = res["benchmarks"]["mentalchat"]
    assert mental["n_unparseable_verdicts"] == 1 and mental["n_judged"] == 1
    assert mental["score"] == 7 and mental["empathy"] == 8
    # 2 + 2 subject answers, 4 arena games + 2 "continue" attempts for q2's label-less games, 2 mental.
    assert len(requests) == 12
    # MentalChat16K's answers are raw completions in the authors' Alpaca prompt (issue 31); the rest is chat.
    raw = [r for r in requests if "messages" not in r]
    assert len(raw) == 2 and all(r["prompt"].startswith("Below is an instruction") and r["prompt"].endswith("### Response: ") for r in raw)
    requests = [r for r in requests if "messages" in r]
    cont = [r for r in requests if r["messages"][-1]["content"] == CONTINUE_PROMPT]
    assert len(cont) == 2 and all(r["messages"][-2] == {"role": "assistant", "content": "Both answers look fine to me, hard to say."} for r in cont)
    judged = [r for r in requests if r["messages"][0]["role"] == "system"]
    assert all(r["max_tokens"] == 4096 and r["temperature"] == 0 for r in judged if "<|User Prompt|>" in r["messages"][1]["content"])
    assert all(r["max_tokens"] == 2048 for r in judged if "[Question]" in r["messages"][1]["content"])
    recs = [json.loads(x) for x in (tmp_path / "run" / "arenahard.jsonl").read_text().splitlines()]
    assert recs[1]["parsed"] is None and recs[1]["score"] is None and len(recs[1]["judge_raw"]) == 2
    assert recs[1]["judge_attempts"] == [2, 2] and recs[0]["judge_attempts"] == [1, 1]
    assert recs[0]["parsed"] == {"baseline_first": "B>>A", "model_first": "A>B"}


def test_missing_judge_is_a_clear_error(tmp_path: Path) -> None:
    with ChatServer(_reply) as srv:
        cfg = EvalConfig(model="openai:s", benchmarks=["mentalchat"], out=str(tmp_path), data=str(FIXTURE_BENCHDATA))
        runner = Runner(cfg, lambda: OpenAISubject("s", base_url=srv.base_url), progress=False)
        with pytest.raises(RuntimeError, match="needs an LLM judge"):
            runner.run()


def test_win_rate_extremes() -> None:
    r = bradley_terry([Battle("m", "base", "b")] * 3, anchor="base")
    assert r["m"] == -math.inf and win_rate(r, "m", "base") == 0.0


def test_local_hf_judge_garbage_is_counted_not_guessed(tmp_path: Path) -> None:
    import torch

    from eval_support import make_tiny_llama
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    torch.set_num_threads(1)
    judge_dir = make_tiny_llama(tmp_path / "judge")  # random weights: never a valid verdict
    with ChatServer(_reply) as srv:
        cfg = EvalConfig(model="openai:subject", benchmarks=["arenahard", "mentalchat"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA), judge=f"hf:{judge_dir}", options={"arenahard": {"judge_max_tokens": 8}, "mentalchat": {"judge_max_tokens": 8}})
        res = Runner(
            cfg,
            lambda: OpenAISubject("subject", base_url=srv.base_url),
            judge_factory=lambda: load_subject(f"hf:{judge_dir}", SubjectOptions(batch_size=4)),
            progress=False,
        ).run()
    arena, mental = res["benchmarks"]["arenahard"], res["benchmarks"]["mentalchat"]
    assert arena["n_unparseable_verdicts"] == 4 and arena["score"] is None
    assert mental["n_unparseable_verdicts"] == 2 and mental["score"] is None
