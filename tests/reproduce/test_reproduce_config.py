"""The experiment grid's config and plan (issue 20): YAML plus --set overrides, errors that name
the field before any work starts, and the cells each config runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from personafuse.reproduce.config import ConfigError, ReproduceConfig
from personafuse.reproduce.plan import estimate, plan
from personafuse.reproduce.variants import listed_variants

VARIANTS = listed_variants()


def test_defaults_are_the_papers_grid():
    cfg = ReproduceConfig.load(None)
    assert cfg.variants == list(VARIANTS) and cfg.seeds == [0] and cfg.teacher.spec == "default"


def test_yaml_and_dotted_overrides(tmp_path: Path):
    f = tmp_path / "grid.yaml"
    f.write_text("teacher:\n  spec: openai:falcon\n  base_url: http://h:8000/v1\neval:\n  benchmarks: [gsm8k]\n")
    cfg = ReproduceConfig.load(f, ["eval.limit=3", "seeds=[0,1,2]", "variants=[direct_ft, personafuse]", "data.labeller=tat"])
    assert (cfg.teacher.spec, cfg.teacher.base_url) == ("openai:falcon", "http://h:8000/v1")
    assert (cfg.eval.benchmarks, cfg.eval.limit, cfg.seeds) == (["gsm8k"], 3, [0, 1, 2])
    assert cfg.variants == ["direct_ft", "personafuse"] and cfg.data.labeller == "tat"


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["variants=[base, random_route_3]"], "variants[1]"),
        (["eval.benchmarks=[gsm8k, mmlu]"], "eval.benchmarks[1]"),
        (["teacher.spec="], "teacher.spec"),
        (["teacher.spec=gpt4"], "teacher.spec"),
        (["eval.limt=3"], "eval.limt"),
        (["seeds=[0, x]"], "seeds[1]"),
        (["eval.limit=0"], "eval.limit"),
        (["data.labeller=llm"], "data.labeller"),
        (["train=nowhere.yaml"], "train"),
        (["eval=3"], "eval"),
        (["data.source=[]"], "data.source"),
        (["eval.options=[1]"], "eval.options"),
        (["data.labeller=both", "variants=[personafuse_tat]"], "variants[0]"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, sets, field):
    f = tmp_path / "grid.yaml"
    f.write_text("seeds: [0]\n")
    with pytest.raises(ConfigError, match=r"grid\.yaml.*: " + re.escape(field) + ":"):
        ReproduceConfig.load(f, sets)


def test_yaml_errors_and_bad_set_syntax_name_the_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("eval: [unclosed\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml: invalid YAML.*line 1"):
        ReproduceConfig.load(f)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        ReproduceConfig.load(None, ["eval.limit"])
    with pytest.raises(ConfigError, match="no such config file"):
        ReproduceConfig.load(tmp_path / "missing.yaml")


def test_the_plan_runs_each_cell_after_what_it_needs(tmp_path: Path):
    cfg = ReproduceConfig.load(None, ["seeds=[0,1]", "data.labeller=tat"])
    cells = plan(cfg)
    names = [c.name for c in cells]
    assert names[:5] == ["queries", "data/persona_cot", "data/direct", "data/human_like", "relabel/persona_cot"]
    for i, c in enumerate(cells):  # every dependency comes earlier
        assert all(n in names[:i] for n in c.needs), c
    trained = [c for c in cells if c.kind == "train"]
    assert len(trained) == 7 * 2  # base and pcot_prompting train nothing
    # a train cell reads its own records and every data cell (the ids all modes accepted, issue 30)
    every = ("data/persona_cot", "data/direct", "data/human_like")
    assert next(c for c in cells if c.name == "train/personafuse/seed1").needs == ("relabel/persona_cot", *every)
    # Random Route k reuses PersonaFuse's warm-up experts (tests/training/test_random_route.py: they are the same)
    assert next(c for c in cells if c.name == "train/random_route_2/seed1").needs == ("relabel/persona_cot", "train/personafuse/seed1", *every)
    assert next(c for c in cells if c.name == "train/direct_ft/seed1").needs == ("data/direct", "data/persona_cot", "data/human_like")
    assert next(c for c in cells if c.name == "eval/base/seed0").needs == ()
    assert [c.name for c in cells if c.kind == "replies"] == [f"replies/{v}/seed0" for v in VARIANTS]  # first seed only
    assert cells[-1].name == "report" and len(cells[-1].needs) == len(VARIANTS) * 3
    (tmp_path / "data/direct").mkdir(parents=True)
    (tmp_path / "data/direct/done.json").write_text("{}")
    assert [c.name for c in cells if c.done(tmp_path)] == ["data/direct"]


def test_both_labellers_add_a_tat_personafuse_on_personafuses_warmup():
    cfg = ReproduceConfig.load(None, ["data.labeller=both", "variants=[direct_ft, random_route_1, personafuse]"])
    cells = {c.name: c for c in plan(cfg)}
    assert cells["train/personafuse/seed0"].needs == ("data/persona_cot", "data/direct")  # the teacher's labels (+ every data cell)
    assert cells["train/personafuse_tat/seed0"].needs == ("relabel/persona_cot", "train/personafuse/seed0", "data/persona_cot", "data/direct")
    assert cfg.all_variants() == ["direct_ft", "random_route_1", "personafuse", "personafuse_tat"]
    with pytest.raises(ConfigError, match="variants\\[0\\]"):  # it is not a variant one lists
        ReproduceConfig.load(None, ["variants=[personafuse_tat]"])


def test_commands_are_the_projects_own(tmp_path: Path):
    from personafuse.reproduce.run import command

    cfg = ReproduceConfig.load(None, ["teacher.spec=openai:falcon", "teacher.base_url=http://h/v1", "eval.options={tombench: {max_new_tokens: 32}}",
                                      "train_launcher=accelerate launch --multi_gpu --num_processes 8", "data.source=[seeds, wildchat]"])
    cells = {c.name: c for c in plan(cfg)}
    assert command(cfg, cells["data/persona_cot"]) == [
        "personafuse", "data", "generate", "--out", "data/persona_cot", "--teacher", "openai:falcon", "--source",
        "file:queries/train.jsonl", "--mode", "persona_cot", "--seed", "0", "--no-progress", "--base-url", "http://h/v1"]
    assert command(cfg, cells["train/random_route_5/seed0"])[:6] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "8", "-m"]
    assert command(cfg, cells["train/random_route_5/seed0"])[-2:] == ["--random-route", "5"]
    ev = command(cfg, cells["eval/random_route_2/seed0"])
    assert ev[-2:] == ["--routing", "random:2"] and "tombench.max_new_tokens=32" in ev
    assert "--persona-cot-prompting" in command(cfg, cells["eval/pcot_prompting/seed0"])
    assert command(cfg, cells["eval/direct_ft/seed0"])[3] == "lora:train/direct_ft/seed0/baseline-direct/adapter"
    assert command(cfg, cells["queries"])[:3] == ["split", "seeds", "wildchat"]


def test_the_estimate_counts_requests_before_anything_runs():
    cfg = ReproduceConfig.load(None, ["variants=[base, personafuse]", "eval.benchmarks=[tombench, arenahard]", "eval.limit=4", "data.limit=10"])
    est = estimate(cfg)
    assert est["teacher_requests"] == 3 * 10  # Persona-CoT data only: three steps per query
    assert est["generations"] == (5 * 4 + 4) * 2  # ToMBench asks five times per item; two variants
    assert est["judge_requests"] == 2 * 4 * 2 and est["eval_runs"] == 2


def test_the_split_holds_out_each_situation_and_mixes_sources_in_turn(tmp_path: Path):
    import json

    from personafuse.reproduce.run import split_queries

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"query": f"alpha {i}", "situation": ["maths", "grief"][i % 2]}) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps({"query": f"beta {i}"}) + "\n" for i in range(10)))  # no situations
    cfg = ReproduceConfig.load(None, [f"data.source=[file:{a}, file:{b}]", "data.limit=8", "data.heldout=2"])
    assert split_queries(cfg, tmp_path / "q") == {"train": 8, "heldout": 4}
    held = [json.loads(x) for x in (tmp_path / "q/heldout.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "q/train.jsonl").read_text().splitlines()]
    assert sorted(r["situation"] for r in held) == ["grief", "grief", "maths", "maths"]
    assert not {r["query"] for r in held} & {r["query"] for r in train}
    # the sources take turns (alpha's first ones go to the held-out set: only alpha has situations)
    assert {r["query"].split()[0] for r in train} == {"alpha", "beta"}
    assert sum(r["query"].startswith("beta") for r in train) >= 4
    with pytest.raises(Exception, match="data.limit: 30 training queries asked"):
        split_queries(ReproduceConfig.load(None, [f"data.source=file:{a}", "data.limit=30"]), tmp_path / "q2")
