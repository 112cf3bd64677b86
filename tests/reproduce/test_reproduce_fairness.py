"""Equal footing for the grid's variants (issue 30, section 3): PersonaFuse's experts start from the
cell's seed, every trained variant learns from the same query ids (those every data mode accepted),
and the TAT-labelled PersonaFuse warms up its own experts when its labels differ from the teacher's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.plan import plan
from personafuse.reproduce.report import training_summary
from personafuse.reproduce.run import train_config, write_train_config
from personafuse.reproduce.variants import TAT_VARIANT, variant


def _records(folder: Path, ids: list[int], p_of=lambda i: [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"train-{i}", "key": f"train-{i}", "query": f"query {i}", "response": f"reply {i}", "p": p_of(i)} for i in ids]
    (folder / "records-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _grid(tmp_path: Path, labeller: str = "both") -> tuple[ReproduceConfig, Path]:
    cfg = ReproduceConfig.load(None, ["variants=[direct_ft, human_like_ft, pcot_ft, random_route_2, personafuse]",
                                      f"data.labeller={labeller}", "seeds=[0]"])
    out = tmp_path / "out"
    # each data mode rejected a different query; the TAT labeller relabels every Persona-CoT record
    _records(out / "data/persona_cot", [0, 1, 2, 3, 4, 5, 6])
    _records(out / "data/direct", [0, 1, 2, 4, 5, 6, 7])
    _records(out / "data/human_like", [0, 1, 2, 3, 5, 6, 7])
    _records(out / "relabel/persona_cot", [0, 1, 2, 3, 4, 5, 6], p_of=lambda i: [0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    return cfg, out


def _write_all(cfg: ReproduceConfig, out: Path) -> list:
    cells = [c for c in plan(cfg) if c.kind == "train"]
    for c in cells:  # in plan order: PersonaFuse first, its warm-up then exists for those that share it
        write_train_config(cfg, c, out)
        if c.variant == "personafuse":
            (out / c.name / "warmup/model").mkdir(parents=True)
            (out / c.name / "warmup/model/model.safetensors").write_bytes(b"teacher-labelled warm-up")
    return cells


def test_every_trained_variant_learns_from_the_same_query_ids(tmp_path: Path):
    cfg, out = _grid(tmp_path)
    cells = _write_all(cfg, out)
    assert {c.variant for c in cells} == {v for v in cfg.all_variants() if variant(v).trained}
    common = ["train-0", "train-1", "train-2", "train-5", "train-6"]  # accepted by all three modes
    for c in cells:
        ids = json.loads((out / c.name / "training_ids.json").read_text())["ids"]
        assert ids == common, c.name
        rows = [json.loads(x) for x in (out / c.name / "records.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == common
        tc = json.loads((out / c.name / "reproduce_train.json").read_text())
        assert tc["data"] == f"{c.name}/records.jsonl"
    direct = [json.loads(x) for x in (out / "train/direct_ft/seed0/records.jsonl").read_text().splitlines()]
    assert direct[0]["response"] == "reply 0"  # each variant keeps its own mode's records
    assert training_summary(cfg, out) == {"query_ids": 5, "same_ids": True, "cells": len(cells)}


def test_the_tat_variant_warms_up_its_own_experts_when_its_labels_differ(tmp_path: Path):
    cfg, out = _grid(tmp_path)
    _write_all(cfg, out)
    tat = out / f"train/{TAT_VARIANT}/seed0"
    assert not (tat / "warmup").exists()  # trains its own warm-up, on its own labels
    p = {json.loads(x)["p"][1] for x in (tat / "records.jsonl").read_text().splitlines()}
    assert p == {1}  # the TAT labels, not the teacher's
    # Random Route shares PersonaFuse's records and labels: the same warm-up, copied
    assert (out / "train/random_route_2/seed0/warmup/model/model.safetensors").read_bytes() == b"teacher-labelled warm-up"


def test_equal_labels_share_personafuses_warm_up(tmp_path: Path):
    cfg, out = _grid(tmp_path)
    _records(out / "relabel/persona_cot", [0, 1, 2, 3, 4, 5, 6])  # the labeller agreed with the teacher everywhere
    _write_all(cfg, out)
    assert (out / f"train/{TAT_VARIANT}/seed0/warmup/model/model.safetensors").read_bytes() == b"teacher-labelled warm-up"


def test_personafuse_starts_from_the_cells_seed(tmp_path: Path):
    from eval_support import make_tiny_llama
    from personafuse.moe.model import PersonaFuseModel

    base, enc = make_tiny_llama(tmp_path / "base"), make_tiny_llama(tmp_path / "encoder")
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"model": {"embed_dim": 16, "dtype": "float32", "encoder_model": str(enc)}}))
    cfg = ReproduceConfig.load(None, [f"model={base}", f"train={train}", "variants=[personafuse]", "seeds=[0, 1]"])
    cells = {c.seed: c for c in plan(cfg) if c.kind == "train"}
    experts = {}
    for seed, cell in cells.items():
        tc = train_config(cfg, cell)
        assert tc.model.seed == tc.seed == seed
        pf = PersonaFuseModel.from_config(tc.model)
        experts[seed] = {k: v.detach().clone() for k, v in pf.state_dict().items() if "lora_A" in k}
    again = PersonaFuseModel.from_config(train_config(cfg, cells[0]).model)
    assert experts[0] and all(not bool((experts[0][k] == experts[1][k]).all()) for k in experts[0])
    for k, v in again.state_dict().items():
        if "lora_A" in k:
            assert bool((v == experts[0][k]).all())  # the same seed: the same experts


@pytest.mark.parametrize("labeller", ["teacher", "tat"])
def test_train_cells_depend_on_every_data_cell(tmp_path: Path, labeller: str):
    cfg, _ = _grid(tmp_path, labeller)
    for c in plan(cfg):
        if c.kind == "train":
            assert {"data/persona_cot", "data/direct", "data/human_like"} <= set(c.needs), c


def test_every_seed_evaluates_the_same_items(tmp_path: Path):
    # eval.item_seed / --item-seed picks the items; --seed keeps its role for sampling and routing
    from eval_support import FIXTURE_BENCHDATA, ChatServer
    from personafuse.evaluation.data import subsample
    from personafuse.evaluation.runner import EvalConfig, Runner
    from personafuse.evaluation.subjects import OpenAISubject

    def ids(seed: int, item_seed: int) -> list[str]:
        cfg = EvalConfig(model="openai:m", benchmarks=["gsm8k"], out=str(tmp_path / f"{seed}-{item_seed}"), data=str(FIXTURE_BENCHDATA),
                         limit=2, seed=seed, item_seed=item_seed, options={"gsm8k": {"num_fewshot": 0}})
        with ChatServer(lambda m, b: "#### 1") as srv:
            Runner(cfg, lambda: OpenAISubject("m", base_url=srv.base_url, api_key="k"), progress=False).run()
        return [json.loads(x)["id"] for x in (tmp_path / f"{seed}-{item_seed}" / "gsm8k.jsonl").read_text().splitlines()]

    other = next(s for s in range(1, 50) if subsample(list(range(3)), 2, s) != subsample(list(range(3)), 2, 0))
    assert ids(0, 0) == ids(1, 0) == ids(7, 0)
    assert ids(0, other) != ids(0, 0)
    from personafuse.reproduce.run import command

    cfg = ReproduceConfig.load(None, ["variants=[base]", "seeds=[0, 1]", "eval.item_seed=3"])
    evals = [command(cfg, c) for c in plan(cfg) if c.kind == "eval"]
    assert all(cmd[cmd.index("--item-seed") + 1] == "3" for cmd in evals) and len(evals) == 2
