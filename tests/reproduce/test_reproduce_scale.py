"""The large presets' plumbing (issue 29): the query mix reaches ``data.limit`` distinct training
queries, ``--set train.FIELD=VALUE`` edits the preset's training file, the preflight ``check`` cell
finds a missing key or a judge that is really the teacher before any work, and independent
evaluation cells run side by side, one per device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personafuse.reproduce.config import ReproduceConfig


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overlapping_sources(tmp_path: Path) -> list[str]:
    """Seeds-like situations, and two Hub datasets in their own schemas that share queries."""
    shared = [f"How do I keep a sourdough starter alive over a holiday {i}?" for i in range(30)]
    situ = _jsonl(tmp_path / "situ.jsonl", [{"query": f"My friend is grieving, what should I say ({i})?", "situation": ["grief", "work"][i % 2]}
                                            for i in range(10)] + [{"query": shared[0], "situation": "work"}])
    share = _jsonl(tmp_path / "sharegpt.jsonl", [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]}
                                                 for i, q in enumerate(shared + [f"ShareGPT question number {i} here" for i in range(40)])])
    wild = _jsonl(tmp_path / "wildchat.jsonl", [{"conversation": [{"role": "user", "content": q.upper() if i % 2 else q}], "language": "English"}
                                                for i, q in enumerate(shared + [f"WildChat message number {i} here" for i in range(40)])])
    return [f"file:{situ}", f"sharegpt:{share}", f"wildchat:{wild}"]


@pytest.mark.parametrize("limit", [20, 60, 100])
def test_the_split_holds_exactly_the_limit_of_distinct_queries_from_overlapping_sources(tmp_path: Path, limit: int):
    from personafuse.data.sources import normalise_query
    from personafuse.reproduce.run import split_queries

    specs = _overlapping_sources(tmp_path)
    cfg = ReproduceConfig.load(None, [f"data.source={json.dumps(specs)}", f"data.limit={limit}", "data.heldout=2"])
    assert split_queries(cfg, tmp_path / "q") == {"train": limit, "heldout": 4}
    train = [json.loads(x)["query"] for x in (tmp_path / "q/train.jsonl").read_text().splitlines()]
    held = [json.loads(x)["query"] for x in (tmp_path / "q/heldout.jsonl").read_text().splitlines()]
    norm = {normalise_query(q) for q in train}
    assert len(norm) == limit  # distinct after normalising (WildChat repeats ShareGPT's in capitals)
    assert not norm & {normalise_query(q) for q in held}
    # the small source gives all it has; both Hub sources contribute
    assert sum("grieving" in q for q in train + held) == 10
    assert any(q.startswith("ShareGPT") for q in train) and any(q.startswith("WildChat") for q in train)


def test_the_split_says_how_many_distinct_queries_the_sources_hold(tmp_path: Path):
    from personafuse.reproduce.run import ReproduceError, split_queries

    specs = _overlapping_sources(tmp_path)  # 11 + 70 + 70 rows, 30 shared by all three: 120 distinct
    cfg = ReproduceConfig.load(None, [f"data.source={json.dumps(specs)}", "data.limit=500", "data.heldout=2"])
    with pytest.raises(ReproduceError, match=r"data.limit: 500 training queries asked.* has 116 distinct"):
        split_queries(cfg, tmp_path / "q")


def test_set_train_fields_edit_the_presets_training_file():
    from personafuse.reproduce.config import ConfigError

    preset = "configs/reproduce/llama-3.1-8b.yaml"
    cfg = ReproduceConfig.load(preset, ["train.warmup.steps=2", "train.model.encoder_model=/tmp/enc", "train.max_length=64"])
    tc = cfg.training()
    assert (tc.warmup.steps, tc.model.encoder_model, tc.max_length) == (2, "/tmp/enc", 64)
    assert tc.warmup.lr == 1e-4 and tc.joint.steps == 300  # the rest is the preset's file (configs/paper-llama3.1-8b.yaml)
    assert cfg.train == "configs/paper-llama3.1-8b.yaml"
    with pytest.raises(ConfigError, match=r"llama-3\.1-8b\.yaml with --set: train\.warmup\.stepz: .*unknown field"):
        ReproduceConfig.load(preset, ["train.warmup.steps=2", "train.warmup.stepz=2"])
    with pytest.raises(ConfigError, match=r"eval\.devices\[1\]: 'gpu1' is not a device"):
        ReproduceConfig.load(preset, ["eval.devices=[cuda:0, gpu1]"])


# ---------------------------------------------------------------------------------- preflight
@pytest.fixture(scope="module")
def server():
    from data_fixtures import stub_server

    yield from stub_server()


def _grid(tmp_path: Path, base_url: str, *sets: str) -> ReproduceConfig:
    from reproduce_support import tiny_experiment

    return ReproduceConfig.load(tiny_experiment(tmp_path, base_url), list(sets))


def test_the_check_passes_on_a_reachable_setup_and_sends_one_request_per_data_mode(server, tmp_path: Path):
    from personafuse.reproduce.preflight import check_cell

    cfg = _grid(tmp_path, server.base_url)
    before = server.state.requests
    notes = check_cell(cfg, tmp_path / "out", "grid.yaml")
    assert server.state.requests - before == 3  # persona_cot, direct, human_like
    assert any("safetybench loads" in n for n in notes) and any(n.startswith("model: ") for n in notes)
    assert json.loads((tmp_path / "out/check/check.json").read_text())["ok"] is True


def test_a_judge_on_the_teachers_url_is_refused_unless_it_is_meant_to(server, tmp_path: Path, monkeypatch):
    from personafuse.reproduce.preflight import PreflightError, run_check

    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)  # the judge falls back to it, like the teacher
    sets = ("eval.benchmarks=[safetybench, arenahard]", "eval.judge=openai:judge")
    cfg = _grid(tmp_path, server.base_url, *sets)
    with pytest.raises(PreflightError, match=r"grid\.yaml: eval\.judge_base_url: the judge resolves to the teacher's URL .*\$OPENAI_BASE_URL"):
        run_check(cfg, tmp_path / "out", "grid.yaml")
    before = server.state.requests
    notes = run_check(_grid(tmp_path, server.base_url, *sets, "eval.judge_shares_teacher=true"), tmp_path / "out", "grid.yaml")
    assert server.state.requests - before == 3 + 1 and any("eval.judge: openai:judge" in n for n in notes)


def test_the_check_names_each_broken_field(server, tmp_path: Path, monkeypatch):
    from personafuse.evaluation.benchmarks.gpqa import GPQA
    from personafuse.reproduce.preflight import PreflightError, run_check

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    empty = tmp_path / "nodata"
    empty.mkdir()
    cfg = _grid(tmp_path, server.base_url, "model=/nowhere/model", "train_launcher=no-such-launcher --num_processes 2",
                "eval.benchmarks=[tombench, gpqa, mentalchat]", f"eval.data={empty}", "eval.judge=openai:gpt-4",
                "eval.devices=[cpu, cuda:7]", "teacher.base_url=http://127.0.0.1:9/v1")
    with pytest.raises(PreflightError) as err:
        run_check(cfg, tmp_path / "out", "grid.yaml")
    text = str(err.value)
    for fld in ("model", "train_launcher", "eval.benchmarks[0]", "eval.benchmarks[1]", "eval.judge", "eval.devices[1]", "teacher.base_url"):
        assert f"grid.yaml: {fld}: " in text, fld
    assert "'no-such-launcher' is not installed" in text and "needs an API key: export OPENAI_API_KEY" in text
    assert GPQA.gated == "Idavidrein/gpqa" and "Idavidrein/gpqa is gated" in text and "HF_TOKEN" in text  # from the class


def test_the_large_preset_dry_run_stays_offline_and_its_check_names_the_missing_judge_key(tmp_path: Path):
    from reproduce_support import reproduce

    preset = "configs/reproduce/llama-3.1-8b.yaml"
    r = reproduce("--config", preset, "--out", str(tmp_path / "x"), "--dry-run", "--no-check")
    assert r.returncode == 0, r.stderr
    assert "train/personafuse/seed2" in r.stdout and not (tmp_path / "x").exists()
    r = reproduce("--config", preset, "--out", str(tmp_path / "x"), "--dry-run", timeout=120)
    assert r.returncode == 2
    assert "llama-3.1-8b.yaml: eval.judge: openai:gpt-4-1106-preview at api.openai.com" in r.stderr and "OPENAI_API_KEY" in r.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------- side by side
def test_eval_cells_run_side_by_side_one_per_device(server, tmp_path: Path):
    from reproduce_support import reproduce, tiny_experiment

    cfg = tiny_experiment(tmp_path, server.base_url, variants=["base", "pcot_prompting"])
    out = tmp_path / "out"
    r = reproduce("--config", str(cfg), "--out", str(out), "--set", "eval.devices=[cpu, cpu]", "--set", "eval.limit=2")
    assert r.returncode == 0, r.stderr[-3000:]
    cells = ["eval/base/seed0", "eval/pcot_prompting/seed0", "replies/base/seed0", "replies/pcot_prompting/seed0"]
    spans = {c: json.loads((out / c / "device.json").read_text()) for c in cells}
    assert all(s["device"] == "cpu" and s["CUDA_VISIBLE_DEVICES"] == "" for s in spans.values())
    # two cells at once, never three (two devices)
    edges = sorted([(s["started"], 1) for s in spans.values()] + [(s["ended"], -1) for s in spans.values()])
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most == 2
    log = (out / "reproduce.log").read_text()
    assert all(log.count(f"=== {c} ") == 1 for c in cells)  # each cell's output in one block
    assert set(json.loads((out / "report/summary.json").read_text())["variants"]) == {"base", "pcot_prompting"}
