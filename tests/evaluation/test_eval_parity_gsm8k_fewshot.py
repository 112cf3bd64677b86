"""GSM8K's 5-shot prompts against lm-eval 0.4.13's own code (installed in the venv).

lm-eval's ``gsm8k`` task (its yaml included unchanged; only the data source is a local JSON copy of
the same train/test files) builds every document's context through ``Task.build_all_requests``
after ``set_fewshot_seed(1234)`` (what ``evaluator.py:347`` does with simple_evaluate's default
``fewshot_random_seed``). Our loader must give each document the same context, raw and as
``--apply_chat_template --fewshot_as_multiturn`` chat messages, whichever items ``--limit`` picks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_support import FIXTURE_BENCHDATA, real_benchdata
from personafuse.evaluation.benchmarks import ScoreContext, get_benchmark
from personafuse.evaluation.data import subsample

lm_eval = pytest.importorskip("lm_eval")


def _lm_eval_gsm8k_task(folder: Path, tmp: Path):
    """lm-eval's own gsm8k task over ``folder``'s train.jsonl/test.jsonl (include of the installed yaml)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    yaml_path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    spec = {
        "include": str(yaml_path),
        "task": "gsm8k_parity",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}, "cache_dir": str(tmp / "hf")},
    }
    d = tmp / "tasks"
    d.mkdir(exist_ok=True)
    (d / "gsm8k_parity.yaml").write_text(json.dumps(spec))  # JSON is YAML
    # include_defaults=False: the yaml includes lm-eval's own gsm8k.yaml by path, no index of all tasks needed
    return get_task_dict(["gsm8k_parity"], TaskManager(include_path=str(d), include_defaults=False))["gsm8k_parity"]


def _contexts(task, **kw) -> list:
    """Every document's context, in test order, as lm-eval's evaluator builds them."""
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(**kw)
    return [inst.arguments[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


def _capture(messages: list, add_generation_prompt: bool = True) -> str:
    assert add_generation_prompt  # gsm8k has no gen_prefix: the template adds the assistant header
    return json.dumps(messages)


def test_every_documents_shots_are_lm_evals(tmp_path: Path) -> None:
    """The real files (7,473 train rows, 25 test documents scattered over the first 200) when
    present, else the fixture's; lm-eval builds the first 200 contexts as ``--limit 200`` would."""
    real = real_benchdata()
    folder = real / "gsm8k" if real and (real / "gsm8k" / "train.jsonl").is_file() else FIXTURE_BENCHDATA / "gsm8k"
    task = _lm_eval_gsm8k_task(folder, tmp_path)
    assert task.config.num_fewshot == 5 and task.config.fewshot_split == "train"
    raw = _contexts(task, limit=200)
    chat = [json.loads(c) for c in _contexts(task, limit=200, apply_chat_template=True, fewshot_as_multiturn=True, chat_template=_capture)]
    ours_raw = get_benchmark("gsm8k").load(folder)
    ours_chat = get_benchmark("gsm8k", {"chat_template": "true"}).load(folder)
    assert len(raw) == len(chat) == min(200, len(ours_raw))
    # items as --limit picks them (scattered through the file), each with its full-run shots
    picked = subsample(list(range(len(raw))), 25, seed=3)
    assert folder.parent != real or (len(picked) == 25 and max(picked) > 150)
    for i in picked:
        assert ours_raw[i].prompt == raw[i], f"document {i}: raw context differs from lm-eval's"
        assert list(ours_chat[i].prompt) == chat[i], f"document {i}: chat turns differ from lm-eval's"
        assert ours_raw[i].prompt.router_query == json.loads((folder / "test.jsonl").read_text().splitlines()[i])["question"]
    assert raw[0].count("Question:") == 6 and len(chat[0]) == 11
    assert len({r.split("\n\n")[0] for r in raw}) > 1  # the draw moves on from one document to the next


def test_planted_sampler_bugs_are_caught(tmp_path: Path) -> None:
    """The comparison above fails for the plausible wrong samplers: a fresh Random(1234) per
    document (every document would get the same shots) and drawing n + 1 then dropping one."""
    import random

    from personafuse.evaluation.benchmarks.gsm8k import fewshot_draws

    good = fewshot_draws(7473, 30, 5)
    fresh = [random.Random(1234).sample(range(7473), 5) for _ in range(30)]
    plus_one = [d[:5] for d in (lambda r: [r.sample(range(7473), 6) for _ in range(30)])(random.Random(1234))]
    assert good[0] == fresh[0] and good[1:] != fresh[1:]
    assert good != plus_one
    assert fewshot_draws(7473, 30, 5)[17] == fewshot_draws(7473, 1319, 5)[17]  # independent of how many items run


def test_perfect_test_taker_scores_100_on_five_shot(tmp_path: Path) -> None:
    """A subject that answers each question with its gold solution scores 100 under the 5-shot
    prompt, and results.json's protocol records the shots (chat and raw)."""
    from eval_support import ChatServer
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    gold = {json.loads(x)["question"]: json.loads(x)["answer"] for x in (FIXTURE_BENCHDATA / "gsm8k" / "test.jsonl").read_text().splitlines()}

    def reply(messages: list, body: dict) -> str:
        text = body.get("prompt") or messages[-1]["content"]
        last = text.rsplit("Question: ", 1)[-1].removesuffix("\nAnswer:")
        return gold[last] + "\n\nQuestion: a shot the model went on to write\nAnswer: #### 0"

    for opts in ({}, {"gsm8k": {"chat_template": "true"}}):
        with ChatServer(reply) as srv:
            cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path / str(len(opts))), data=str(FIXTURE_BENCHDATA), options=opts)
            res = Runner(cfg, lambda srv=srv: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
        block = res["benchmarks"]["gsm8k"]
        assert block["score"] == 1.0 and block["n"] == 3, block
        assert block["protocol"]["num_fewshot"] == 5 and block["protocol"]["fewshot_random_seed"] == 1234
        sent = srv.requests[0]
        assert (len(sent["messages"]) == 11) if opts else (sent["prompt"].count("Question: ") == 6)


def test_zero_shot_option_and_missing_train_split(tmp_path: Path) -> None:
    from personafuse.evaluation.data import DataError

    (tmp_path / "test.jsonl").write_text((FIXTURE_BENCHDATA / "gsm8k" / "test.jsonl").read_text())
    with pytest.raises(DataError, match=r"train\.jsonl not found.*num_fewshot=0"):
        get_benchmark("gsm8k").load(tmp_path)
    b = get_benchmark("gsm8k", {"num_fewshot": "0"})
    items = b.load(tmp_path)
    assert items[0].prompt.startswith("Question: A baker") and b.protocol()["num_fewshot"] == 0
    recs = [{"id": it.id, **b.score_item(it, [f"#### {it.reference}"], ScoreContext())} for it in items]
    agg = b.aggregate(recs)
    assert agg["score_zero_shot"] == agg["score"] == 1.0 and "0-shot" in agg["score_variant"]
    assert "score_zero_shot" not in get_benchmark("gsm8k").aggregate(recs)


def test_personafuse_router_reads_the_question_alone(tmp_path: Path) -> None:
    """A PersonaFuse subject's router is asked about each test question only (not the five shots
    nor the template), and each reply's weights are the router's for that question."""
    import torch

    from conftest import build_tiny
    from personafuse.evaluation.runner import EvalConfig, Runner, read_records
    from personafuse.evaluation.subjects import PersonaFuseSubject, parse_routing

    pf = build_tiny(tmp_path / "pf")
    asked: list = []
    real_route = pf.route
    pf.route = lambda qs, tau=None: (asked.extend(qs), real_route(qs, tau))[1]  # type: ignore[method-assign]
    subject = PersonaFuseSubject(pf, parse_routing("router"), batch_size=3)
    cfg = EvalConfig(model="pf:tiny", benchmarks=["gsm8k"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA), max_new_tokens=2)
    Runner(cfg, lambda: subject, progress=False).run()
    questions = [json.loads(x)["question"] for x in (FIXTURE_BENCHDATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert sorted(asked) == sorted(questions)
    for rec in read_records(tmp_path / "run" / "gsm8k.jsonl").values():
        q = rec["prompt"].rsplit("Question: ", 1)[-1].removesuffix("\nAnswer:")
        want = real_route([q])[0]
        got = torch.tensor([rec["weights"][k] for k in rec["weights"]])
        assert torch.allclose(got, want, atol=1e-5), q
