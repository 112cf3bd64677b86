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
