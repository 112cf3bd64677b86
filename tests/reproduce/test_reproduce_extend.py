"""Adding a benchmark or a grid variant is one place (issue 33, item 2): a throwaway benchmark
module, registered and nothing else edited, shows up in ``eval --help``, is evaluated, and appears
in both reports' tables and figures, the grid's plan and the ``--dry-run`` estimate; a new row in
the variant table is planned, trained, evaluated and reported by a real tiny grid. And no benchmark
name is written into evaluation/report.py or reproduce/ (the facts live on the classes)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import REPO, cli_env, stub_server
from eval_support import ChatServer
from personafuse.evaluation import benchmarks as registry

THROWAWAY = '''
from personafuse.evaluation.benchmarks.base import Benchmark, Item, mean


class Throwaway(Benchmark):
    name = "throwaway"
    title = "Throwaway-Bench"
    folder = "throwaway"
    group = "Throwaway group"
    subscores = ("score", "loud")
    score_variants = ("score_any",)
    generations_per_item = 3  # asks each item three times

    def load_items(self, source):
        rows = [line.split("\\t") for line in (source / "items.tsv").read_text().splitlines()]
        return [Item(id=i, prompt=q, reference=a) for i, q, a in rows]

    def prompts(self, item):
        return [f"{item.prompt} (try {k})" for k in range(self.generations_per_item)]

    def score_item(self, item, responses, ctx):
        hits = [r.strip() == item.reference for r in responses]
        return {"parsed": responses[0], "score": float(sum(hits) >= 2), "any": float(any(hits)), "loud": float(responses[0].isupper())}

    def aggregate(self, records):
        out = super().aggregate(records)
        out["loud"] = mean([r["loud"] for r in records])
        out["score_any"] = mean([r["any"] for r in records])
        return out
'''


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module on sys.path and in the registry for this test only; returns its folder."""
    mod = tmp_path / "plugin"
    mod.mkdir()
    (mod / "throwaway_bench.py").write_text(THROWAWAY)
    monkeypatch.syspath_prepend(str(mod))
    assert registry.register_module("throwaway_bench") == ["throwaway"]
    yield mod
    registry.BENCHMARKS.pop("throwaway")
    sys.modules.pop("throwaway_bench", None)


def _evaluate(out: Path, data: Path, reply) -> None:  # noqa: ANN001
    """A real run of the benchmark (the runner, an OpenAI-compatible server on loopback)."""
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    with ChatServer(lambda messages, body: reply(messages[-1]["content"])) as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["throwaway"], out=str(out), data=str(data))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
        assert len(srv.requests) == 3 * 2  # generations_per_item x items


def test_a_registered_benchmark_module_reaches_help_reports_plan_and_estimate(throwaway: Path, tmp_path: Path):
    from personafuse.evaluation.report import build_report
    from personafuse.reproduce.config import ReproduceConfig
    from personafuse.reproduce.report import plot_relative, summarise, tables
    from personafuse.reproduce.run import Grid

    # eval --help in a fresh process: the module joins through $PERSONAFUSE_BENCHMARKS
    env = {**cli_env(), registry.PLUGINS_ENV: "throwaway_bench", "COLUMNS": "250"}
    env["PYTHONPATH"] = f"{throwaway}{os.pathsep}{env['PYTHONPATH']}"
    r = subprocess.run([sys.executable, "-m", "personafuse.cli", "eval", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"comma-separated: emobench,.*,mentalchat,throwaway", r.stdout)

    data = tmp_path / "benchdata" / "throwaway"
    data.mkdir(parents=True)
    (data / "items.tsv").write_text("a\t2+2?\t4\nb\tloud?\tYES\n")
    grid = tmp_path / "grid"
    _evaluate(grid / "eval" / "direct_ft" / "seed0", data.parent, lambda q: "4")  # item a right, b wrong
    _evaluate(grid / "eval" / "personafuse" / "seed0", data.parent, lambda q: "4" if "2+2" in q else "YES")  # both right
    pf = json.loads((grid / "eval/personafuse/seed0/results.json").read_text())["benchmarks"]["throwaway"]
    assert (pf["score"], pf["loud"], pf["score_any"]) == (1.0, 0.5, 1.0)

    # personafuse report: its title and sub-score in the table, its group's figure drawn
    rep = build_report([str(grid / "eval/personafuse/seed0")], baseline=str(grid / "eval/direct_ft/seed0"), out=str(tmp_path / "rep"))
    assert rep.markdown.splitlines()[0] == "| Model | Throwaway-Bench | Throwaway-Bench loud |"
    assert (tmp_path / "rep" / "relative_throwaway_group.png").read_bytes()[:4] == b"\x89PNG"

    # the grid: config, plan, --dry-run estimate, the report's tables and figure
    cfg = ReproduceConfig.load(None, ["eval.benchmarks=[throwaway]", "variants=[direct_ft, personafuse]", "eval.limit=4"])
    text = Grid(cfg, grid).describe()
    assert "--benchmarks throwaway" in text
    assert "generations 24" in text  # 3 generations x 4 items x 2 variants
    summary = summarise(cfg, grid, resamples=50)
    assert summary["variants"]["personafuse"]["benchmarks"] == {"throwaway": 1.0}
    assert summary["relative_improvement"]["personafuse"] == {"throwaway": 100.0} and summary["average_covers"] == ["throwaway"]
    assert "throwaway" in summary["relative_improvement_ci"]["personafuse"]  # re-aggregated by the class itself
    md = tables(summary)
    assert "| Model | Throwaway-Bench |" in md and "| PersonaFuse | 1.00 ± 0.000 |" in md and "| Direct-FT | 0.500 ± 0.500 |" in md
    (fig,) = plot_relative(summary, tmp_path)
    assert fig.read_bytes()[:4] == b"\x89PNG"


def test_a_new_variant_row_is_planned_trained_evaluated_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from rich.console import Console

    from personafuse.reproduce.config import ReproduceConfig
    from personafuse.reproduce.plan import plan
    from personafuse.reproduce.run import Grid
    from personafuse.reproduce.variants import VARIANT_TABLE, Variant
    from reproduce_support import tiny_experiment

    row = Variant("random_route_3", "Random Route 3", data="persona_cot", random_route=3, shares_warmup=True)
    monkeypatch.setitem(VARIANT_TABLE, row.name, row)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for server in stub_server():
        path = tiny_experiment(tmp_path, server.base_url, variants=[row.name], data={"limit": 4, "heldout": 1})
        cfg = ReproduceConfig.load(path, ["eval.benchmarks=[safetybench]", "eval.limit=2", "eval.reply_tokens=4",
                                          "eval.options={safetybench: {max_new_tokens: 4}}"])
        assert [c.name for c in plan(cfg) if c.kind in ("data", "train", "eval")] == [
            "data/persona_cot", f"train/{row.name}/seed0", f"eval/{row.name}/seed0"]
        out = tmp_path / "out"
        Grid(cfg, out, console=Console(file=io.StringIO())).run()
    train = json.loads((out / f"train/{row.name}/seed0/done.json").read_text())["command"]
    assert train[-2:] == ["--random-route", "3"] and (out / f"train/{row.name}/seed0/joint/model").is_dir()
    assert not (out / f"train/{row.name}/seed0/router").exists()  # random routing: no router stage
    for r in map(json.loads, (out / f"eval/{row.name}/seed0/safetybench.jsonl").read_text().splitlines()):
        on = [w for w in r["weights"].values() if w > 0]
        assert len(on) == 3 and on == pytest.approx([1 / 3] * 3)  # evaluated as the row says
    summary = json.loads((out / "report/summary.json").read_text())
    assert summary["variants"][row.name]["title"] == "Random Route 3"
    assert "| Random Route 3 |" in (out / "report/report.md").read_text()
    assert (out / f"report/pairs/{row.name}.jsonl").is_file()


def _literals(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a module except docstrings (prose may name an example)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_benchmark_name_is_written_into_the_report_or_the_grid():
    src = REPO / "src" / "personafuse"
    names = {*registry.BENCHMARKS, *registry.ALIASES}
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?![\w-])")
    found = [f"{p.relative_to(src)}:{line}: {text!r}" for p in [src / "evaluation" / "report.py", *sorted((src / "reproduce").glob("*.py"))]
             for line, text in _literals(p) if pattern.search(text)]
    assert found == []
