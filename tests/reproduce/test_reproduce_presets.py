"""The two large presets proven without the hardware (issue 29, item 5): each runs end to end with
``--set`` overrides only - its base a random model of the same architecture family saved locally,
its encoder a random Qwen2, each Hub query source a local file in that dataset's own schema read by
the same adapter, teacher and judge OpenAI-compatible servers on loopback, training under
``accelerate launch --cpu --num_processes 2``, one seed, one item of every benchmark from fixtures
in each benchmark's official format. Every cell completes and the report has every variant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_fixtures import REPO, stub_server
from eval_support import FIXTURE_BENCHDATA
from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.plan import plan
from reproduce_support import reproduce

sys.path.insert(0, str(REPO / "benchmarks"))
import standins  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    yield from stub_server()


@pytest.fixture(scope="module")
def judge():
    with standins.JudgeServer() as j:
        yield j


# The 8B preset with every Table 3 variant; the 1.7B preset, whose cells differ from it only in the
# base family and training file, with one variant of each kind of cell (untrained, SFT baseline,
# the three-stage PersonaFuse) to keep the two runs within the test budget.
@pytest.mark.timeout(1500)
@pytest.mark.parametrize(("preset", "family", "extra"), [("smollm2-1.7b.yaml", "smollm2", ["variants=[base, direct_ft, personafuse]"]),
                                                         ("llama-3.1-8b.yaml", "llama3", [])])
def test_a_large_preset_runs_every_cell_on_stand_ins(preset: str, family: str, extra: list[str], teacher, judge, tmp_path: Path):
    standins.make_base(tmp_path / "base", family)
    standins.make_encoder(tmp_path / "encoder")
    sets = standins.preset_sets(tmp_path, teacher.base_url, judge.base_url, benchdata=FIXTURE_BENCHDATA)
    sets += ["eval.devices=[cpu, cpu]", *extra]  # two cells at once on two cores (data, eval, replies)
    config = REPO / "configs" / "reproduce" / preset
    out = tmp_path / "out"
    args = ["--config", str(config), "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    r = reproduce(*args, timeout=1400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]

    cfg = ReproduceConfig.load(config, sets)
    assert cfg.train_launcher == "accelerate launch --cpu --num_processes 2" and len(cfg.eval.benchmarks) == 9
    for cell in plan(cfg):  # every cell ran to its end
        assert (out / cell.name / "done.json").is_file(), cell.name
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert list(summary["variants"]) == cfg.all_variants()
    for v, row in summary["variants"].items():  # each benchmark scored, or marked failed by its own rule
        assert set(row["benchmarks"]) | set(row["failed"]) == set(cfg.eval.benchmarks), v  # (EQ-Bench: < 83.33 % parsed)
    # every training cell ran under the launcher (accelerate's --cpu is its one-process simple
    # launcher), on this family's random base and the Qwen2 encoder
    log = (out / "reproduce.log").read_text()
    trains = [c.name for c in plan(cfg) if c.kind == "train"]
    assert all(f"=== {t} " in log and log.split(f"=== {t} ", 1)[1].split("\n", 1)[0].split("$ ", 1)[1].startswith(
        "accelerate launch --cpu --num_processes 2 -m personafuse.cli train") for t in trains)
    assert "warmup: one process on cpu" in log
    trained = json.loads((out / "train/personafuse/seed0/reproduce_train.json").read_text())
    assert trained["model"]["base_model"] == str(tmp_path / "base") and trained["model"]["encoder_model"] == str(tmp_path / "encoder")
    base_cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert base_cfg["tie_word_embeddings"] is (family == "smollm2")
    # the Hub sources' adapters read their files: each gave training queries, the shared one once
    train = [json.loads(x)["query"] for x in (out / "queries" / "train.jsonl").read_text().splitlines()]
    assert len(train) == len(set(train)) == 308
    for kind in ("ShareGPT:", "WildChat:", "PersonaHub:", "Infinity:"):
        assert any(q.startswith(kind) for q in train), kind
