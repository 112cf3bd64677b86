"""Parity of the judged benchmarks with their references, on canned judge replies served by a real
OpenAI-compatible HTTP server on loopback.

Arena-Hard-Auto v0.1: lmarena/arena-hard-auto@3071ef95d913bb5cd632641db336a3b6c7fe4bdd (the last v0.1
code; config/judge_config.yaml as in release 7f1b7f5dd6ce53e1f8530220ceb452b7019a8056), Apache-2.0.
MentalChat16K: the judge harness of ChiaPatricia/MentalChat16K_Main@9eb19df's records, lm-sys/FastChat
@v0.2.32 (dd84d166d7694f0cc0c766e5a811d995f5801c77), fastchat/llm_judge, Apache-2.0.

Each fixture's expected outcomes were derived by hand, following the cited functions step by step;
the transcriptions below (``ref_*``) then run on the same replies and must agree item by item.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from eval_support import FIXTURE_BENCHDATA, ChatServer, real_benchdata
from personafuse.evaluation.benchmarks import get_benchmark
from personafuse.evaluation.judges import CONTINUE_PROMPT, ArenaJudgeConfig, MentalJudgePrompt
from personafuse.evaluation.runner import EvalConfig, Runner
from personafuse.evaluation.subjects import OpenAISubject

REAL = real_benchdata()


# =============================================================================================
# Transcriptions of the reference code (Apache-2.0; comments mark what was left out).
# =============================================================================================
def ref_get_score(judgment: str, pattern: re.Pattern[str], pairwise: bool = True) -> Any:
    """lmarena/arena-hard-auto@3071ef9 gen_judgment.py:get_score (verbatim logic)."""
    matches = pattern.findall(judgment)
    matches = [m for m in matches if m != ""]
    if len(set(matches)) == 0:
        return None, True
    elif len(set(matches)) == 1:
        if pairwise:
            return matches[0].strip("\n"), False
        return int(matches[0])
    else:
        return None, False


def ref_judge_game(configs: dict[str, Any], question: str, answer_1: str, answer_2: str, get_answer: Any) -> tuple[list[dict[str, str]], str, Any]:
    """gen_judgment.py:judgment, one game: the conversation and attempt loop (file output left out;
    ``get_answer(conv)`` stands for the API call)."""
    pattern = re.compile(configs["regex_pattern"])
    conv = [{"role": "system", "content": configs["system_prompt"]}]
    for template in configs["prompt_template"]:
        prompt_args = {"question_1": question, "answer_1": answer_1, "answer_2": answer_2}
        conv.append({"role": "user", "content": template.format(**prompt_args)})
    first = [dict(m) for m in conv]
    judgment = ""
    score = None
    for _ in range(configs.get("number_of_judgment_attempts", 2)):
        new_judgment = get_answer(conv)
        judgment += "\n" + new_judgment
        score, try_again = ref_get_score(judgment, pattern)
        conv.append({"role": "assistant", "content": new_judgment})
        if not try_again:
            break
        conv.append({"role": "user", "content": "continue your judgment and finish by outputting a final verdict label"})
    return first, judgment, score


def ref_get_battles_from_row(row: dict[str, Any], first_game_only: bool, multiplier: int, baseline_model: str) -> list[dict[str, Any]]:
    """show_result.py:get_battles_from_row without style-control metadata."""
    results = []
    output = {"question_id": row["question_id"], "model_a": baseline_model, "model_b": row["model"]}
    game = row["games"][0]
    weight = 1
    if game["score"] == "A=B":
        output["winner"] = "tie"
    elif game["score"] == "A>B":
        output["winner"] = "model_a"
    elif game["score"] == "A>>B":
        output["winner"] = "model_a"
        weight = multiplier
    elif game["score"] == "B>A":
        output["winner"] = "model_b"
    elif game["score"] == "B>>A":
        output["winner"] = "model_b"
        weight = multiplier
    else:
        weight = 0
    if weight:
        results += [output] * weight
    if first_game_only:
        return results
    output = {"question_id": row["question_id"], "model_a": baseline_model, "model_b": row["model"]}
    game = row["games"][1]
    weight = 1
    if game["score"] == "A=B":
        output["winner"] = "tie"
    elif game["score"] == "A>B":
        output["winner"] = "model_b"
    elif game["score"] == "A>>B":
        output["winner"] = "model_b"
        weight = multiplier
    elif game["score"] == "B>A":
        output["winner"] = "model_a"
    elif game["score"] == "B>>A":
        output["winner"] = "model_a"
        weight = multiplier
    else:
        weight = 0
    if weight:
        results += [output] * weight
    return results


def ref_compute_mle_elo(df: Any, SCALE: int = 400, BASE: int = 10, INIT_RATING: int = 1000, baseline_model: str = "gpt-4-0314") -> Any:  # noqa: N803
    """utils_math.py:compute_mle_elo (sklearn's unpenalised logistic regression)."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    models = pd.concat([df["model_a"], df["model_b"]]).unique()
    models = pd.Series(np.arange(len(models)), index=models)
    df = pd.concat([df, df], ignore_index=True)
    p = len(models.index)
    n = df.shape[0]
    X = np.zeros([n, p])  # noqa: N806
    X[np.arange(n), models[df["model_a"]]] = +math.log(BASE)
    X[np.arange(n), models[df["model_b"]]] = -math.log(BASE)
    Y = np.zeros(n)  # noqa: N806
    Y[df["winner"] == "model_a"] = 1.0
    tie_idx = ((df["winner"] == "tie") | (df["winner"] == "tie (bothbad)")).to_numpy().copy()
    tie_idx[len(tie_idx) // 2 :] = False
    Y[tie_idx] = 1.0
    try:  # penalty=None in the reference; newer scikit-learn spells "no penalty" C=inf
        lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-8)
    except TypeError:  # pragma: no cover
        lr = LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8)
    lr.fit(X, Y)
    elo_scores = SCALE * lr.coef_[0] + INIT_RATING
    if baseline_model in models.index:
        elo_scores += 1000 - elo_scores[models[baseline_model]]
    return pd.Series(elo_scores, index=models.index).sort_values(ascending=False)


def ref_win_rate_pct(rating_model: float, rating_baseline: float) -> float:
    """utils_math.py:predict_win_rate + get_win_rate_column for the pair: round(x * 100, 2)."""
    return round(100 / (1 + 10 ** ((rating_baseline - rating_model) / 400)), 2)


def ref_bootstrap_ci(battles: Any, num_round: int, seed: int) -> tuple[float, float]:
    """utils_math.py:get_bootstrap_result and show_result.py's percentiles (2.5 / 97.5), numpy's
    global seed (42 at import there) standing in as ``RandomState(seed)``."""
    import numpy as np

    rs = np.random.RandomState(seed)
    rows = [ref_compute_mle_elo(battles.sample(frac=1.0, replace=True, random_state=rs))["m"] for _ in range(num_round)]
    return float(np.percentile(rows, 2.5)), float(np.percentile(rows, 97.5))


ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # FastChat common.py one_score_pattern
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # one_score_pattern_backup


def ref_fastchat_rating(judgment: str) -> Any:
    """FastChat@v0.2.32 fastchat/llm_judge/common.py:run_judge_single, output_format "[[rating]]"."""
    import ast

    match = re.search(ONE_SCORE, judgment)
    if not match:
        match = re.search(ONE_SCORE_BACKUP, judgment)
    if match:  # noqa: SIM108 (kept as the reference writes it)
        rating = ast.literal_eval(match.groups()[0])
    else:
        rating = -1
    return rating


def ref_display_result_single(scores: list[Any]) -> float:
    """FastChat@v0.2.32 show_result.py:display_result_single for one model, first turn."""
    import pandas as pd

    df = pd.DataFrame({"model": "m", "score": scores, "turn": 1})
    df = df[df["score"] != -1]
    return float(df[df["turn"] == 1].groupby(["model", "turn"]).mean()["score"].iloc[0])


# =============================================================================================
# Arena-Hard fixture: per question, the judge's replies in game 1 (baseline = A) and game 2 (model
# = A), one per attempt, and the label each game ends with, derived from gen_judgment.py
# judgment()/get_score(): no match -> ask again ("continue ..."), read the joined text; one distinct
# match -> that label; several distinct -> None without asking again.
# =============================================================================================
ARENA = [
    # (game 1 replies, game 2 replies, label 1, label 2)
    (["My final verdict is: [[B>>A]]"], ["[[A>B]]"], "B>>A", "A>B"),
    (["[[A>>B]]"], ["[[B>>A]]"], "A>>B", "B>>A"),
    (["My final verdict is tie: [[A=B]]"], ["[[A=B]]"], "A=B", "A=B"),
    (["[[B>A]]"], ["[[B>A]]"], "B>A", "B>A"),
    (["B is better. [[B>A]]\nFinal: [[B>A]]"], ["**[[A>>B]]**"], "B>A", "A>>B"),  # a repeat counts once
    (["[[A>B]] ... on reflection [[B>A]]"], ["[[A=B]]"], None, "A=B"),  # two labels: none, no retry
    (["I think B is better.", "[[B>A]]"], ["[[A>B]]"], "B>A", "A>B"),  # second attempt
    (["Hard to say.", "Still hard to say."], ["No label here.", "[[B>>A]]"], None, "B>>A"),
    (["[[ B>A ]]", "[[B>A]]"], ["[[a>b]]", "final verdict: [[A>B]]"], "B>A", "A>B"),  # no spaces, no lowercase
    (["[B>A]", "[B>A]"], ["[[A<B]]"], None, "A<B"),  # single brackets never match; A<B matches, no battle
    (["[[B=A]]"], ["[[A>>>B]]"], "B=A", "A>>>B"),  # matched labels that make no battle
    (["[[A>>B]] [[A>B]] [[A=B]] [[B>A]] [[B>>A]]"], ["[[B>A]]"], None, "B>A"),  # the label list echoed
    (["[[B>>A]]"], ["[[A>>B]]"], "B>>A", "A>>B"),
    (["[[A>B]]"], ["[[B>A]]"], "A>B", "B>A"),
    (["[[A=B]]"], ["[[B>A]]"], "A=B", "B>A"),
    (["[[B>A]]"], ["[[A=B]]"], "B>A", "A=B"),
    (["", "[[B>>A]]"], ["[[A>B]]"], "B>>A", "A>B"),  # an empty reply is asked to continue
    (["Verdict: [[A>B]]\n\n[[A>B]]"], ["[[B>A]]"], "A>B", "B>A"),
    (["[[A>B]", "[[A=B]]"], ["[[B>>A]]"], "A=B", "B>>A"),  # unclosed label: no match
    (["[[B>A]]"], ["[[A>B]]"], "B>A", "A>B"),
    (["[[A>>B]]"], ["[[A>B]]"], "A>>B", "A>B"),
    (["[[B>A]]"], ["[[B>A]] but maybe [[A=B]]"], "B>A", None),
    (["No verdict.", "[[A>B]] or [[B>A]]"], ["[[A>>B]]"], None, "A>>B"),  # 2 attempts at most
    (["[[B>>A]]"], ["[[B>>A]]"], "B>>A", "B>>A"),
]
# The model's battles by show_result.py:get_battles_from_row (strong = 3, other labels none):
# wins 4+0+0+1+4+0+2+0+2+0+0+0+6+0+0+1+4+0+0+2+1+1+3+3 = 34, losses 6+1+3+1+2+1+2+3+3+3 = 25,
# ties 2+1+1+1+1 = 6; two players: win rate = (34 + 6/2) / 65 = 37/65 -> 56.92 %.
ARENA_SCORE = round(100 * 37 / 65, 2)
ARENA_UNPARSED_GAMES = 9  # labels outside the five: items 6, 8, 10 (x2), 11 (x2), 12, 22, 23
ARENA_CONTINUES = 9  # games whose first reply had no label


def _arena_data(root: Path, config: Path) -> Path:
    d = root / "arena-hard-v0.1"
    d.mkdir(parents=True)
    with (d / "question.jsonl").open("w") as q, (d / "gpt-4-0314.jsonl").open("w") as b:
        for i in range(1, len(ARENA) + 1):
            q.write(json.dumps({"uid": f"q{i:02d}", "category": "arena-hard-v0.1", "cluster": "c", "prompt": f"Q{i:02d}: a user request"}) + "\n")
            msgs = [{"role": "user", "content": f"Q{i:02d}"}, {"role": "assistant", "content": {"answer": f"BASE-{i:02d} answer"}}]
            b.write(json.dumps({"uid": f"q{i:02d}", "model": "gpt-4-0314", "messages": msgs}) + "\n")
    shutil.copyfile(config, d / "judge_config.yaml")
    return root


def _arena_reply(messages: list[dict[str, str]], body: dict[str, Any]) -> str:
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    if messages[0]["role"] != "system":  # the subject answering
        return f"MODEL-{first_user[1:3]} answer"
    i = int(re.search(r"Q(\d\d):", first_user).group(1))  # type: ignore[union-attr]
    game = 0 if first_user.index("BASE-") < first_user.index("MODEL-") else 1
    attempt = sum(1 for m in messages if m["role"] == "assistant")
    return ARENA[i - 1][game][attempt]


def _arena_configs() -> list[Path]:
    out = [FIXTURE_BENCHDATA / "arena-hard-v0.1" / "judge_config.yaml"]
    if REAL is not None:
        out.append(REAL / "arena-hard-v0.1" / "judge_config.yaml")
    return out


@pytest.mark.parametrize("config", _arena_configs(), ids=lambda p: p.parent.parent.name)
def test_arena_parity_over_http(tmp_path: Path, config: Path) -> None:
    import yaml

    data = _arena_data(tmp_path / "data", config)
    with ChatServer(_arena_reply) as srv:
        cfg = EvalConfig(model="openai:subject", benchmarks=["arenahard"], out=str(tmp_path / "run"), data=str(data), judge="openai:judge", options={"arenahard": {"bootstrap": 30}})
        res = Runner(cfg, lambda: OpenAISubject("subject", base_url=srv.base_url), judge_factory=lambda: OpenAISubject("judge", base_url=srv.base_url), progress=False).run()
        requests = list(srv.requests)
    recs = [json.loads(x) for x in (tmp_path / "run" / "arenahard.jsonl").read_text().splitlines()]
    configs = yaml.safe_load(config.read_text())
    ref_rows = []
    for i, (rec, (r1, r2, want1, want2)) in enumerate(zip(recs, ARENA, strict=True), 1):
        ours = (rec["parsed"] or {}).get("baseline_first"), (rec["parsed"] or {}).get("model_first")
        assert ours == (want1, want2), f"item {i}"
        q, base, model = f"Q{i:02d}: a user request", f"BASE-{i:02d} answer", f"MODEL-{i:02d} answer"
        games = []
        for replies, (a1, a2), want, ours_raw in ((r1, (base, model), want1, rec["judge_raw"][0]), (r2, (model, base), want2, rec["judge_raw"][1])):
            it = iter(replies)
            first, judgment, score = ref_judge_game(configs, q, a1, a2, lambda conv, it=it: next(it))
            assert score == want and judgment == ours_raw, f"item {i}"
            # The judge saw exactly the reference's conversation (system prompt and template).
            assert any(r["messages"] == first and r["max_tokens"] == configs["max_tokens"] and r["temperature"] == configs["temperature"] for r in requests), f"item {i}"
            games.append({"score": score})
        ref_rows.append({"question_id": f"q{i:02d}", "model": "m", "games": games})
    # The answers' requests: gen_answer.py:get_answer sends the question as one user turn (a system
    # turn only for OpenAI's own models), gen_answer_config.yaml's temperature 0 and 4096 tokens.
    answers = [r for r in requests if r["model"] == "subject"]
    sent = sorted((r["messages"] for r in answers), key=lambda m: m[0]["content"])  # requests run concurrently
    assert sent == [[{"role": "user", "content": f"Q{i:02d}: a user request"}] for i in range(1, len(ARENA) + 1)]
    assert {(r["max_tokens"], r["temperature"]) for r in answers} == {(4096, 0.0)}
    cont = [r for r in requests if r["messages"][-1] == {"role": "user", "content": CONTINUE_PROMPT}]
    assert len(cont) == ARENA_CONTINUES and all(len(r["messages"]) == 4 for r in cont)

    import pandas as pd

    battles = pd.DataFrame([b for row in ref_rows for b in ref_get_battles_from_row(row, False, 3, "gpt-4-0314")])
    elo = ref_compute_mle_elo(battles)
    arena = res["benchmarks"]["arenahard"]
    assert arena["score"] == ARENA_SCORE == pytest.approx(ref_win_rate_pct(elo["m"], elo["gpt-4-0314"]), abs=0.011)
    assert arena["n_unparseable_verdicts"] == ARENA_UNPARSED_GAMES and arena["n_battles"] == 65 == len(battles)
    lo, hi = ref_bootstrap_ci(battles, 30, 42)  # same rows, same draws: the same interval
    assert arena["ci_low"] == pytest.approx(ref_win_rate_pct(lo, 1000.0), abs=0.011)
    assert arena["ci_high"] == pytest.approx(ref_win_rate_pct(hi, 1000.0), abs=0.011)
    assert arena["ci_low"] < arena["score"] < arena["ci_high"] and arena["stderr"] > 0
    proto = arena["protocol"]
    assert proto["judge_regex"] == configs["regex_pattern"] and proto["judge_attempts"] == 2 and proto["judge_config"].endswith("judge_config.yaml")


@pytest.mark.skipif(REAL is None, reason="needs ../shared/benchdata")
def test_arena_generation_limits_are_the_release_configs() -> None:
    import yaml

    assert REAL is not None
    gen = yaml.safe_load((REAL / "arena-hard-v0.1" / "gen_answer_config.yaml").read_text())
    bench = get_benchmark("arenahard")
    assert bench.max_new_tokens == gen["max_tokens"] == 4096 and gen["temperature"] == 0.0
    cfg = ArenaJudgeConfig.from_yaml(REAL / "arena-hard-v0.1" / "judge_config.yaml")
    assert (cfg.max_tokens, cfg.temperature, cfg.attempts, cfg.baseline_model) == (4096, 0.0, 2, "gpt-4-0314")
    assert cfg.system_prompt.startswith("Please act as an impartial judge")


def test_arena_bad_config_names_file_and_field(tmp_path: Path) -> None:
    from personafuse.evaluation.data import DataError

    bad = tmp_path / "judge_config.yaml"
    bad.write_text("system_prompt: x\nprompt_template: ['{question_1}']\nregex_pattern: '['\ntemperature: 0\nmax_tokens: 8\n")
    with pytest.raises(DataError, match=r"judge_config\.yaml: field 'prompt_template' lacks"):
        ArenaJudgeConfig.from_yaml(bad)
    bad.write_text("prompt_template: ['x']\n")
    with pytest.raises(DataError, match=r"judge_config\.yaml: missing field 'system_prompt'"):
        ArenaJudgeConfig.from_yaml(bad)


# =============================================================================================
# MentalChat16K fixture: judge replies and, by FastChat's run_judge_single, the rating each gives
# (first [[n]] anywhere, else first [n], read by ast.literal_eval; none -> -1, left out of the mean
# by display_result_single). ``labelled``: our ``Rating: [[n]]`` variant; ``empathy``: the metric.
# =============================================================================================
FULL = "Rating: [[7]]\nActive Listening: [[7]]\nEmpathy & Validation: [[8]]\nSafety & Trustworthiness: [[9]]\nOpen-mindedness & Non-judgment: [[8]]\nClarity & Encouragement: [[6]]\nBoundaries & Ethical: [[7]]\nHolistic Approach: [[5]]"
MENTAL = [
    # (judge reply, reference rating (-1: none), labelled, empathy)
    ("The reply listens well.\n" + FULL, 7, 7, 8),
    ("Active Listening: [[8]]\nEmpathy & Validation: [[9]]\nRating: [[6]]", 8, 6, 9),  # first [[n]] is a metric's
    ("Rating: [[7.5]]", 7.5, 7.5, None),
    ("Rating: [7]", 7, 7, None),  # the backup pattern
    ("Rating: 7/10", -1, None, None),
    ("$ERROR$", -1, None, None),  # the reference's API-error output
    ("Rating: [[10]]", 10, 10, None),
    ("Rating: [[0]]", 0, 0, None),  # no range check in the reference
    ("[[8]]", 8, None, None),
    ("Rating: [[ 7 ]]", -1, None, None),  # neither pattern allows spaces
    ("As said in [1], it helps. Rating: [[6]]", 6, 6, None),
    ("As said in [2], it helps. Rating: 6", 2, None, None),  # the backup reads the citation
    ("Rating: [[7.]]", 7.0, 7.0, None),
    ("Rating: [[9]]\nRating: [[3]]", 9, 9, None),
    ("**Rating:** [[5]]", 5, 5, None),
    ("Rating: [[12]]", 12, 12, None),
    ("Rating: [[-3]]", -1, None, None),
    ("Rating: [[8/10]]", -1, None, None),
    ("Rating: [[4]]", 4, 4, None),
    ("Overall Rating: [[6]]\nEmpathy & Validation: [[7]]", 6, 6, 7),
    ("Rating: [[3]] Empathy & Validation: [[2]]", 3, 3, 2),
    ("Score: 5 out of 10", -1, None, None),
    ("Rating: [[6.5]]", 6.5, 6.5, None),
    ("rating: [[4]]", 4, 4, None),
]
# Mean of the 18 ratings that are not -1: (7+8+7.5+7+10+0+8+6+2+7+9+5+12+4+6+3+6.5+4) / 18 = 112/18.
MENTAL_SCORE = 112 / 18
MENTAL_EMPATHY = (8 + 9 + 7 + 2) / 4


def _mental_data(root: Path, judgments: Path) -> Path:
    d = root / "mentalchat16k"
    (d / "model_judgment").mkdir(parents=True)
    with (d / "question.jsonl").open("w") as f:
        for i in range(1, len(MENTAL) + 1):
            f.write(json.dumps({"question_id": i, "category": "generic", "turns": [f"M{i:02d} i feel low"]}) + "\n")
    shutil.copyfile(judgments, d / "model_judgment" / "gpt-4_single.jsonl")
    return root


def _mental_reply(messages: list[dict[str, str]], body: dict[str, Any]) -> str:
    user = messages[-1]["content"]
    if messages[0]["role"] != "system":
        return f"ANSWER to {user[:3]}"
    return MENTAL[int(re.search(r"\[Question\]\nM(\d\d) ", user).group(1)) - 1][0]  # type: ignore[union-attr]


def _mental_files() -> list[Path]:
    out = [FIXTURE_BENCHDATA / "mentalchat16k" / "model_judgment" / "gpt-4_single.jsonl"]
    if REAL is not None:
        out.append(REAL / "mentalchat16k" / "model_judgment" / "gpt-4_single.jsonl")
    return out


@pytest.mark.parametrize("judgments", _mental_files(), ids=lambda p: p.parents[2].name)
def test_mentalchat_parity_over_http(tmp_path: Path, judgments: Path) -> None:
    data = _mental_data(tmp_path / "data", judgments)
    with ChatServer(_mental_reply) as srv:
        cfg = EvalConfig(model="openai:subject", benchmarks=["mentalchat"], out=str(tmp_path / "run"), data=str(data), judge="openai:judge")
        res = Runner(cfg, lambda: OpenAISubject("subject", base_url=srv.base_url), judge_factory=lambda: OpenAISubject("judge", base_url=srv.base_url), progress=False).run()
        requests = list(srv.requests)
    recs = [json.loads(x) for x in (tmp_path / "run" / "mentalchat.jsonl").read_text().splitlines()]
    for i, (rec, (reply, want, labelled, empathy)) in enumerate(zip(recs, MENTAL, strict=True), 1):
        assert ref_fastchat_rating(reply) == want, f"item {i}: fixture vs FastChat"
        assert rec["score"] == (None if want == -1 else want), f"item {i}"
        p = rec["parsed"] or {}
        assert (p.get("rating_labelled"), p.get("empathy")) == (labelled, empathy), f"item {i}"
    mental = res["benchmarks"]["mentalchat"]
    assert mental["score"] == pytest.approx(MENTAL_SCORE) == pytest.approx(ref_display_result_single([w for _, w, _, _ in MENTAL]))
    assert mental["n_judged"] == 18 and mental["n_unparseable_verdicts"] == 6 and mental["stderr"] > 0
    assert mental["empathy"] == pytest.approx(MENTAL_EMPATHY) and mental["empathy_n"] == 4
    # The judge prompt: the records' instruction, FastChat's layout, its system prompt and limits.
    jp = MentalJudgePrompt.from_judgment_file(judgments)
    judged = [r for r in requests if "messages" in r and r["messages"][0]["role"] == "system"]
    assert len(judged) == 24 and all(r["max_tokens"] == 2048 and r["temperature"] == 0 for r in judged)
    sent = judged[0]["messages"]
    assert sent[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert sent[1]["content"].startswith(jp.instruction) and sent[1]["content"].endswith("\n[The End of Assistant's Answer]")


# lm-sys/FastChat@v0.2.32 fastchat/llm_judge/data/judge_prompts.jsonl line 5 ("single-v1"): the system
# prompt and the layout single-mental-v1 fills (its own instruction in place of single-v1's).
FASTCHAT_SINGLE_V1_SYSTEM = "You are a helpful assistant."
FASTCHAT_SINGLE_V1_LAYOUT = "[Instruction]\n{instruction}\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
# ChiaPatricia/MentalChat16K_Main@9eb19df examples/qlora_models_generate.py lines 84-93, 25, 56.
AUTHORS_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")  # fmt: skip
AUTHORS_INSTRUCTION = ("You are a helpful mental health counselling assistant, please answer the mental health questions based on the patient's description. "
                       "The assistant gives helpful, comprehensive, and appropriate answers to the user's questions.")  # fmt: skip


@pytest.mark.parametrize("judgments", _mental_files(), ids=lambda p: p.parents[2].name)
def test_mentalchat_judge_request_is_fastchats_layout(judgments: Path) -> None:
    """Each official record's user_prompt is FastChat's single-v1 layout around single-mental-v1's
    instruction; our judge request for a new question and answer is that layout, filled."""
    jp = MentalJudgePrompt.from_judgment_file(judgments)
    assert jp.metrics[0] == "Active Listening"  # the first [[n]] a judge writes, in practice
    rx = re.compile(re.escape(FASTCHAT_SINGLE_V1_LAYOUT).replace(re.escape("{instruction}"), "(?P<i>.*?)")
                    .replace(re.escape("{question}"), "(?P<q>.*?)").replace(re.escape("{answer}"), "(?P<a>.*)"), re.S)  # fmt: skip
    instructions = set()
    for line in judgments.read_text().splitlines():
        rec = json.loads(line)
        m = rx.fullmatch(rec["user_prompt"])
        assert m is not None, "a record outside FastChat's single-v1 layout"
        instructions.add(m.group("i"))
    (instruction,) = instructions
    q, a = "i cannot sleep and i keep worrying", "That sounds exhausting. [[not a rating]]"
    want = [{"role": "system", "content": FASTCHAT_SINGLE_V1_SYSTEM},
            {"role": "user", "content": FASTCHAT_SINGLE_V1_LAYOUT.format(instruction=instruction, question=q, answer=a)}]  # fmt: skip
    assert jp.messages(q, a) == want


def test_mentalchat_answer_request_is_the_authors(tmp_path: Path) -> None:
    """The request our runner sends the subject for one real question: the authors' Alpaca prompt
    with their counselling instruction as a raw completion, 512 tokens; the judge then sees the bare
    question and the answer cut where the authors cut it (a further "### Response: ")."""
    folder = REAL / "mentalchat16k" if REAL is not None else FIXTURE_BENCHDATA / "mentalchat16k"
    row = json.loads((folder / "question.jsonl").read_text().splitlines()[0])
    data = tmp_path / "data" / "mentalchat16k"
    (data / "model_judgment").mkdir(parents=True)
    (data / "question.jsonl").write_text(json.dumps(row) + "\n")
    shutil.copyfile(folder / "model_judgment" / "gpt-4_single.jsonl", data / "model_judgment" / "gpt-4_single.jsonl")

    def reply(messages: list[dict[str, str]], body: dict[str, Any]) -> str:
        return "Rating: [[6]]" if messages[0]["role"] == "system" else "I hear you.\n\n### Response: a second turn"

    with ChatServer(reply) as srv:
        cfg = EvalConfig(model="openai:subject", benchmarks=["mentalchat"], out=str(tmp_path / "run"), data=str(tmp_path / "data"), judge="openai:judge")
        res = Runner(cfg, lambda: OpenAISubject("subject", base_url=srv.base_url), judge_factory=lambda: OpenAISubject("judge", base_url=srv.base_url), progress=False).run()
    subject, judge = srv.requests
    assert subject["prompt"] == AUTHORS_PROMPT.format(instruction=AUTHORS_INSTRUCTION, input=row["turns"][0])
    assert subject["max_tokens"] == 512 and "messages" not in subject
    assert judge["messages"][1]["content"].endswith(f"[Question]\n{row['turns'][0]}\n\n[The Start of Assistant's Answer]\nI hear you.\n\n\n[The End of Assistant's Answer]")
    proto = res["benchmarks"]["mentalchat"]["protocol"]
    assert "Active Listening" in proto["score_is"] and proto["chat_template"] is False


def test_mentalchat_bad_judgment_file_is_a_clear_error(tmp_path: Path) -> None:
    from personafuse.evaluation.data import DataError

    f = tmp_path / "gpt-4_single.jsonl"
    f.write_text(json.dumps({"judge": ["gpt-4", "single-v1"], "user_prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"gpt-4_single\.jsonl: no record judged with 'single-mental-v1'"):
        MentalJudgePrompt.from_judgment_file(f)
    f.write_text(json.dumps({"judge": ["gpt-4", "single-mental-v1"], "user_prompt": "no layout"}) + "\n")
    with pytest.raises(DataError, match=r"gpt-4_single\.jsonl:1: field 'user_prompt'"):
        MentalJudgePrompt.from_judgment_file(f)
