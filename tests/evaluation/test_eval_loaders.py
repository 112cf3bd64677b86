"""Every loader reads our fixture files (official formats, made-up items) and, when the folder
exists, the real files in ../shared/benchdata; bad input fails with file, line and field."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from eval_support import FIXTURE_BENCHDATA, real_benchdata
from personafuse.evaluation.benchmarks import get_benchmark
from personafuse.evaluation.data import DataError, subsample

REAL = real_benchdata()
needs_real = pytest.mark.skipif(REAL is None, reason="../shared/benchdata not present")


def load(name: str, data: Path | str = FIXTURE_BENCHDATA, **opts: object):
    b = get_benchmark(name, {"seed": 0, **opts})
    return b, b.load(data)


# ---- fixtures ---------------------------------------------------------------------------------
def test_emobench_fixture_en_and_zh() -> None:
    b, items = load("emobench")
    assert [i.id for i in items] == ["EU-1", "EU-2", "EA-1", "EA-2"]
    eu = items[0]
    assert eu.reference == {"emotion": 0, "cause": 0}
    # The official chat: system prompt + JSON answer keys (configs/), choices as "A) text".
    system, user = eu.prompt[0]["content"], eu.prompt[1]["content"]
    assert system.startswith("[fixture system en]") and '"answer_q2": "<letter for q2>"' in system
    assert "A) Joy" in user and "emotion of Mara?" in user
    assert items[2].reference == {"answer": 1} and "most effective Action for Lena?" in items[2].prompt[1]["content"]
    _, zh = load("emobench", language="zh")
    assert [i.id for i in zh] == ["EU-1", "EA-1"] and "<场景>" in zh[0].prompt[1]["content"]


def test_eqbench_fixture_strips_revision_by_default() -> None:
    b, items = load("eqbench")
    assert len(items) == 2
    assert "Critique" not in items[0].prompt and items[0].prompt.endswith("Your answer:\n")
    assert items[0].reference["v2"]["emotion1_score"] == "8"
    b2, items2 = load("eqbench", revise=True)
    # The reference's COMPLETION_TOKENS is 60 with or without revision (lib/eq_bench_utils.py).
    assert "Revised scores:" in items2[0].prompt and b2.max_new_tokens == 60


def test_tombench_fixture_nan_options_and_stray_answer() -> None:
    b, items = load("tombench")
    by = {i.id: i for i in items}
    two = by["False Belief Task-2"]
    assert [o[0] for o in two.reference["options"]] == ["A", "B"]  # NaN C/D dropped
    assert two.meta["story"] == "The candy box actually holds pencils. "  # passed on as theirs does
    assert two.categories["ability"] == ["Belief: Content false beliefs", "Belief: Second-order beliefs"]
    assert by["Emotion Regulation-1"].reference["answer"] == "B"  # "B. " → "B"
    prompts = b.prompts(two)  # the two-option template of the official prompts.py
    assert len(prompts) == 5 and all("C." not in p[1]["content"] and "B. " in p[1]["content"] for p in prompts)
    assert all(p[0]["content"] == "[fixture system en] Output only [[X]]." for p in prompts)
    bzh, zh = load("tombench", language="zh")
    assert "<故事>" in bzh.prompts(zh[0])[0][1]["content"]


def test_gsm8k_fixture() -> None:
    _, items = load("gsm8k")
    assert [i.reference for i in items] == ["53", "1,300", "-2"]


def test_gpqa_fixture_subsets_and_seeded_shuffle() -> None:
    b, items = load("gpqa")
    assert {i.categories["subset"] for i in items} == {"diamond", "main"}
    again = get_benchmark("gpqa", {"seed": 0}).load(FIXTURE_BENCHDATA)
    assert [i.meta["options"] for i in items] == [i.meta["options"] for i in again]
    for it in items:  # the gold letter points at the correct answer after shuffling
        assert it.meta["options"][it.reference] in ("Photon", "-1", "Mitochondrion")
    other = get_benchmark("gpqa", {"seed": 1}).load(FIXTURE_BENCHDATA)
    assert [i.meta["options"] for i in items] != [i.meta["options"] for i in other]
    _, d = load("gpqa", subsets="diamond")
    assert len(d) == 2


def test_safetybench_fixture_questions_plus_answers() -> None:
    b, items = load("safetybench")
    assert [(i.id, i.reference, i.categories["category"]) for i in items] == [("0", 1, "OFF"), ("1", 1, "PH"), ("2", 1, "PP")]


def test_safetybench_without_answers_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "test_en.json").write_text((FIXTURE_BENCHDATA / "safetybench" / "test_en.json").read_text())
    with pytest.raises(DataError, match="no answers"):
        get_benchmark("safetybench").load(tmp_path)


def test_shopmmlu_fixture_skips_translation_tasks() -> None:
    _, items = load("shopmmlu")
    assert [i.categories["task"] for i in items] == ["review_qa", "review_qa"]
    assert isinstance(items[1].reference, list)


def test_arena_and_mentalchat_fixtures() -> None:
    _, a = load("arenahard")
    assert [i.id for i in a] == ["q1", "q2"] and a[1].reference == "s[::-1]"
    _, m = load("mentalchat")
    assert len(m) == 2 and m[0].meta["question"].startswith("i have not slept")
    # the authors' Alpaca prompt around it, the router and the judge reading the question alone
    assert m[0].prompt.endswith(m[0].meta["question"] + "\n\n### Response: ") and m[0].prompt.router_query == m[0].meta["question"]


# ---- errors -----------------------------------------------------------------------------------
def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    d = tmp_path / "gsm8k"
    d.mkdir()
    (d / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: not valid JSON"):
        get_benchmark("gsm8k").load(tmp_path)


def test_missing_field_names_field_and_line(tmp_path: Path) -> None:
    d = tmp_path / "emobench"
    d.mkdir()
    row = json.loads((FIXTURE_BENCHDATA / "emobench" / "EA.jsonl").read_text().splitlines()[0])
    del row["label"]
    (d / "EA.jsonl").write_text(json.dumps(row) + "\n")
    (d / "EU.jsonl").write_text("")
    shutil.copytree(FIXTURE_BENCHDATA / "emobench" / "configs", d / "configs")  # the official prompt files
    with pytest.raises(DataError, match=r"EA\.jsonl:1: missing field 'label'"):
        get_benchmark("emobench", {"tasks": ["EA"]}).load(tmp_path)


def test_gsm8k_answer_without_final_line(tmp_path: Path) -> None:
    p = tmp_path / "test.jsonl"
    p.write_text('{"question": "q", "answer": "just 4"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:1: field 'answer' has no '#### N'"):
        get_benchmark("gsm8k").load(p)


def test_offline_without_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = get_benchmark("gpqa")
    # An empty benchdata folder: no gpqa/ inside.
    monkeypatch.setattr("personafuse.evaluation.benchmarks.base.find_benchdata", lambda: tmp_path)
    with pytest.raises(DataError, match="no local data"):
        b.load(None)


def test_subsample_is_seeded_and_nested() -> None:
    xs = list(range(100))
    a, b = subsample(xs, 10, 3), subsample(xs, 20, 3)
    assert a == subsample(xs, 10, 3) and set(a) <= set(b) and a == sorted(a)
    assert subsample(xs, 10, 4) != a


# ---- the real files ---------------------------------------------------------------------------
@needs_real
def test_real_emobench() -> None:
    _, en = load("emobench", REAL)
    _, zh = load("emobench", REAL, language="zh")
    assert len(en) == 400 and len(zh) == 400
    assert sum(i.categories["task"] == "EU" for i in en) == 200


@needs_real
def test_real_eqbench_v1_file() -> None:
    assert len(load("eqbench", REAL)[1]) == 171  # v2 (the default) reads the 171-item v2 file
    _, items = load("eqbench", REAL, version="v1")
    assert len(items) == 60
    for it in items:
        assert math.isclose(sum(float(it.reference["v1"][f"emotion{i}_score"]) for i in range(1, 5)), 10)


@needs_real
def test_real_tombench() -> None:
    b, items = load("tombench", REAL)
    assert len(items) == 2860
    tasks = {i.categories["task"] for i in items}
    assert len(tasks) == 20
    dims = {d for i in items for d in i.categories["dimension"]}
    assert dims == {"Emotion", "Desire", "Intention", "Knowledge", "Belief", "Non-Literal Communication"}
    two = [i for i in items if len(i.reference["options"]) == 2]
    assert two and all(i.reference["answer"] in "AB" for i in two)


@needs_real
def test_real_gsm8k_arena_mentalchat() -> None:
    assert len(load("gsm8k", REAL)[1]) == 1319
    assert len(load("arenahard", REAL)[1]) == 500
    assert len(load("mentalchat", REAL)[1]) == 200
