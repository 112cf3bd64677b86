"""The registered lm-eval ``personafuse`` model runs small local lm-eval tasks end to end on a tiny
model: loglikelihood (multiple choice), loglikelihood_rolling (perplexity) and generate_until."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from eval_support import make_tiny_llama

lm_eval = pytest.importorskip("lm_eval")
torch.set_num_threads(1)

TASKS = """
task: pf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""", """
task: pf_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""", """
task: pf_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
"""


def _write_tasks(d: Path) -> None:
    data = d / "tiny.jsonl"
    rows = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7)], "label": 0} for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for i, t in enumerate(TASKS):
        (d / f"task{i}.yaml").write_text(t.format(data=data))


def test_personafuse_model_runs_lm_eval_tasks(tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import personafuse.evaluation.lm_eval_model  # noqa: F401  (registers "personafuse")

    model_dir = make_tiny_llama(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    out = simple_evaluate(
        model="personafuse",
        model_args=f"model=hf:{model_dir},device=cpu,batch_size=2",
        tasks=["pf_tiny_mc", "pf_tiny_gen", "pf_tiny_ppl"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    res = out["results"]
    assert 0.0 <= res["pf_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["pf_tiny_gen"]["exact_match,none"] <= 1.0
    assert res["pf_tiny_ppl"]["word_perplexity,none"] > 1.0  # a random model is very perplexed
    assert len(out["samples"]["pf_tiny_mc"]) == 4


def test_resolve_weights_modes() -> None:
    from personafuse.evaluation.lm_eval_model import resolve_weights
    from personafuse.evaluation.subjects import parse_routing

    def router(texts):
        return torch.tensor([[0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]] * len(texts))

    rng = random.Random(0)
    top = resolve_weights(parse_routing("top_k:2"), ["q", "r"], router, rng=rng)
    assert top.shape == (2, 10) and torch.allclose(top[0, :2], torch.tensor([0.6, 0.4]))
    rnd = resolve_weights(parse_routing("random:5"), ["q"] * 3, router, rng=rng)
    assert ((rnd > 0).sum(-1) == 5).all() and torch.allclose(rnd.sum(-1), torch.ones(3))
    pole = resolve_weights(parse_routing("pole:low_N"), ["q"], router, rng=rng)
    assert pole[0, 9] == 1 and pole.sum() == 1


@pytest.mark.parametrize("entry", ["lm_eval", "module"])
def test_documented_command_line(tmp_path: Path, entry: str) -> None:
    """lm-eval's own ``lm_eval`` script finds ``--model personafuse`` (through the start-up hook the
    package installs), and ``python -m personafuse.evaluation.lm_eval_model`` (what
    ``personafuse lm-eval`` runs) hands the same arguments to lm-eval's CLI."""
    import os
    import subprocess
    import sys

    model_dir = make_tiny_llama(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [*([str(Path(sys.executable).parent / "lm_eval")] if entry == "lm_eval" else [sys.executable, "-m", "personafuse.evaluation.lm_eval_model"]),
         "--model", "personafuse", "--model_args", f"model=hf:{model_dir}",
         "--tasks", "pf_tiny_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2", "--apply_chat_template", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pf_tiny_mc" in out.stdout and "acc" in out.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_gsm8k_local_task_runs_offline_through_the_cli(tmp_path: Path) -> None:
    """The shipped ``gsm8k_local`` task (lm-eval's gsm8k config over a local official-format
    test.jsonl, passed with ``--metadata``) end to end through ``personafuse lm-eval``, offline; the
    task folder is added to ``--include_path`` by our entry point."""
    import os
    import subprocess
    import sys

    from eval_support import FIXTURE_BENCHDATA

    model_dir = make_tiny_llama(tmp_path / "tiny")
    data = FIXTURE_BENCHDATA / "gsm8k" / "test.jsonl"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "personafuse.evaluation.lm_eval_model", "--model", "personafuse", "--model_args", f"model=hf:{model_dir}",
         "--tasks", "gsm8k_local", "--metadata", json.dumps({"data_file": str(data)}), "--device", "cpu", "--batch_size", "3",
         "--apply_chat_template", "--gen_kwargs", "max_gen_toks=8", "--log_samples", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    r = res["results"]["gsm8k_local"]
    assert 0.0 <= r["exact_match,strict-match"] <= 1.0 and 0.0 <= r["exact_match,flexible-extract"] <= 1.0
    assert res["n-samples"]["gsm8k_local"]["effective"] == 3
    samples = [json.loads(x) for x in next((tmp_path / "out").rglob("samples_gsm8k_local_*.jsonl")).read_text().splitlines()]
    fixture = [json.loads(x)["question"] for x in data.read_text().splitlines()]
    assert sorted({s["doc"]["question"] for s in samples}) == sorted(fixture)  # one sample per filter


def test_gsm8k_local_without_data_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from personafuse.evaluation.data import DataError
    from personafuse.evaluation.lm_eval_tasks import gsm8k_local

    monkeypatch.setattr("personafuse.evaluation.data.find_benchdata", lambda explicit=None: None)
    with pytest.raises(DataError, match="gsm8k_local: no data file"):
        gsm8k_local.load()
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:1: missing field 'answer'"):
        gsm8k_local.load(data_file=str(bad), version=3.0)


def test_eq_bench_local_task_runs_offline_through_lm_eval(tmp_path: Path) -> None:
    """The shipped ``eq_bench_local`` task (lm-eval's eq_bench config and scorer over an official
    EQ-Bench questions JSON) through lm-eval's own ``lm_eval`` script, offline."""
    import os
    import subprocess
    import sys

    from eval_support import FIXTURE_BENCHDATA
    from personafuse.evaluation.lm_eval_tasks import TASKS_DIR

    model_dir = make_tiny_llama(tmp_path / "tiny")
    data = sorted((FIXTURE_BENCHDATA / "eq-bench").glob("*.json"))[0]
    n_items = len(json.loads(data.read_text()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "personafuse", "--model_args", f"model=hf:{model_dir}",
         "--tasks", "eq_bench_local", "--include_path", str(TASKS_DIR), "--metadata", json.dumps({"eq_bench_file": str(data)}),
         "--device", "cpu", "--batch_size", "2", "--gen_kwargs", "max_gen_toks=6", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    r = res["results"]["eq_bench_local"]
    # a random tiny model never writes four parseable emotions: lm-eval's scorer gives 0 and 0 %
    assert r["eqbench,none"] == 0 and r["percent_parseable,none"] == 0
    assert res["n-samples"]["eq_bench_local"]["effective"] == n_items


def test_eq_bench_local_docs_score_100_with_the_reference_answer() -> None:
    import ast

    from eval_support import FIXTURE_BENCHDATA
    from personafuse.evaluation.lm_eval_tasks import eq_bench_local

    data = sorted((FIXTURE_BENCHDATA / "eq-bench").glob("*.json"))[0]
    docs = eq_bench_local.load(eq_bench_file=str(data))["validation"]
    ref = ast.literal_eval(docs[0]["reference_answer_fullscale"])
    answer = "\n".join(f"{ref[f'emotion{i}']}: {ref[f'emotion{i}_score']}" for i in range(1, 5))
    assert eq_bench_local.calculate_score_fullscale(docs[0], [answer]) == {"eqbench": 100.0, "percent_parseable": 100}
    with pytest.raises(Exception, match="no_such.json"):
        eq_bench_local.load(eq_bench_file="/nonexistent/no_such.json")
