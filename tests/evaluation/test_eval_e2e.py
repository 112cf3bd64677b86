"""End to end on the embedded SmolLM2-135M-Instruct (``--model base``: the plain base model): ``eval --limit 5`` on EmoBench, EQ-Bench and
GSM8K (real model, real prompts, our fixture files or the real benchdata), then ``report`` with a
table and a plot, then a resumed run that generates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from eval_support import FIXTURE_BENCHDATA, real_benchdata
from personafuse.evaluation.benchmarks import get_benchmark
from personafuse.evaluation.cli import register

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)  # shared CPUs: one thread per process avoids oversubscription stalls


def test_embedded_model_eval_report_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = typer.Typer()
    register(app)
    cli = CliRunner()
    data = real_benchdata() or FIXTURE_BENCHDATA
    run = tmp_path / "smollm2"
    args = [
        "eval", "--model", "base", "--benchmarks", "emobench,eqbench,gsm8k", "--limit", "5",
        "--data", str(data), "--out", str(run), "--batch-size", "5", "--no-progress",
        "-o", "gsm8k.max_new_tokens=160",
    ]
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((run / "results.json").read_text())
    for name in ("emobench", "eqbench", "gsm8k"):
        block = res["benchmarks"][name]
        assert block["n_items"] == min(5, len(get_benchmark(name).load(str(data))))  # --limit 5 of what is there
        assert isinstance(block["score"], float)
        lines = [json.loads(x) for x in (run / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == block["n_items"]
        assert all({"id", "response", "parsed", "score"} <= set(x) for x in lines)
        assert all(isinstance(x["response"], str) for x in lines)
    eq = res["benchmarks"]["eqbench"]
    eq_lines = [json.loads(x) for x in (run / "eqbench.jsonl").read_text().splitlines()]
    scored = sum(1 for x in eq_lines if x["score"] is not None)
    assert eq["percent_parseable"] == pytest.approx(round(100 * scored / len(eq_lines), 2))
    assert eq["mean_attempts"] == pytest.approx(sum(x["attempts"] for x in eq_lines) / len(eq_lines), abs=1e-3)
    assert res["subject"]["name"] == "smollm2-135m-instruct"

    rep = cli.invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    assert rep.exit_code == 0, rep.output
    assert "EmoBench" in rep.output and "EQ-Bench" in rep.output and "GSM8K" in rep.output
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert pngs and all(p.stat().st_size > 5000 for p in pngs)

    # Resuming a finished run loads no model and generates nothing: a model load would fail here,
    # and every stored reply file stays byte for byte as it was.
    stored = {p.name: p.read_bytes() for p in run.glob("*.jsonl")}

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("resuming a finished run loaded a model")

    monkeypatch.setattr("personafuse.evaluation.subjects.load_subject", no_model)
    again = cli.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl")} == stored
    assert json.loads((run / "results.json").read_text())["benchmarks"] == res["benchmarks"]
