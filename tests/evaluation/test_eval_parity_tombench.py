"""ToMBench parity with its reference, zhchen18/ToMBench@4f491f0784ed31ef93a8837615fbc48f885cf78d.

The ``ref_*`` functions are faithful transcriptions of the reference (MIT licence): prompt building
from run_api.py ``format_prompt_4`` / ``format_prompt_2`` (the four copied if/elif blocks written as
the loop they spell out; ``random.shuffle`` replaced by a given order so both sides see the same
shuffle), and get_results.py ``extract_answer``, ``most_common_element`` and the ``__main__`` block's
per-task / per-ability accuracy. Ours and theirs run on the same replies, item by item.

The expected outcomes in the fixtures were derived by hand by following get_results.py
``extract_answer`` (``[[A]]``..``[[D]]`` in that order, ``[A]``..``[D]``, then the characters from the
end for the first capital A-D, else "A"), the ``map`` of format_prompt_4/_2 and
``most_common_element`` (dict insertion order: a tie goes to the first seen).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from eval_support import FIXTURE_BENCHDATA, real_benchdata
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.benchmarks.tombench import ToMBench, extract_answer, majority_vote, read_prompts
from personafuse.evaluation.data import read_jsonl

CTX = ScoreContext()
REAL = real_benchdata()
needs_real = pytest.mark.skipif(REAL is None or not (REAL / "tombench").is_dir(), reason="../shared/benchdata/tombench not present")


# ---- transcriptions of the reference ------------------------------------------------------------
def ref_extract_answer(text: str) -> str:
    """get_results.py:extract_answer, as written."""
    if "[[A]]" in text:
        return "A"
    elif "[[B]]" in text:
        return "B"
    elif "[[C]]" in text:
        return "C"
    elif "[[D]]" in text:
        return "D"
    elif "[A]" in text:
        return "A"
    elif "[B]" in text:
        return "B"
    elif "[C]" in text:
        return "C"
    elif "[D]" in text:
        return "D"
    else:
        for i in range(len(text) - 1, -1, -1):
            if text[i] == "A":
                return "A"
            elif text[i] == "B":
                return "B"
            elif text[i] == "C":
                return "C"
            elif text[i] == "D":
                return "D"
    return "A"


def ref_most_common_element(lst: Sequence[str]) -> str:
    """get_results.py:most_common_element, as written."""
    element_freq: dict[str, int] = {}
    for item in lst:
        element_freq[item] = element_freq.get(item, 0) + 1
    return max(element_freq, key=element_freq.get)  # type: ignore[arg-type]


def ref_option_c_absent(v: Any) -> bool:
    """run_api.py __main__'s ``d['选项C'] != None``, negated. ``json.loads`` reads the files' ``NaN`` as
    float nan, for which theirs would take format_prompt_4 and fail at ``nan.replace``: the only
    path of theirs that runs on such an item is format_prompt_2, so nan counts as None here."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def ref_format_prompt(d: Mapping[str, Any], language: str, prompts: Mapping[str, str], shuffle: Callable[[list[str]], None]) -> tuple[dict[str, str], str]:
    """run_api.py:format_prompt_4 / format_prompt_2 (chosen as their __main__ does on 选项C)."""
    keys = ["选项A", "选项B", "选项C", "选项D"] if language == "zh" else ["OPTION-A", "OPTION-B", "OPTION-C", "OPTION-D"]
    story, question = (d["故事"], d["问题"]) if language == "zh" else (d["STORY"], d["QUESTION"])
    n = 2 if ref_option_c_absent(d["选项C"]) else 4
    originals = [d[keys[i]].replace(f"{'ABCD'[i]}. ", "") for i in range(n)]
    choices = list(originals)
    shuffle(choices)
    letters = {4: "ABCD", 2: "AB"}[n]
    template = prompts[f"UserEvaluatePrompt{n}Choices_{language}"]
    fields = {f"choice_{x}": choices[i] for i, x in enumerate("abcd"[:n])}
    prompt = template.format(story=story, question=question, **fields)
    mapping = {"A": "", "B": "", "C": "", "D": ""}
    for k in range(n):  # the if/elif chain: the first original whose text equals choices[k]
        for j in range(n):
            if choices[k] == originals[j]:
                mapping[letters[k]] = letters[j]
                break
    return mapping, prompt


def ref_get_results(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """get_results.py __main__: rows are their result records (task, idx, map, output, answer, data)."""
    acc_task: dict[str, float] = {}
    cnt_task: dict[str, int] = {}
    acc_ab: dict[str, float] = {}
    cnt_ab: dict[str, int] = {}
    by_item: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for d in rows:
        by_item.setdefault((d["task"], d["idx"]), []).append(d)
    for (task, _), ds in by_item.items():
        preds = [d["map"][ref_extract_answer(d["output"])] for d in ds]
        ability = ds[0]["data"]["能力\nABILITY"]
        cnt_task[task] = cnt_task.get(task, 0) + 1
        cnt_ab[ability] = cnt_ab.get(ability, 0) + 1
        if ds[0]["answer"] == ref_most_common_element(preds):
            acc_task[task] = acc_task.get(task, 0) + 1
            acc_ab[ability] = acc_ab.get(ability, 0) + 1
    # Only keys with a correct item exist (their loop runs over acc_per_task's keys).
    return {"tasks": {t: acc_task[t] / cnt_task[t] for t in acc_task}, "abilities": {a: acc_ab[a] / cnt_ab[a] for a in acc_ab}}


# ---- extraction: 24 awkward replies, letters derived by hand from extract_answer ---------------
EXTRACT_CASES = [
    ("[[B]]", "B"),
    ("[[b]]", "A"),  # no uppercase marker, no capital A-D: the default
    ("The answer is [[C]], not [[A]]", "A"),  # [[A]] is checked before [[C]]
    ("[[D]] [[A]]", "A"),
    ("[B]", "B"),
    ("Answer: D", "D"),
    ("the best option is a considerate one, so B", "B"),
    ("Answer: C\n\nNote: option a is wrong", "C"),
    ('{"answer": "D"}', "D"),
    ("B. Because Danny was late", "D"),  # the last capital A-D is Danny's D
    ("", "A"),
    ("我选择B", "B"),
    ("我不知道", "A"),
    ("Based on the story, [[C]]", "C"),
    ("Based on the story, C", "C"),
    ("Based on the story, c", "B"),  # "Based"
    ("[[E]]", "A"),
    ("**B**", "B"),
    ("(A) or (B)? I pick (B)", "B"),
    ("A", "A"),
    ("I think it's between A and C, but D", "D"),
    ("答案是[[B]]", "B"),
    ("Option C. Xiao Hong", "C"),
    ("[[ B ]]", "B"),  # no exact marker; scanning back finds the B
]


@pytest.mark.parametrize(("text", "shown"), EXTRACT_CASES)
def test_extract_answer_matches_hand_derivation_and_reference(text: str, shown: str) -> None:
    assert ref_extract_answer(text) == shown
    assert extract_answer(text) == shown


# ---- item level: fixed shuffles, five replies each ----------------------------------------------
def _bench_with_orders(orders: Mapping[str, list[list[int]]]) -> tuple[ToMBench, dict[str, Any]]:
    b = get_benchmark("tombench", {"seed": 0})
    assert isinstance(b, ToMBench)
    items = {i.id: i for i in b.load(FIXTURE_BENCHDATA)}

    def shuffles(item: Any, seed: int) -> list[list[tuple[str, str]]]:
        return [[item.reference["options"][k] for k in order] for order in orders[item.id]]

    b.shuffles = shuffles  # type: ignore[method-assign]
    return b, items


REV4, REV2 = [3, 2, 1, 0], [1, 0]
# item id → (shown orders, replies, expected original votes, expected vote, correct)
# Emotion Regulation-1: gold B ("B. " in the file); reversed order shows original B as C.
# False Belief Task-1: gold A, reversed: A is shown as D. False Belief Task-2: two options, gold B,
# shown as A; a shown C or D maps to "" (their map), which can win the vote and is never right.
ITEM_CASES = {
    "Emotion Regulation-1": (
        [REV4] * 5,
        ["[[C]]", "Answer: C", "the best option is a considerate one, so C", "[[A]]", "I pick (C)"],
        ["B", "B", "B", "D", "B"], "B", 1.0,
    ),
    "False Belief Task-1": (
        [REV4] * 5,
        ["[[D]]", "B. Because Danny", "[[b]]", "", "D"],
        ["A", "A", "D", "D", "A"], "A", 1.0,
    ),
    "False Belief Task-2": (
        [REV2] * 5,
        ["[[C]]", "[[D]]", "[[A]]", "[[B]]", "[[B]]"],
        [None, None, "B", "A", "A"], None, 0.0,
    ),
}


def test_item_votes_match_hand_derivation_and_reference() -> None:
    prompts = read_prompts(FIXTURE_BENCHDATA / "tombench" / "prompts.py.txt")
    b, items = _bench_with_orders({k: v[0] for k, v in ITEM_CASES.items()})
    rows = {f"{p.stem}-{r['__line__']}": r for p in (FIXTURE_BENCHDATA / "tombench").glob("*.jsonl") for r in read_jsonl(p)}
    for iid, (orders, replies, votes, vote, correct) in ITEM_CASES.items():
        rec = b.score_item(items[iid], replies, CTX)
        assert rec["votes"] == votes and rec["parsed"] == vote and rec["score"] == correct, iid
        # Theirs on the same shuffles and replies.
        ref_votes = []
        for order, reply in zip(orders, replies, strict=True):
            mapping, _ = ref_format_prompt(rows[iid], "en", prompts, lambda c, o=order: c.__setitem__(slice(None), [c[k] for k in o]))
            ref_votes.append(mapping[ref_extract_answer(reply)])
        assert [v or None for v in ref_votes] == votes
        assert (ref_most_common_element(ref_votes) or None) == vote


def test_aggregate_matches_hand_derivation_and_reference() -> None:
    b, items = _bench_with_orders({k: v[0] for k, v in ITEM_CASES.items()})
    recs = [{"id": i, "categories": items[i].categories, **b.score_item(items[i], c[1], CTX)} for i, c in ITEM_CASES.items()]
    agg = b.aggregate(recs)
    # Per task file: Emotion Regulation 1/1, False Belief Task 1/2 (the reference's "tasks").
    assert agg["by_task"] == {"Emotion Regulation": 1.0, "False Belief Task": 0.5}
    # Paper: task-oriented over the classic files present (False Belief 0.5), ability-oriented
    # over dimensions (Emotion 1.0, Belief 0.5), score their mean.
    assert agg["task_oriented"] == 0.5 and agg["ability_oriented"] == 0.75 and agg["score"] == 0.625
    # Item weights in score: 0.25 (Emotion Regulation-1), 0.375, 0.375; replies scored 1, 1, 0.
    assert agg["stderr"] == pytest.approx(math.sqrt(1 / 3) * math.sqrt(0.25**2 + 2 * 0.375**2))
    assert agg["accuracy"] == pytest.approx(2 / 3) and agg["n_unparsed"] == 1
    # Theirs: the same per-task and per-ability accuracies; an ability with no correct item is
    # missing from their dict, ours reports it as 0.
    prompts = read_prompts(FIXTURE_BENCHDATA / "tombench" / "prompts.py.txt")
    rows = {f"{p.stem}-{r['__line__']}": r for p in (FIXTURE_BENCHDATA / "tombench").glob("*.jsonl") for r in read_jsonl(p)}
    ref_rows = []
    for n, (iid, (orders, replies, *_)) in enumerate(ITEM_CASES.items()):
        for order, reply in zip(orders, replies, strict=True):
            mapping, _ = ref_format_prompt(rows[iid], "en", prompts, lambda c, o=order: c.__setitem__(slice(None), [c[k] for k in o]))
            ref_rows.append({"task": iid.rsplit("-", 1)[0], "idx": n, "map": mapping, "output": reply, "answer": rows[iid]["答案\nANSWER"], "data": rows[iid]})
    # Theirs compares the stored answer as is: Emotion Regulation-1's "B. " can never be right.
    assert "Emotion Regulation" not in ref_get_results(ref_rows)["tasks"]
    for r in ref_rows:  # ours reads the letter (a documented difference); compare on that
        r["answer"] = r["answer"].strip()[:1]
    ref = ref_get_results(ref_rows)
    assert ref["tasks"] == agg["by_task"]
    assert {k: v for k, v in agg["by_ability_raw"].items() if v} == ref["abilities"]
    assert agg["by_ability_raw"]["Belief: Content false beliefs Belief: Second-order beliefs"] == 0.0


def test_majority_vote() -> None:  # the free-text variant's vote (None = unparsed, skipped)
    assert majority_vote([1, 2, 1, None, 2]) == 1  # tie → first seen
    assert majority_vote([None, 3, 2, 2, None]) == 2
    assert majority_vote([None] * 5) is None


def test_votes_map_shuffled_letters_back_with_seeded_shuffles() -> None:
    b = get_benchmark("tombench", {"seed": 7})
    item = next(i for i in b.load(FIXTURE_BENCHDATA) if i.id == "False Belief Task-1")
    shuffles = b.shuffles(item, 7)
    assert shuffles == b.shuffles(item, 7) and len({tuple(s) for s in shuffles}) > 1

    def reply_for(opts: list[tuple[str, str]], letter: str) -> str:  # the shown letter of original `letter`
        return f"[[{'ABCD'[[o[0] for o in opts].index(letter)]}]]"

    responses = [reply_for(s, x) for s, x in zip(shuffles, "AACAC", strict=True)]
    rec = b.score_item(item, responses, CTX)
    assert rec["votes"] == ["A", "A", "C", "A", "C"] and rec["parsed"] == "A" and rec["score"] == 1.0
    assert rec["score_freetext"] == 1.0
    responses = [reply_for(s, x) for s, x in zip(shuffles, "BBCAB", strict=True)]
    assert b.score_item(item, responses, CTX)["score"] == 0.0


def test_aggregate_task_and_ability_averages() -> None:
    b = get_benchmark("tombench")
    recs = [
        {"categories": {"task": "False Belief Task", "dimension": ["Belief"]}, "score": 1.0, "parsed": "A"},
        {"categories": {"task": "False Belief Task", "dimension": ["Belief"]}, "score": 0.0, "parsed": "B"},
        {"categories": {"task": "Hidden Emotions", "dimension": ["Emotion"]}, "score": 1.0, "parsed": "A"},
    ]
    agg = b.aggregate(recs)
    assert agg["task_oriented"] == 0.5  # only classic task files count
    assert agg["ability_oriented"] == pytest.approx(0.75)  # mean of Belief 0.5 and Emotion 1.0
    assert agg["score"] == pytest.approx(0.625)
    assert agg["by_task"] == {"False Belief Task": 0.5, "Hidden Emotions": 1.0}


def test_prompts_file_is_parsed_never_run(tmp_path: Path) -> None:
    p = tmp_path / "prompts.py"
    p.write_text('import os\nos.system("touch RAN")\nSystemEvaluatePrompt_en = "sys"\nX = 1\n')
    assert read_prompts(p) == {"SystemEvaluatePrompt_en": "sys"}
    assert not (tmp_path / "RAN").exists()
    d = tmp_path / "tombench"
    d.mkdir()
    (d / "False Belief Task.jsonl").write_text((FIXTURE_BENCHDATA / "tombench" / "False Belief Task.jsonl").read_text())
    (d / "prompts.py.txt").write_text('SystemEvaluatePrompt_en = "s"\n')
    from personafuse.evaluation.data import DataError

    with pytest.raises(DataError, match=r"prompts\.py\.txt: no string constant UserEvaluatePrompt4Choices_en"):
        get_benchmark("tombench").load(d)
    (d / "prompts.py.txt").write_text("SystemEvaluatePrompt_en = (\n")
    with pytest.raises(DataError, match=r"prompts\.py\.txt:\d+: not a Python file"):
        get_benchmark("tombench").load(d)


# ---- the real files ------------------------------------------------------------------------------
@needs_real
@pytest.mark.parametrize("language", ["en", "zh"])
def test_real_prompts_are_the_reference_prompts(language: str) -> None:
    assert REAL is not None
    prompts = read_prompts(REAL / "tombench" / "prompts.py.txt")
    b = get_benchmark("tombench", {"seed": 0, "language": language})
    items = b.load(REAL)
    rows = {f"{p.stem}-{r['__line__']}": r for p in sorted((REAL / "tombench").glob("*.jsonl")) for r in read_jsonl(p)}
    for it in items[::37]:
        for opts, chat in zip(b.shuffles(it, 0), b.prompts(it), strict=True):
            order = [it.reference["options"].index(o) for o in opts]
            _, user = ref_format_prompt(rows[it.id], language, prompts, lambda c, o=order: c.__setitem__(slice(None), [c[k] for k in o]))
            assert chat == [{"role": "system", "content": prompts[f"SystemEvaluatePrompt_{language}"]}, {"role": "user", "content": user}]


CHAT_FORMS = [
    "[[{x}]]",
    "The answer is {x}.",
    "the best option is a considerate one, so {x}",
    "Answer: {x}\n\nNote: option a is wrong",
    "I'd go with {x}.",
    "**{x}**",
]


@needs_real
def test_replies_naming_the_right_option_score_100_percent() -> None:
    """The audit's symptom: chat-style replies that always name the right option scored 86 %."""
    b = get_benchmark("tombench", {"seed": 0})
    items = b.load(REAL)
    recs = []
    for n, it in enumerate(items):
        replies = []
        for k, opts in enumerate(b.shuffles(it, 0)):
            shown = "ABCD"[[o[0] for o in opts].index(it.reference["answer"])]
            replies.append(CHAT_FORMS[(n + k) % len(CHAT_FORMS)].format(x=shown))
        recs.append({"categories": it.categories, **b.score_item(it, replies, CTX)})
    agg = b.aggregate(recs)
    assert agg["accuracy"] == 1.0 and agg["score"] == 1.0 and agg["accuracy_freetext"] == 1.0
    assert agg["n"] == 2860 and len(agg["by_task"]) == 20


def test_request_for_one_real_item_is_the_references(tmp_path: Path) -> None:
    """What the runner sends for one question: run_api.py __main__'s five payloads per item
    (``for j in range(args.try_times)``, try_times 5), each ``messages`` = the system prompt and
    format_prompt_4/2's user prompt over one shuffle of the options, ``temperature`` 0. Their
    shuffles come from ``random.seed(42)`` over the whole run, ours from (seed, item id): each of
    our prompts must be one of the reference's prompts for some order of the options."""
    import itertools
    import shutil

    from eval_support import ChatServer
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    folder = REAL / "tombench" if REAL is not None and (REAL / "tombench" / "prompts.py.txt").is_file() else FIXTURE_BENCHDATA / "tombench"
    src = folder / "False Belief Task.jsonl"
    row = read_jsonl(src)[0]
    d = tmp_path / "tombench"
    d.mkdir()
    (d / src.name).write_text(src.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    shutil.copyfile(folder / "prompts.py.txt", d / "prompts.py.txt")
    prompts = read_prompts(folder / "prompts.py.txt")
    n = 2 if ref_option_c_absent(row["选项C"]) else 4
    possible = {ref_format_prompt(row, "en", prompts, lambda c, o=order: c.__setitem__(slice(None), [c[k] for k in o]))[1]
                for order in itertools.permutations(range(n))}  # fmt: skip
    with ChatServer(lambda m, b: "[[A]]") as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["tombench"], out=str(tmp_path / "run"), data=str(d))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
    assert len(srv.requests) == 5
    for body in srv.requests:
        system, user = body["messages"]
        assert system == {"role": "system", "content": prompts["SystemEvaluatePrompt_en"]}
        assert user["role"] == "user" and user["content"] in possible
        assert body["temperature"] == 0.0
    assert len({b["messages"][1]["content"] for b in srv.requests}) > 1  # the options were shuffled
