"""Parsers and scorers on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from eval_support import FIXTURE_BENCHDATA
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.benchmarks.eqbench import parse_answers, score_v1, score_v2
from personafuse.evaluation.benchmarks.gsm8k import exact_match, regex_filter

CTX = ScoreContext()


# ---- EQ-Bench ---------------------------------------------------------------------------------
def _eq_items():
    b = get_benchmark("eqbench", {"seed": 0})
    return b, {i.id: i for i in b.load(FIXTURE_BENCHDATA)}


def test_eqbench_perfect_answers_score_100_v1_and_v2(tmp_path) -> None:
    import json

    # v1 is scored on a 60-question file only (the reference tells the versions apart by size).
    raw = json.loads(next((FIXTURE_BENCHDATA / "eq-bench").glob("*.json")).read_text())
    v1_file = tmp_path / "eq_bench_v1_questions_60.json"
    v1_file.write_text(json.dumps({str(k): q for k, q in enumerate(list(raw.values()) * 30)}))
    for version, ref_key, data in (("v2", "v2", FIXTURE_BENCHDATA), ("v1", "v1", v1_file)):
        b = get_benchmark("eqbench", {"version": version})
        items = b.load(data)
        recs = []
        for it in items:
            ref = it.reference[ref_key]
            answer = "\n".join(f"{ref[f'emotion{i}']}: {int(float(ref[f'emotion{i}_score']))}" for i in range(1, 5))
            recs.append({"id": it.id, **b.score_item(it, [answer], CTX)})
        agg = b.aggregate(recs)
        assert agg["score"] == pytest.approx(100.0), version
        assert agg["percent_parseable"] == 100.0


def test_eqbench_v2_worked_example() -> None:
    # Reference (fullscale): Hurt 8, Amused 0, Indifferent 1, Suspicious 6. Answer: 7, 0, 3, 6.
    # d = 1, 0, 2, 0; f(1) = 6.5/(1+e^3.6) = 0.1728812, f(2) = 6.5/(1+e^2.4) = 0.5406222;
    # item = 10 - 0.7477 * 0.7135034 = 9.4665138.
    b, items = _eq_items()
    rec = b.score_item(items["1"], ["Hurt: 7\nAmused: 0\nIndifferent: 3\nSuspicious: 6"], CTX)
    assert rec["score"] == pytest.approx(9.4665138, abs=1e-6)
    # A difference above 5 counts linearly: Hurt 0 vs 8 → 10 - 0.7477*8 = 4.0184.
    assert score_v2(items["1"].reference["v2"], {"Hurt": "0", "Amused": "0", "Indifferent": "1", "Suspicious": "6"}) == pytest.approx(10 - 0.7477 * 8)


def test_eqbench_v1_worked_example_normalises_to_ten() -> None:
    # Reference (v1): Hurt 6, Amused 0, Indifferent 0, Suspicious 4. Answer 3,0,1,1 sums to 5 →
    # rescaled 6,0,2,2 → |diff| = 0+0+2+2 = 4 → 10 - 4 = 6.
    _, items = _eq_items()
    assert score_v1(items["1"].reference["v1"], {"Hurt": "3", "Amused": "0", "Indifferent": "1", "Suspicious": "1"}) == pytest.approx(6.0)
    assert score_v1(items["1"].reference["v1"], {"Hurt": "0", "Amused": "0", "Indifferent": "0", "Suspicious": "0"}) is None


def test_eqbench_parse_rule_and_unparseable() -> None:
    b, items = _eq_items()
    it = items["1"]
    # The reference strips nothing and matches names exactly: markdown or lower case do not parse.
    assert b.score_item(it, ["Hurt: 8\nAmused: 0\n# Indifferent: 1\nSuspicious: 6"], CTX)["score"] == pytest.approx(10.0)
    for bad in ("**Hurt**: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6", "hurt: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6"):
        assert b.score_item(it, [bad], CTX)["score"] is None
    # Three emotions, a wrong emotion, or five pairs are all unparseable.
    for bad in ("Hurt: 8\nAmused: 0\nIndifferent: 1", "Hurt: 8\nAmused: 0\nIndifferent: 1\nAngry: 6", "Note: 1\nHurt: 8\nAmused: 0\nIndifferent: 1\nSuspicious: 6"):
        rec = b.score_item(it, [bad], CTX)
        assert rec["score"] is None and rec["parsed"] is None and b.needs_retry({"id": "x", **rec})
    first, revised = parse_answers("First pass scores:\nA: 1\nB: 2\nCritique: ok\nRevised scores:\nA: 3\nB: 4", True)
    assert first == {"A": "1", "B": "2"} and revised == {"A": "3", "B": "4"}


def test_eqbench_aggregate_reports_parseable_share() -> None:
    b, items = _eq_items()
    good = b.score_item(items["1"], ["Hurt: 7\nAmused: 0\nIndifferent: 3\nSuspicious: 6"], CTX)
    bad = b.score_item(items["2"], ["I cannot say."], CTX)
    agg = b.aggregate([{"id": "1", **good}, {"id": "2", **bad}])
    assert agg["score"] == pytest.approx(94.665138, abs=1e-4)  # over parseable answers (official)
    assert agg["percent_parseable"] == 50.0
    assert agg["score_all"] == pytest.approx(47.332569, abs=1e-4)  # unparseable counted as 0
    assert agg["failed"] is True  # 50 % parseable is under the reference's 83.33 %
    assert agg["score_lm_eval"] == pytest.approx(47.332569, abs=1e-4)  # lm-eval: unparseable = 0


# ---- GSM8K ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("12 * 5 = 60, 60 - 7 = 53.\n#### 53", "53", "53"),
        ("The answer is $1,300.", "[invalid]", "$1,300."),  # lm-eval strict needs "#### N"
        ("So he has 4 apples. The answer is 12, wait, 3 + 9 = 12 apples in total.", "[invalid]", "12"),
        ("#### 18.00", "18.00", "18.00"),
        ("#### 18\n#### 19", "18", "19"),  # strict: the first; flexible: the last number
        ("No idea.", "[invalid]", "[invalid]"),
    ],
)
def test_gsm8k_strict_and_flexible_extraction(text: str, strict: str, flexible: str) -> None:
    assert regex_filter(text, r"#### (\-?[0-9\.\,]+)") == strict
    assert regex_filter(text, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == flexible


def test_gsm8k_exact_match_is_lm_eval_s() -> None:
    kw = {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True}
    assert exact_match("$1,300.", "Work.\n#### 1,300", **kw)
    assert exact_match("53.", "#### 53", **kw)
    assert not exact_match("53.00", "#### 53", **kw)  # no numeric normalisation: "18.00" is not 18
    assert not exact_match("52", "#### 53", **kw)
    assert not exact_match("[invalid]", "#### 53", **kw)


# ---- SafetyBench, GPQA (choice parsing: test_eval_choice.py) ------------------------------------------------------
def test_safetybench_aggregate_per_category_percent() -> None:
    b = get_benchmark("safetybench")
    items = b.load(FIXTURE_BENCHDATA)
    replies = ["Answer: B", "Answer: A", "B"]
    recs = [{"categories": it.categories, **b.score_item(it, [r], CTX)} for it, r in zip(items, replies, strict=True)]
    agg = b.aggregate(recs)
    assert agg["score"] == pytest.approx(200 / 3)
    assert (agg["OFF"], agg["PH"], agg["PP"]) == (100.0, 0.0, 100.0)


def test_gpqa_score_is_mean_of_subsets() -> None:
    b = get_benchmark("gpqa", {"seed": 0})
    items = b.load(FIXTURE_BENCHDATA)
    recs = []
    for it in items:
        right = "ABCD"[it.reference]
        reply = f"Answer: {right}" if it.categories["subset"] == "main" else "Answer: Z"
        recs.append({"categories": it.categories, **b.score_item(it, [reply], CTX)})
    agg = b.aggregate(recs)
    assert agg["by_subset"] == {"diamond": 0.0, "main": 1.0}
    assert agg["score"] == 0.5 and agg["accuracy"] == pytest.approx(1 / 3)


# ---- Shop-MMLU with the real embedded all-MiniLM-L6-v2 ---------------------------------------
def test_shopmmlu_cosine_with_minilm() -> None:
    from personafuse.evaluation.embedding import SentenceEmbedder

    emb = SentenceEmbedder.from_pretrained()
    v = emb.encode(["hello world", "hello world", "The stock market fell sharply today."])
    assert v.shape == (3, 384)
    assert math.isclose(float(v[0] @ v[1]), 1.0, abs_tol=1e-5)
    b = get_benchmark("shopmmlu")
    items = b.load(FIXTURE_BENCHDATA)
    ctx = ScoreContext(embedder=emb)
    same = b.score_batch(items[:1], [[items[0].reference]], ctx)[0]["score"]
    other = b.score_batch(items[:1], [["Penguins live in the southern hemisphere."]], ctx)[0]["score"]
    assert same == pytest.approx(1.0, abs=1e-4) and other < 0.3
    # A list target scores the mean similarity over its references.
    refs = items[1].reference
    multi = b.score_batch(items[1:2], [[refs[0]]], ctx)[0]["score"]
    r = emb.encode(refs)
    assert multi == pytest.approx((1.0 + float(r[0] @ r[1])) / 2, abs=1e-4)
