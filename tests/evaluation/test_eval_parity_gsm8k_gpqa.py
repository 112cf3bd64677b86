"""Parity of GSM8K and GPQA with their reference, lm-evaluation-harness v0.4.13 (installed in the venv).

Each fixture row's expected outcome was derived by following the reference code by hand:
* GSM8K: lm_eval/tasks/gsm8k/gsm8k.yaml (v3.0) -> HFLM.generate_until cuts at ``until``
  ("Question:", "</s>", "<|im_end|>"); lm_eval/filters/extraction.py RegexFilter.apply (strict:
  ``#### (\\-?[0-9\\.\\,]+)`` group 0, flexible: ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` group -1, first
  non-empty group, strip, "[invalid]"); lm_eval/filters/selection.py TakeFirstFilter;
  lm_eval/api/metrics.py exact_match_hf_evaluate (regexes ",", "\\$", "(?s).*#### ", "\\.$" on
  both sides, lower case). Official: openai/grade-school-math@3101c7d
  grade_school_math/dataset.py extract_answer/is_correct (first ``#### N``, commas removed, ==).
* GPQA: lm_eval/tasks/gpqa/cot_zeroshot/_gpqa_cot_zeroshot_yaml (v2.2) strict RegexFilter
  ``(?<=The answer is )(.*)(?=.)`` and MultiChoiceRegexFilter (``(\\([A-Z]\\))`` group -1, then the
  option texts, lower case and no punctuation, longest first, then ``:\\s*([A-D])``), exact_match
  with ignore_case and ignore_punctuation against "(X)".
Then lm-eval's own filter and metric code runs on the same replies and must agree item by item.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from eval_support import FIXTURE_BENCHDATA
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.benchmarks.gsm8k import LM_EVAL_VERSION, installed_lm_eval

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lm_eval.filters.extraction import MultiChoiceRegexFilter, RegexFilter  # noqa: E402
from lm_eval.filters.selection import TakeFirstFilter  # noqa: E402

CTX = ScoreContext()

# ---- GSM8K ------------------------------------------------------------------------------------
# (gold answer's final line, reply, strict, flexible, official) - hand-derived, see the docstring.
GSM8K_CASES = [
    ("18", "9 * 2 = 18\n#### 18", 1, 1, 1),
    ("18", "#### 18.00", 0, 0, 0),  # "18.00" != "18": "\.$" only drops a final dot
    ("18", "#### 18.", 1, 1, 0),  # lm-eval drops the final dot; the official grader does not
    ("18", "The answer is 18.", 0, 1, 0),
    ("18", "She pays $18.", 0, 1, 0),  # flexible "$18." -> "$" and final "." ignored
    ("18", "18 dollars, so 3 * 6 = 18", 0, 1, 0),
    ("18", "#### 18\nActually #### 20", 1, 0, 1),  # strict takes the first, flexible the last
    ("18", "20 - 2 = 18\n#### 18\n\nQuestion: Tom has 5 apples.\nAnswer: #### 5", 1, 1, 1),  # cut at "Question:"
    ("18", "####18", 0, 1, 0),  # strict needs "#### "
    ("18", "#### $18", 0, 1, 0),
    ("-3", "It drops by 3.\n#### -3", 1, 1, 1),
    ("1,300", "#### 1,300", 1, 1, 1),
    ("1,300", "#### 1300", 1, 1, 1),
    ("1,300", "The total is 1,300.00 dollars", 0, 0, 0),
    ("18", "", 0, 0, 0),
    ("18", "I don't know.", 0, 0, 0),
    ("18", "#### 18 apples", 1, 1, 1),
    ("18", "#### 18.5", 0, 0, 0),
    ("18", "**#### 18**", 1, 1, 1),
    ("18", "#### 018", 0, 0, 0),
    ("18", "The answer is 18, and 2 more.", 0, 0, 0),  # flexible's last match is "2"
    ("18", "#### 18,", 1, 1, 1),
    ("18", "#### -18", 0, 0, 0),
    ("18", "Answer: 18\n</s>garbage 99", 0, 1, 0),  # cut at "</s>"
    ("18", "#### 18<|im_end|>\n#### 7", 1, 1, 1),
    ("18", "Answer: EIGHTEEN", 0, 0, 0),
]


def _gsm_items(tmp_path: Path) -> list:
    import json

    p = tmp_path / "test.jsonl"
    rows = [{"question": f"Q{i}?", "answer": f"Work {i}.\n#### {g}"} for i, (g, *_rest) in enumerate(GSM8K_CASES)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the shots come from train.jsonl beside it (tests/evaluation/test_eval_parity_gsm8k_fewshot.py checks them)
    (tmp_path / "train.jsonl").write_text((FIXTURE_BENCHDATA / "gsm8k" / "train.jsonl").read_text())
    b = get_benchmark("gsm8k")
    return [b, b.load(p)]


def _lm_eval_gsm8k(reply: str, answer: str) -> tuple[float, float]:
    """lm-eval's own code: the yaml's filters (RegexFilter + TakeFirstFilter) and exact_match."""
    for stop in ("Question:", "</s>", "<|im_end|>"):  # HFLM.generate_until: s.split(term)[0]
        reply = reply.split(stop)[0]
    kw = {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True, "ignore_punctuation": False}
    out = []
    for f in (RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)"), RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)):
        pred = list(TakeFirstFilter().apply(f.apply([[reply]], [{}]), [{}]))[0]
        out.append(float(exact_match_hf_evaluate(predictions=[pred], references=[answer], **kw)["exact_match"]))
    return out[0], out[1]


def test_lm_eval_is_the_pinned_version() -> None:
    assert installed_lm_eval() == LM_EVAL_VERSION


def test_gsm8k_parity_with_lm_eval_and_the_official_grader(tmp_path: Path) -> None:
    assert len(GSM8K_CASES) >= 20
    b, items = _gsm_items(tmp_path)
    recs = []
    for (gold, reply, strict, flex, official), it in zip(GSM8K_CASES, items, strict=True):
        rec = b.score_item(it, [reply], CTX)
        assert rec["gold"] == gold
        assert (rec["score"], rec["score_flexible"], rec["score_official"]) == (strict, flex, official), reply
        assert _lm_eval_gsm8k(reply, it.meta["answer"]) == (strict, flex), reply
        recs.append({"id": it.id, **rec})
    agg = b.aggregate(recs)
    n = len(GSM8K_CASES)
    assert agg["score"] == pytest.approx(sum(c[2] for c in GSM8K_CASES) / n)
    assert agg["score_flexible"] == pytest.approx(sum(c[3] for c in GSM8K_CASES) / n)
    assert agg["score_official"] == pytest.approx(sum(c[4] for c in GSM8K_CASES) / n)
    p = agg["score"]  # lm-eval's mean_stderr of 0/1 items: sqrt(p(1-p)/(n-1))
    assert agg["stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    by_reply = {c[1]: r for c, r in zip(GSM8K_CASES, recs, strict=True)}
    assert by_reply["#### 18.00"]["parsed"] == "18.00" and by_reply["####18"]["parsed"] is None
    assert by_reply["####18"]["parsed_flexible"] == "18" and by_reply[""]["parsed_flexible"] is None


def test_gsm8k_prompt_is_the_task_template(tmp_path: Path) -> None:
    b, items = _gsm_items(tmp_path)
    assert items[0].prompt.endswith("\n\nQuestion: Q0?\nAnswer:")  # doc_to_text "Question: {{question}}\nAnswer:"
    assert items[0].prompt.count("Question: ") == 6  # after the five shots
    proto = b.protocol()
    assert proto["reference"]["task"] == "gsm8k@3.0" and proto["num_fewshot"] == 5 and proto["max_new_tokens"] == 256
    assert proto["lm_eval_task_file"].endswith("lm_eval/tasks/gsm8k/gsm8k.yaml")


# ---- GPQA -------------------------------------------------------------------------------------
COLUMNS = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
           "Incorrect Answer 3", "Record ID", "High-level domain", "Subdomain", "Writer's Difficulty Estimate"]
GPQA_ROWS = {
    "diamond": [
        ("Which boson mediates electromagnetism?", "Photon", "Gluon", "Z  boson", "Graviton [title] spin 2", "recD1", "Physics"),
        ("What is table salt?", "Sodium chloride", "Sodium", "Potassium iodide", "Calcium carbonate", "recD2", "Chemistry"),
        ("Where is ATP mostly made?", "Mitochondrion", "Ribosome", "Golgi apparatus", "Lysosome", "recD3", "Biology"),
    ],
    "main": [
        ("Which planet is largest?", "Jupiter", "Saturn", "Neptune", "Mercury", "recM1", "Physics"),
        ("Which gas do plants take in?", "Carbon dioxide", "Helium", "Argon", "Neon", "recM2", "Biology"),
    ],
}
# Reply templates ({C}/{W} = shown letter of the correct / a wrong option, {Ct}/{Wt} = their texts)
# and the hand-derived (strict, flexible) outcome.
GPQA_CASES = [
    ("Reasoning... The answer is ({C}).", 1, 1),
    ("The answer is {C}.", 1, 0),  # strict keeps "{C}"; flexible finds no (X), text or ": X"
    ("({W}) looks tempting but ({C}) is right", 0, 1),
    ("({C}) is tempting but ({W}) is right", 0, 0),
    ("The correct option is {Ct}", 0, 1),
    ("Answer: {C}", 0, 1),  # the ": X" fallback
    ("the answer is (b)", 0, 0),  # lower-case letter: neither regex matches
    ("The answer is ({C})", 1, 1),  # (?=.) drops ")" -> "({C}" -> "c" after punctuation removal
    ("The answer is ({C})\nThe answer is ({W}).", 1, 0),
    ("", 0, 0),
    ("I think {Wt}", 0, 0),
    ("Both {Ct} and {Wt} seem plausible", 0, 0),  # the last option text wins
    ("**Answer: ({C})**", 0, 1),
    ("The answer is (E).", 0, 0),
    ("{C}", 0, 0),
    ("The answer is: ({C})", 0, 1),
    ("The answer is  ({C}).", 1, 1),
    ("So, the final answer is ({C}).", 0, 1),
    ("The answer is ({W}) or maybe ({C}).", 0, 1),
    ("Answer:{W}", 0, 0),
    ("THE ANSWER IS ({C}).", 0, 1),
    ("It must be {Ct}!", 0, 1),
]


def _gpqa_dir(tmp_path: Path) -> Path:
    d = tmp_path / "gpqa"
    d.mkdir(parents=True)
    for sub, rows in GPQA_ROWS.items():
        with (d / f"gpqa_{sub}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for q, c, w1, w2, w3, rid, dom in rows:
                w.writerow(["pre", q, c, w1, w2, w3, rid, dom, "sub", "hard"])
    return d


def _fill(template: str, options: list[str], gold: int) -> str:
    wrong = next(i for i in range(4) if i != gold)
    return template.format(C="ABCD"[gold], W="ABCD"[wrong], Ct=options[gold], Wt=options[wrong])


def _lm_eval_gpqa(reply: str, options: list[str], target: str) -> tuple[float, float]:
    strict = RegexFilter(regex_pattern="(?<=The answer is )(.*)(?=.)")
    flex = MultiChoiceRegexFilter(regex_pattern=r"(\([A-Z]\))", group_select=-1, ignore_case=True, ignore_punctuation=True)
    doc = {"choices": options}
    out = []
    for f in (strict, flex):
        pred = list(TakeFirstFilter().apply(f.apply([[reply]], [doc]), [doc]))[0]
        out.append(float(exact_match_hf_evaluate(predictions=[pred], references=[target], ignore_case=True, ignore_punctuation=True)["exact_match"]))
    return out[0], out[1]


def test_gpqa_parity_with_lm_eval_cot_zeroshot(tmp_path: Path) -> None:
    assert len(GPQA_CASES) >= 20
    b = get_benchmark("gpqa", {"seed": 0})
    items = b.load(_gpqa_dir(tmp_path))
    assert len(items) == 5
    recs, expected = [], []
    for k, (template, strict, flex) in enumerate(GPQA_CASES):
        it = items[k % len(items)]
        reply = _fill(template, it.meta["options"], it.reference)
        rec = b.score_item(it, [reply], CTX)
        assert (rec["score_strict"], rec["score"]) == (strict, flex), reply
        assert _lm_eval_gpqa(reply, it.meta["options"], rec["gold"]) == (strict, flex), reply
        recs.append({"id": f"{it.id}-{k}", "categories": it.categories, **rec})
        expected.append((it.categories["subset"], strict, flex))
    agg = b.aggregate(recs)
    subs = {s: [f for t, _, f in expected if t == s] for s in ("diamond", "main")}
    assert agg["score"] == pytest.approx(sum(sum(v) / len(v) for v in subs.values()) / 2)  # mean of subsets
    assert agg["accuracy"] == pytest.approx(sum(f for *_, f in expected) / len(expected))
    assert agg["accuracy_strict"] == pytest.approx(sum(s for _, s, _ in expected) / len(expected))


def test_gpqa_prompt_and_choices_follow_the_task(tmp_path: Path) -> None:
    from lm_eval.tasks.gpqa.cot_zeroshot.utils import preprocess as lm_preprocess

    from personafuse.evaluation.benchmarks.gpqa import preprocess

    for raw in ("Z  boson", "Graviton [title] spin 2", "  padded  ", None, "a  b  c"):
        assert preprocess(raw) == lm_preprocess(raw)
    b = get_benchmark("gpqa", {"seed": 0})
    items = {i.id: i for i in b.load(_gpqa_dir(tmp_path))}
    it = items["diamond-recD1"]
    opts = it.meta["options"]
    assert sorted(opts) == sorted(["Photon", "Gluon", "Z boson", "Graviton. spin 2"])
    assert opts[it.reference] == "Photon"
    assert it.prompt == (
        "What is the correct answer to this question:Which boson mediates electromagnetism?\nChoices:\n"
        + "".join(f"({'ABCD'[i]}) {o}\n" for i, o in enumerate(opts)) + "Let's think step by step: "
    )
    proto = b.protocol()
    assert proto["reference"]["task"].endswith("_cot_zeroshot@2.2") and proto["task_version"] == 2.2
    # The seeded shuffle is stable and seed-dependent; the subset filter still works.
    assert [i.meta["options"] for i in b.load(_gpqa_dir(tmp_path / "again"))] == [i.meta["options"] for i in items.values()]
    assert len(get_benchmark("gpqa", {"subsets": "main"}).load(tmp_path / "gpqa")) == 2


def test_gpqa_request_for_one_item_is_lm_evals(tmp_path: Path) -> None:
    """What the runner sends for one item: lm-eval's gpqa_diamond_cot_zeroshot request, i.e. the
    yaml's doc_to_text over utils.process_docs' fields with our (seeded) option order, as a raw
    completion (HFLM without --apply_chat_template), greedy, max_gen_toks 256 (HFLM's default; the
    yaml's generation_kwargs read here from the installed file)."""
    import yaml

    from eval_support import ChatServer
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    d = _gpqa_dir(tmp_path)
    raw = (Path(lm_eval.__file__).parent / "tasks" / "gpqa" / "cot_zeroshot" / "_gpqa_cot_zeroshot_yaml").read_text()
    task = yaml.safe_load(raw.replace("!function", ""))
    item = next(i for i in get_benchmark("gpqa", {"seed": 0}).load(d) if i.id == "diamond-recD1")
    opts = item.meta["options"]
    doc = {"Question": "Which boson mediates electromagnetism?", **{f"choice{k + 1}": o for k, o in enumerate(opts)}}
    want = task["doc_to_text"]
    for k, v in doc.items():
        want = want.replace("{{" + k + "}}", v)
    with ChatServer(lambda m, b: "The answer is (A).") as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["gpqa"], out=str(tmp_path / "run"), data=str(d), options={"gpqa": {"subsets": "diamond"}})
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
    body = next(r for r in srv.requests if r["prompt"] == want)
    assert (body["max_tokens"], body["temperature"]) == (256, 0.0) and "messages" not in body
    assert task["generation_kwargs"]["do_sample"] is False and "max_gen_toks" not in task["generation_kwargs"]
