"""Persona-encoder probing with real encoders, and routing analysis (tables + radar PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_support import FIXTURE_BENCHDATA, FIXTURES, ChatServer
from personafuse.evaluation.data import DataError
from personafuse.evaluation.probing import load_probe_data, probe_accuracy, run_probe
from personafuse.evaluation.routing_analysis import analyse
from personafuse.evaluation.runner import EvalConfig, Runner
from personafuse.evaluation.subjects import OpenAISubject
from personafuse.traits import TRAIT_POLES, weights_dict

torch.set_num_threads(1)
INTENTS = FIXTURES / "probing" / "intents.csv"


def test_probe_trained_encoder_beats_untrained_base(tmp_path: Path) -> None:
    rep = run_probe(str(INTENTS), ["minilm", "random:minilm"], text_field="utterance", label_field="domain", seed=0, out=str(tmp_path))
    trained = rep["results"]["minilm"]["accuracy"]
    untrained = rep["results"]["random:minilm"]["accuracy"]
    assert trained >= 0.85 and trained > untrained
    assert rep["results"]["minilm"]["n_test"] == 8 and rep["results"]["minilm"]["n_classes"] == 3
    assert (tmp_path / "probe_intents.json").is_file() and "| minilm |" in rep["markdown"]


def test_probe_split_is_fixed() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = ["a", "b"] * 20
    assert probe_accuracy(x, y, seed=3) == probe_accuracy(x, y, seed=3)


def test_probe_data_errors() -> None:
    with pytest.raises(DataError, match="missing field 'text'"):
        load_probe_data(str(INTENTS))
    with pytest.raises(DataError, match="neither a local file"):
        load_probe_data("no-such-dataset")


def _weights_reply(messages, body):
    """An endpoint that, like a PersonaFuse server, reports routing weights beside the message:
    high_A grows and high_C shrinks with each question (ids 0, 1, 2)."""
    q = messages[-1]["content"]
    i = 0 if "rude joke" in q else 1 if "grease fire" in q else 2
    w = [0.0] * 10
    w[6], w[2] = (0.5 + 0.1 * i, 0.5 - 0.1 * i)
    return "Answer: B", {"personafuse": {"weights": weights_dict(w)}}


def test_routing_analysis_from_runs_and_situations(tmp_path: Path) -> None:
    # A run whose records carry the weights the endpoint reported.
    with ChatServer(_weights_reply) as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["safetybench"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA))
        res = Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False).run()
    assert res["benchmarks"]["safetybench"]["mean_weights"]["high_A"] == pytest.approx(0.6)

    def router(queries):
        out = []
        for q in queries:
            w = [0.0] * 10
            w[8 if ("died" in q or "passed" in q) else 2] = 1.0  # grief → high_N, else high_C
            out.append(weights_dict(w))
        return out

    rep = analyse([str(tmp_path / "run")], situations=str(FIXTURES / "situations.jsonl"), router=router, out=str(tmp_path / "routing"))
    by = {(r["source"], r["group"]): r for r in rep.rows}
    assert by[("run", "safetybench")]["high_A"] == pytest.approx(0.6) and by[("run", "safetybench")]["n"] == 3
    assert by[("situations", "grief")]["high_N"] == 1.0 and by[("situations", "grief")]["n"] == 2
    assert by[("situations", "math")]["high_C"] == 1.0
    routed = [json.loads(x) for x in (tmp_path / "routing" / "situations_routed.jsonl").read_text().splitlines()]
    assert routed[0]["source"] == "made-up" and set(routed[0]["weights"]) == set(TRAIT_POLES)  # other fields kept
    pngs = [f for f in rep.files if f.suffix == ".png"]
    assert len(pngs) == 2 and all(f.stat().st_size > 5000 for f in pngs)
    assert "| situations | grief | 2 |" in rep.markdown


def test_routing_analysis_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with ChatServer(lambda m, b: "Answer: B") as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["safetybench"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False).run()
    with pytest.raises(ValueError, match="no routing weights"):
        analyse([str(tmp_path / "run")])


def test_probe_and_routing_commands(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from personafuse.evaluation.cli import register

    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["probe", "--dataset", str(INTENTS), "--text-field", "utterance", "--label-field", "domain", "--encoder", "minilm", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "| minilm |" in r.output and (tmp_path / "probe_intents.md").is_file()
    with ChatServer(_weights_reply) as srv:
        cfg = EvalConfig(model="openai:m", benchmarks=["safetybench"], out=str(tmp_path / "run"), data=str(FIXTURE_BENCHDATA))
        Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url), progress=False).run()
    r = CliRunner().invoke(app, ["routing", str(tmp_path / "run"), "--out", str(tmp_path / "routing")])
    assert r.exit_code == 0, r.output
    assert "| run | safetybench | 3 |" in r.output and (tmp_path / "routing" / "radar_benchmarks__run.png").is_file()


def test_root_cli_registers_eval_commands() -> None:
    pytest.importorskip("personafuse.chat_cli", reason="the chat commands (registered first) are not on this branch yet")
    from personafuse import cli

    cli._register()
    names = {c.name for c in cli.app.registered_commands}
    assert {"eval", "report", "routing", "probe", "lm-eval"} <= names
