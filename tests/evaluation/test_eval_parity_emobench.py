"""EmoBench parity with its reference, Sahandfer/EmoBench@3b4f84312541f8469e909965e1fff3691ef85c62,
the ``src/`` harness its README presents (``python src/main.py``).

The ``ref_*`` functions are faithful transcriptions of the reference (MIT licence): src/utils.py
``parse_json_response`` and ``get_response_format``, src/model.py ``LLM.init_prompt`` and the
answer handling of ``LLM.gen_response`` (the empty-answer fallback), src/data.py
``DataLoader.rank_choices``, the message building of ``generate_responses`` and the accuracy of
``evaluate_results`` (pandas' groupby-mean written as dicts). Ours and theirs run on the same
replies, item by item.

The expected outcomes in the fixture were derived by hand by following ``parse_json_response``
(whole reply, or the first ```json block, through ``json.loads``), ``gen_response`` (a failure gives
``{"answer": ""}`` / ``{"answer_q1": "", "answer_q2": ""}``) and ``evaluate_results`` (exact equality
with the gold letter; EU needs both).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from eval_support import FIXTURE_BENCHDATA, real_benchdata
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.benchmarks.emobench import parse_json_response, score_eu
from personafuse.evaluation.data import DataError

CTX = ScoreContext()
REAL = real_benchdata()
needs_real = pytest.mark.skipif(REAL is None or not (REAL / "emobench" / "configs").is_dir(), reason="../shared/benchdata/emobench not present")
letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---- transcriptions of the reference ------------------------------------------------------------
def ref_parse_json_response(res: str | None) -> Any:
    """src/utils.py:parse_json_response, as written (its print dropped)."""
    try:
        if res is None:
            raise ValueError("No response found")
        elif "```json" in res:
            regex = r"```json\s*([\s\S]*?)```"
            res = re.search(regex, res, re.DOTALL)  # type: ignore[assignment]
            res = res.group(0).replace("```json", "").replace("```", "")  # type: ignore[union-attr]
        res = json.loads(res)  # type: ignore[arg-type]
        return res
    except Exception:
        return


def ref_gen_response_answers(task: str, reply: str) -> Any:
    """src/model.py:LLM.gen_response after generation: the parsed JSON, or the empty answers."""
    response = ref_parse_json_response(reply)
    if response is None:
        return {"answer": ""} if task == "EA" else {"answer_q1": "", "answer_q2": ""}
    return response


def ref_get_response_format(res_config: Mapping[str, Any], task: str, lang: str, use_cot: bool) -> str:
    """src/utils.py:get_response_format (the yaml passed in instead of read from src/configs)."""
    res_format = """
{statement}
```json
    {{
    {conditions}
    }}
``` 
    """  # noqa: W291 - their template keeps the trailing space
    statement = res_config["cot"][lang] if use_cot else res_config["base"][lang]
    conditions = res_config[task][lang]
    if use_cot:
        conditions = res_config["reasoning"][lang] + ",\n" + conditions
    return res_format.format(statement=statement, conditions=conditions)


def ref_rank_choices(choices: Sequence[str]) -> str:
    """src/data.py:DataLoader.rank_choices."""
    output = []
    for i, c in enumerate(choices):
        output.append(f"{letters[i]}) {c}")
    return "\n".join(output)


def ref_messages(configs: Path, task: str, lang: str, sample: Mapping[str, Any], model_path: str = "gpt-4o") -> list[dict[str, str]]:
    """src/model.py:36-42 init_prompt (no CoT; model_name = src/utils.py:11-12 get_model_name) +
    src/data.py:generate_responses' msg."""
    prompts = yaml.safe_load((configs / "prompts.yaml").read_text(encoding="utf-8"))
    res_config = yaml.safe_load((configs / "response.yaml").read_text(encoding="utf-8"))
    sys_prompt = prompts["sys"][lang] + ref_get_response_format(res_config, task, lang, False)
    model_name = model_path.split("/")[-1].replace(".", "_")
    if "qwen" in model_name.lower():
        sys_prompt = "/no_think\n\n" + sys_prompt
    if task == "EU":
        msg = prompts[task][lang].format(
            scenario=sample["scenario"], subject=sample["subject"],
            emo_choices=ref_rank_choices(sample["emotion_choices"]), cause_choices=ref_rank_choices(sample["cause_choices"]),
        )
    else:
        msg = prompts[task][lang].format(
            scenario=sample["scenario"], subject=sample["subject"], choices=ref_rank_choices(sample["choices"]), q_type=sample["question type"]
        )
    return [{"role": "system", "content": sys_prompt}, {"role": "user", "content": msg}]


def ref_evaluate(task: str, res: Mapping[str, Any], response: Any) -> bool:
    """src/data.py:evaluate_results' accuracy for one record (EU: emotion and cause)."""
    if task == "EA":
        return res["label"] == response.get("answer", "")
    return res["emo_label"] == response.get("answer_q1", "") and res["cause_label"] == response.get("answer_q2", "")


# ---- 24 canned replies: (item, reply, official correct, free-text correct) -----------------------
# Fixture golds: EA-1 and EA-2 "B"; EU-1 emotion A, cause A; EU-2 emotion B, cause A.
CASES = [
    ("EA-1", '{"answer": "B"}', True, True),
    ("EA-1", '```json\n{"answer": "B"}\n```', True, True),
    ("EA-1", '{"answer": "b"}', False, True),  # not equal to "B"; a reader sees B
    ("EA-1", '{"answer": "B) Calmly talk to the flatmate and agree on rules"}', False, True),
    ("EA-1", "B", False, True),  # json.loads("B") fails: empty answer
    ("EA-1", '{"answer": "B"} I chose B because it is calm.', False, True),  # extra data after the JSON
    ("EA-1", 'Sure! ```json\n{"answer": "B"}\n``` Hope it helps.', True, True),
    ("EA-1", '```json\n{"answer": "B"}', False, True),  # no closing fence: their search finds nothing
    ("EA-1", '```\n{"answer": "B"}\n```', False, True),  # no "```json": the whole reply is not JSON
    ("EA-1", '{"Answer": "B"}', False, True),  # key "answer" missing
    ("EA-1", '{"answer": ["B"]}', False, True),  # a list, not "B"
    ("EA-1", '  {"answer":"B"}  ', True, True),
    ("EA-1", '{"answer": "A"}', False, False),
    ("EA-1", '{"answer": " B"}', False, True),
    ("EA-1", "the best option is a considerate one, so B", False, True),
    ("EA-2", '{"answer": "B", "reasoning": "A would be rude"}', True, True),
    ("EU-1", '{"answer_q1": "A", "answer_q2": "A"}', True, True),
    ("EU-1", '{"answer_q1": "A", "answer_q2": "B"}', False, False),
    ("EU-1", "A\nA", False, True),  # EmoBench's "A\nB" form: not JSON for theirs
    ("EU-1", '```json\n{"answer_q1": "A",\n "answer_q2": "A"}\n```', True, True),
    ("EU-1", '{"answer_q1": "A"}', False, False),
    ("EU-1", '{"answer_q2": "A", "answer_q1": "A"}', True, True),
    ("EU-1", '{"answer_q1": "a", "answer_q2": "a"}', False, True),
    ("EU-2", "Emotion: B\nCause: A", False, True),
    ("EU-2", '{"answer_q1": "B", "answer_q2": "A"}', True, True),
]


def _items() -> tuple[Any, dict[str, Any]]:
    b = get_benchmark("emobench", {"seed": 0})
    return b, {i.id: i for i in b.load(FIXTURE_BENCHDATA)}


def _ref_record(item: Any) -> dict[str, str]:
    if item.categories["task"] == "EA":
        return {"label": letters[item.reference["answer"]]}
    return {"emo_label": letters[item.reference["emotion"]], "cause_label": letters[item.reference["cause"]]}


@pytest.mark.parametrize(("iid", "reply", "official", "freetext"), CASES)
def test_replies_match_hand_derivation_and_reference(iid: str, reply: str, official: bool, freetext: bool) -> None:
    b, items = _items()
    it = items[iid]
    rec = b.score_item(it, [reply], CTX)
    assert rec["score"] == float(official)
    assert rec["score_freetext"] == float(freetext)
    task = it.categories["task"]
    response = ref_gen_response_answers(task, reply)
    if isinstance(response, dict):  # theirs stops on a non-object JSON value (response.get)
        assert ref_evaluate(task, _ref_record(it), response) == official
    assert parse_json_response(reply) == ref_parse_json_response(reply)


def test_aggregate_matches_hand_derivation_and_reference() -> None:
    b, items = _items()
    replies = {
        "EU-1": '{"answer_q1": "A", "answer_q2": "A"}',  # right
        "EU-2": '{"answer_q1": "B", "answer_q2": "B"}',  # emotion right, cause wrong
        "EA-1": '{"answer": "B"}',  # right
        "EA-2": "B",  # not JSON: wrong for theirs, right for a reader
    }
    recs = [{"id": i, "categories": items[i].categories, **b.score_item(items[i], [r], CTX)} for i, r in replies.items()]
    agg = b.aggregate(recs)
    assert agg["EU"] == 0.5 and agg["EA"] == 0.5 and agg["score"] == 0.5
    assert agg["EU_emotion"] == 1.0 and agg["EU_cause"] == 0.5
    assert agg["EU_by_category"] == {"complex_emotions": 1.0, "perspective_taking": 0.0, "Overall": 0.5}
    assert agg["EA_by_category"] == {"Personal-Others": 1.0, "Social-Self": 0.0, "Overall": 0.5}
    assert agg["stderr"] == pytest.approx(math.sqrt(1 / 3) * 0.5)  # 4 items of weight 1/4, scores 1 0 1 0
    assert agg["EU_stderr"] == pytest.approx(0.5)  # sample std of (1, 0) over sqrt(2)
    assert agg["EA_freetext"] == 1.0 and agg["score_freetext"] == 0.75
    assert agg["n_unparsed"] == 1
    # Theirs: per task, Overall = mean of the per-record accuracies.
    for task in ("EU", "EA"):
        accs = [ref_evaluate(task, _ref_record(items[i]), ref_gen_response_answers(task, r)) for i, r in replies.items() if i.startswith(task)]
        assert agg[task] == sum(accs) / len(accs)


def test_eu_free_text_needs_both_parts() -> None:
    ref = {"emotion": 0, "cause": 0}
    emos, causes = ["Joy", "Anger", "Fear", "Pride"], ["c0", "c1", "c2", "c3"]
    half = score_eu("Emotion: A\nCause: B", ref, emos, causes)
    assert half["emotion_correct"] and not half["cause_correct"] and half["score"] == 0.0
    assert score_eu("Emotion: A\nCause: A", ref, emos, causes)["score"] == 1.0
    assert score_eu("**Emotion:** A. Joy\n**Cause:** (A)", ref, emos, causes)["score"] == 1.0
    assert score_eu("Cause: A\nEmotion: A", ref, emos, causes)["score"] == 1.0
    assert score_eu("Emotion: B", ref, emos, causes)["score"] == 0.0
    assert score_eu("A\nB", {"emotion": 0, "cause": 1}, emos, causes)["score"] == 1.0
    assert score_eu('{"answer_q1": "A", "answer_q2": "B"}', {"emotion": 0, "cause": 1}, emos, causes)["score"] == 1.0
    assert score_eu("A friend would feel B, because of C", {"emotion": 1, "cause": 2}, emos, causes)["score"] == 1.0
    listing = "A) Joy\nB) Anger\nC) Fear\nD) Pride"  # the options repeated back: no answer
    assert score_eu(listing, ref, emos, causes)["parsed"] is None


def test_missing_configs_name_the_folder(tmp_path: Path) -> None:
    d = tmp_path / "emobench"
    d.mkdir()
    for t in ("EU", "EA"):
        (d / f"{t}.jsonl").write_text((FIXTURE_BENCHDATA / "emobench" / f"{t}.jsonl").read_text())
    with pytest.raises(DataError, match=r"emobench: no configs/prompts\.yaml and configs/response\.yaml beside .*emobench"):
        get_benchmark("emobench").load(d)
    (d / "configs").mkdir()
    (d / "configs" / "prompts.yaml").write_text("sys: {en: s}\nEU: {en: u}\n")
    (d / "configs" / "response.yaml").write_text((FIXTURE_BENCHDATA / "emobench" / "configs" / "response.yaml").read_text())
    with pytest.raises(DataError, match=r"prompts\.yaml: missing section EA\.en"):
        get_benchmark("emobench").load(d)


# ---- the real files ------------------------------------------------------------------------------
@needs_real
@pytest.mark.parametrize("language", ["en", "zh"])
def test_real_prompts_are_the_reference_prompts(language: str) -> None:
    assert REAL is not None
    b = get_benchmark("emobench", {"seed": 0, "language": language})
    items = {i.id: i for i in b.load(REAL)}
    for task in ("EU", "EA"):
        for line in (REAL / "emobench" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["language"] == language:
                assert items[f"{task}-{row['qid']}"].prompt == ref_messages(REAL / "emobench" / "configs", task, language, row)


CHAT_JSON = [
    '```json\n{{\n  "answer": "{x}"\n}}\n```',
    '{{"answer": "{x}"}}',
    'Here is my answer:\n```json\n{{"answer": "{x}"}}\n```',
]
CHAT_JSON_EU = [
    '```json\n{{\n  "answer_q1": "{e}",\n  "answer_q2": "{c}"\n}}\n```',
    '{{"answer_q1": "{e}", "answer_q2": "{c}"}}',
]
CHAT_FREE = ["the best option is a considerate one, so {x}", "Answer: {x}\n\nNote: option a is wrong", "I'd go with {x}.", "[[{x}]]"]


@needs_real
@pytest.mark.parametrize("language", ["en", "zh"])
def test_replies_naming_the_right_option_score_100_percent(language: str) -> None:
    """The audit's symptom: chat-style replies that always name the right option scored 65 % on EA."""
    b = get_benchmark("emobench", {"seed": 0, "language": language})
    items = b.load(REAL)
    recs, free = [], []
    for n, it in enumerate(items):
        if it.categories["task"] == "EA":
            x = letters[it.reference["answer"]]
            reply, text = CHAT_JSON[n % len(CHAT_JSON)].format(x=x), CHAT_FREE[n % len(CHAT_FREE)].format(x=x)
        else:
            e, c = letters[it.reference["emotion"]], letters[it.reference["cause"]]
            reply = CHAT_JSON_EU[n % len(CHAT_JSON_EU)].format(e=e, c=c)
            text = [f"{e}\n{c}", f"Emotion: {e}\nCause: {c}"][n % 2]
        recs.append({"categories": it.categories, **b.score_item(it, [reply], CTX)})
        free.append({"categories": it.categories, **b.score_item(it, [text], CTX)})
    agg = b.aggregate(recs)
    assert agg["score"] == 1.0 and agg["EU"] == 1.0 and agg["EA"] == 1.0 and agg["score_freetext"] == 1.0
    assert b.aggregate(free)["score_freetext"] == 1.0
    assert agg["n"] == 400


@pytest.mark.parametrize("model", ["Qwen/Qwen3-8B", "gpt-4o"])
def test_request_for_one_real_item_is_the_references(model: str, tmp_path: Path) -> None:
    """What the runner sends an endpoint for EA item 1: src/model.py:68-69 gen_response's
    ``self.messages + [user msg]`` (init_prompt's system, with ``/no_think`` for a Qwen name,
    :40-41), at most 50 new tokens (:72-75, the HF path's limit without CoT). Listed deviation:
    greedy here, where their clients sample (ChatOpenAI temperature 0.6, :46-57)."""
    from eval_support import ChatServer
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    folder = REAL / "emobench" if REAL is not None and (REAL / "emobench" / "configs").is_dir() else FIXTURE_BENCHDATA / "emobench"
    row = json.loads((folder / "EA.jsonl").read_text(encoding="utf-8").splitlines()[0])
    (tmp_path / "data" / "configs").mkdir(parents=True)
    (tmp_path / "data" / "EA.jsonl").write_text(json.dumps(row) + "\n")
    for f in ("prompts.yaml", "response.yaml"):
        (tmp_path / "data" / "configs" / f).write_text((folder / "configs" / f).read_text(encoding="utf-8"))
    with ChatServer(lambda m, b: '{"answer": "A"}') as srv:
        cfg = EvalConfig(model=f"openai:{model}", benchmarks=["emobench"], out=str(tmp_path / "run"), data=str(tmp_path / "data"),
                         options={"emobench": {"tasks": ["EA"], "language": row["language"]}})  # fmt: skip
        res = Runner(cfg, lambda: OpenAISubject(model, base_url=srv.base_url, api_key="k"), progress=False).run()
    (body,) = srv.requests
    assert body["messages"] == ref_messages(folder / "configs", "EA", row["language"], row, model_path=model)
    assert body["max_tokens"] == 50 and body["temperature"] == 0.0
    assert res["benchmarks"]["emobench"]["protocol"]["no_think"] is model.startswith("Qwen")
