"""``personafuse reproduce`` end to end on tiny random models (issue 20): every variant of the
paper's Table 3 plus the TAT-labelled PersonaFuse, data from the stub teacher on loopback, two
benchmarks on fixture data, the report checked against each variant's own results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_fixtures import stub_server
from personafuse.reproduce.variants import TAT_VARIANT, listed_variants, variant_title
from reproduce_support import reproduce, tiny_experiment
from stub_teacher import StubServer


@pytest.fixture(scope="module")
def server() -> StubServer:
    yield from stub_server()


@pytest.fixture(scope="module")
def grid(server: StubServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("grid")
    cfg = tiny_experiment(folder, server.base_url, data={"limit": 12, "heldout": 1, "labeller": "both"},
                          probe={"dataset": "seeds", "limit": 60})
    out = folder / "out"
    r = reproduce("--config", str(cfg), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    return cfg, out


ALL = [*listed_variants(), TAT_VARIANT]


# The tests on the whole grid: slow (its setup ran past 600 s here on two shared cores under load
# ~10, 2026-12-06), with a longer limit than the suite's default, which that setup counts against.
def on_grid(test):
    return pytest.mark.slow(pytest.mark.timeout(1800)(test))


@on_grid
def test_every_cell_ran_and_the_report_quotes_each_variants_results(grid):
    _, out = grid
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert list(summary["variants"]) == ALL
    report_md = (out / "report" / "report.md").read_text()
    for v in ALL:
        res = json.loads((out / "eval" / v / "seed0" / "results.json").read_text())
        for bench in ("safetybench", "tombench"):
            block = res["benchmarks"][bench]
            assert summary["variants"][v]["benchmarks"][bench] == block["score"]
            assert summary["variants"][v]["stderr"][bench] == block["stderr"]
        assert variant_title(v) in report_md
    base = summary["variants"]["direct_ft"]["benchmarks"]
    for v, rel in summary["relative_improvement"].items():
        for bench, pct in rel.items():
            x = summary["variants"][v]["benchmarks"][bench]
            assert pct == (None if base[bench] == 0 else pytest.approx(100 * (x - base[bench]) / abs(base[bench])))
    assert "direct_ft" not in summary["relative_improvement"]  # the reference itself
    assert any(p.suffix == ".png" for p in (out / "report").iterdir())  # the Figures 5-7 bars
    for v in ("personafuse", TAT_VARIANT):  # router analysis on the held-out situations, both labellings
        routed = (out / "report" / "routing" / v / "situations_routed.jsonl").read_text().splitlines()
        held = (out / "queries" / "heldout.jsonl").read_text().splitlines()
        assert len(routed) == len(held) == 12  # one per situation of the seed set
        assert (out / "report" / "routing" / v / "radar_situations.png").read_bytes()[:4] == b"\x89PNG"
    probe = json.loads((out / "report" / "probe" / "probe_seed_queries.json").read_text())  # Table 6's probing
    assert probe["n"] == 60 and len(probe["results"]) == 2 and "seed_queries accuracy" in report_md
    train_queries = {json.loads(x)["query"] for x in (out / "queries" / "train.jsonl").read_text().splitlines()}
    assert not train_queries & {json.loads(x)["query"] for x in held}


@on_grid
def test_the_variants_are_built_as_the_paper_defines_them(grid):
    _, out = grid
    # Random Route k: k random experts at 1/k for every item (single-prompt SafetyBench records)
    for k in (1, 2, 5):
        recs = [json.loads(x) for x in (out / f"eval/random_route_{k}/seed0/safetybench.jsonl").read_text().splitlines()]
        for r in recs:
            on = [w for w in r["weights"].values() if w > 0]
            assert len(on) == k and on == pytest.approx([1 / k] * k)
        assert not (out / f"train/random_route_{k}/seed0/router").exists()  # no router stage
    # PersonaFuse has all three stages and a router that mixes
    pf = [json.loads(x) for x in (out / "eval/personafuse/seed0/safetybench.jsonl").read_text().splitlines()]
    assert all(sum(w > 0 for w in r["weights"].values()) == 10 for r in pf)
    # Persona-CoT prompting keeps the whole reasoning and scores the answer section
    cot = [json.loads(x) for x in (out / "eval/pcot_prompting/seed0/safetybench.jsonl").read_text().splitlines()]
    assert all("persona_cot" in r for r in cot)
    # the TAT variant learns from the TAT labels; it reuses PersonaFuse's warm-up experts only
    # when those labels equal the teacher's (the warm-up reads them), else it warms up its own
    ids = json.loads((out / f"train/{TAT_VARIANT}/seed0/training_ids.json").read_text())
    assert ids["source"] == "relabel/persona_cot"
    tat_p = {r["id"]: r["p"] for r in map(json.loads, (out / f"train/{TAT_VARIANT}/seed0/records.jsonl").read_text().splitlines())}
    pf_p = {r["id"]: r["p"] for r in map(json.loads, (out / "train/personafuse/seed0/records.jsonl").read_text().splitlines())}
    a = out / "train/personafuse/seed0/warmup/model/experts.safetensors"
    b = out / f"train/{TAT_VARIANT}/seed0/warmup/model/experts.safetensors"
    assert (a.read_bytes() == b.read_bytes()) == (tat_p == pf_p)
    tat_cfg = json.loads((out / f"train/{TAT_VARIANT}/seed0/reproduce_train.json").read_text())
    assert tat_cfg["data"] == f"train/{TAT_VARIANT}/seed0/records.jsonl"
    # one teacher, the same queries in every data mode
    queries = {}
    for mode in ("persona_cot", "direct", "human_like"):
        rows = [json.loads(x) for f in sorted((out / "data" / mode).glob("records-*.jsonl")) for x in f.read_text().splitlines()]
        queries[mode] = {r["query"] for r in rows}
    assert queries["persona_cot"] == queries["direct"] == queries["human_like"] and len(queries["direct"]) == 12


@on_grid
def test_the_pairs_file_feeds_the_annotation_study(grid, tmp_path):
    from personafuse.evaluation.annotation import AnnotationStore

    _, out = grid
    files = sorted((out / "report" / "pairs").glob("*.jsonl"))
    assert {f.stem for f in files} == set(ALL)
    store = AnnotationStore(tmp_path / "a.sqlite", reference="personafuse")
    assert store.load_responses(files) == 12 * (len(ALL) - 1)  # personafuse against each other variant


@on_grid
def test_a_rerun_finds_every_cell_cached(grid):
    cfg, out = grid
    before = (out / "reproduce.log").read_text()
    summary = (out / "report" / "summary.json").read_text()
    r = reproduce("--config", str(cfg), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "reproduce.log").read_text() == before  # no cell ran again
    assert (out / "report" / "summary.json").read_text() == summary
    dry = reproduce("--config", str(cfg), "--out", str(out), "--dry-run")
    assert dry.stdout.count("[done ]") == dry.stdout.count("\n  [")
    # a changed setting redoes the cells it changes and what depends on them, nothing else
    dry = reproduce("--config", str(cfg), "--out", str(out), "--dry-run", "--set", "eval.limit=2")
    stale = [line.split()[1] for line in dry.stdout.splitlines() if "[stale]" in line]
    assert stale == [*(f"eval/{v}/seed0" for v in ALL), "report"]


def test_dry_run_prints_the_cells_and_the_estimate_and_runs_nothing(server, tmp_path):
    cfg = tiny_experiment(tmp_path, server.base_url)
    r = reproduce("--config", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", "--set", "seeds=[0,1]")
    assert r.returncode == 0, r.stderr
    assert "personafuse train baseline --kind direct" in r.stdout and "eval/personafuse/seed1" in r.stdout
    assert "teacher requests 60" in r.stdout  # 12 queries x (3 Persona-CoT steps + Direct + Human-like)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["variants=[base, random_route_3]"], "variants[1]"),
        (["eval.benchmarks=[gsm8k, mmlu]"], "eval.benchmarks[1]"),
        (["teacher.spec="], "teacher.spec"),
    ],
)
def test_a_bad_config_is_refused_before_any_work(server, tmp_path, sets, field):
    cfg = tiny_experiment(tmp_path, server.base_url)
    r = reproduce("--config", str(cfg), "--out", str(tmp_path / "out"), *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2
    assert f"{field}:" in r.stderr and "grid.yaml" in r.stderr
    assert not (tmp_path / "out").exists()
