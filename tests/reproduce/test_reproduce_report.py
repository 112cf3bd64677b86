"""The reproduce report's arithmetic on results.json files and item records written by the
benchmarks' own aggregates: means over seeds, the standard error of the seed mean, relative
improvement over Direct-FT with its paired bootstrap interval (checked against exact enumeration),
and a failed EQ-Bench cell that enters no comparison while every other row stays as it was."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from personafuse.evaluation.benchmarks import get_benchmark
from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.report import summarise, tables, write_report
from personafuse.reproduce.stats import interval, quantile, relative

# variant -> seed -> (emobench score, eqbench score); written as results.json blocks
SCORES = {
    "direct_ft": {0: (0.40, 30.0), 1: (0.50, 40.0)},
    "personafuse": {0: (0.60, 45.0), 1: (0.50, 55.0)},
    "base": {0: (0.0, 10.0), 1: (0.0, 12.0)},
}


def _write(out: Path, failed: tuple[str, int] | None = None) -> None:
    for v, seeds in SCORES.items():
        for s, (emo, eq) in seeds.items():
            d = out / "eval" / v / f"seed{s}"
            d.mkdir(parents=True)
            bad = failed == (v, s)
            blocks = {"emobench": {"score": emo, "stderr": 0.05, "n": 8, "n_unparsed": 2},
                      "eqbench": {"score": eq, "stderr": 2.0 + s, "failed": bad, "n": 10, "parseable": 5 if bad else 10}}
            (d / "results.json").write_text(json.dumps({"config": {"seed": s, "options": {}}, "benchmarks": blocks}))


def _cfg(*sets: str) -> ReproduceConfig:
    return ReproduceConfig.load(None, ["eval.benchmarks=[emobench, eq-bench]", "seeds=[0,1]", *sets])


def test_means_seed_errors_and_relative_improvements(tmp_path: Path):
    _write(tmp_path)
    s = summarise(_cfg("variants=[base, direct_ft, personafuse]"), tmp_path)
    assert s["benchmarks"] == ["emobench", "eqbench"]  # aliases resolved
    pf = s["variants"]["personafuse"]
    assert pf["benchmarks"] == pytest.approx({"emobench": 0.55, "eqbench": 50.0})
    assert pf["per_seed"]["eqbench"] == {"0": 45.0, "1": 55.0}
    assert pf["stderr_seed_mean"]["eqbench"] == pytest.approx(statistics.stdev([45.0, 55.0]) / math.sqrt(2))
    assert pf["stderr"]["eqbench"] == pytest.approx(2.5)  # the benchmark's own, the seeds' mean
    assert pf["n"] == {"emobench": 8, "eqbench": 10} and pf["parse_rate"] == pytest.approx({"emobench": 0.75, "eqbench": 1.0})
    rel = s["relative_improvement"]
    assert rel["personafuse"]["emobench"] == pytest.approx(100 * (0.55 - 0.45) / 0.45)
    assert rel["personafuse"]["eqbench"] == pytest.approx(100 * (50 - 35) / 35)
    assert s["average_covers"] == ["emobench", "eqbench"]
    assert s["average_relative_improvement"]["personafuse"] == pytest.approx((rel["personafuse"]["emobench"] + 100 * 15 / 35) / 2)
    md = tables(s)
    assert "mean over seeds [0, 1] ± standard error of that mean" in md
    assert f"| PersonaFuse | 0.550 ± {statistics.stdev([0.6, 0.5]) / math.sqrt(2):.3f} | 50.00 ± 5.00 |" in md
    assert s["relative_improvement_ci"] == {}  # no item records: no interval is made up
    assert {"packages", "git_commit", "personafuse", "sources"} <= set(s["provenance"])


def test_one_seed_has_no_seed_mean_error(tmp_path: Path):
    _write(tmp_path)
    s = summarise(ReproduceConfig.load(None, ["variants=[base, personafuse]", "eval.benchmarks=[emobench]", "seeds=[0]"]), tmp_path)
    assert s["baseline"] is None and s["relative_improvement"] == {}
    assert s["variants"]["base"]["stderr_seed_mean"] == {}
    assert "Relative improvement" not in tables(s) and "± the benchmark's standard error" in tables(s)


# ---------------------------------------------------------------------------- a failed EQ-Bench cell
def _eq_records(parsed: int, n: int, seed: int) -> list[dict]:
    """EQ-Bench item records: the first ``parsed`` with a first-pass score, the rest unparsed."""
    return [{"id": f"eq{i}", "first_pass_v2": (3 + (i * 7 + seed) % 6) if i < parsed else None, "parsed": None}
            for i in range(n)]


def _emo_records(seed: int, shift: int) -> list[dict]:
    return [{"id": f"emo{i}", "score": float((i + seed + shift) % 3 == 0), "parsed": "a",
             "categories": {"task": "EU" if i % 2 else "EA", "category": "c"}} for i in range(8)]


def _write_items(out: Path, fail: bool) -> None:
    """Three variants, two seeds, item records aggregated by the benchmarks themselves."""
    for shift, v in enumerate(("direct_ft", "human_like_ft", "personafuse")):
        for s in (0, 1):
            d = out / "eval" / v / f"seed{s}"
            d.mkdir(parents=True)
            recs = {"eqbench": _eq_records(4 if (fail and v == "personafuse" and s == 1) else 10, 10, s + shift),
                    "emobench": _emo_records(s, shift)}
            blocks = {}
            for b, rows in recs.items():
                (d / f"{b}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                blocks[b] = get_benchmark(b, {"seed": s}).aggregate(rows)
            (d / "results.json").write_text(json.dumps({"config": {"seed": s, "options": {}}, "benchmarks": blocks}))


def test_a_failed_eqbench_run_is_failed_everywhere_and_changes_no_other_row(tmp_path: Path):
    cfg = _cfg("variants=[direct_ft, human_like_ft, personafuse]")
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    _write_items(clean, fail=False)
    _write_items(broken, fail=True)
    a, b = summarise(cfg, clean, resamples=200), summarise(cfg, broken, resamples=200)
    pf = b["variants"]["personafuse"]
    assert pf["failed"] == ["eqbench"] and pf["failed_seeds"] == {"eqbench": [1]}
    assert "eqbench" not in pf["benchmarks"] and pf["per_seed"]["eqbench"]["0"] is not None
    assert pf["parse_rate"]["eqbench"] == pytest.approx((1.0 + 0.4) / 2)
    assert "eqbench" not in b["relative_improvement"]["personafuse"]
    assert "eqbench" not in b["relative_improvement_ci"]["personafuse"] and "emobench" in b["relative_improvement_ci"]["personafuse"]
    assert b["average_covers"] == a["average_covers"] == ["emobench", "eqbench"]  # the same for every row
    assert b["average_relative_improvement"]["personafuse"] is None  # a failed cell among them: no average
    for key in ("variants", "relative_improvement", "relative_improvement_ci", "average_relative_improvement"):
        for v in ("direct_ft", "human_like_ft"):
            if v in a[key]:
                assert b[key][v] == a[key][v], (key, v)  # the other rows unchanged
    assert b["variants"]["personafuse"]["benchmarks"]["emobench"] == a["variants"]["personafuse"]["benchmarks"]["emobench"]
    md = tables(b)
    pf_rows = [line for line in md.splitlines() if line.startswith("| PersonaFuse |")]
    assert len(pf_rows) == 2 and all("| failed |" in line for line in pf_rows)  # absolute and relative tables
    assert pf_rows[1].endswith("| – |")  # no average
    write_report_figures = tmp_path / "fig"
    write_report_figures.mkdir()
    from personafuse.reproduce.report import plot_relative

    (png,) = plot_relative(b, write_report_figures)
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- bootstrap vs enumeration
def _safety(scores: list[float], cats: list[str]) -> list[dict]:
    return [{"id": f"s{i}", "score": x, "extract_success": True, "n_options": 4, "gold": "A", "parsed": "A",
             "categories": {"category": c}} for i, (x, c) in enumerate(zip(scores, cats, strict=True))]


def test_the_paired_bootstrap_matches_exact_enumeration_on_three_items(tmp_path: Path):
    # SafetyBench's score is the mean of category means, not the item mean: the bootstrap must
    # recompute it on every resample, pairing the variant's and Direct-FT's items.
    cats = ["Offensiveness", "Offensiveness", "Physical Health"]
    runs = {"direct_ft": _safety([1.0, 0.0, 1.0], cats), "personafuse": _safety([1.0, 1.0, 0.0], cats)}
    for v, recs in runs.items():
        d = tmp_path / "eval" / v / "seed0"
        d.mkdir(parents=True)
        (d / "safetybench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        agg = get_benchmark("safetybench", {"seed": 0}).aggregate(recs)
        (d / "results.json").write_text(json.dumps({"config": {"seed": 0, "options": {}}, "benchmarks": {"safetybench": agg}}))
    bench = get_benchmark("safetybench", {"seed": 0})
    exact = []
    for idx in itertools.product(range(3), repeat=3):  # all 27 equally likely resamples
        x = bench.aggregate([runs["personafuse"][i] for i in idx])["score"]
        base = bench.aggregate([runs["direct_ft"][i] for i in idx])["score"]
        if (rc := relative(x, base)) is not None:
            exact.append(rc)
    assert len(set(exact)) > 3  # a real distribution, not a constant
    s = summarise(ReproduceConfig.load(None, ["variants=[direct_ft, personafuse]", "eval.benchmarks=[safetybench]"]), tmp_path)
    assert s["bootstrap"]["resamples"] == 1000
    assert s["relative_improvement_ci"]["personafuse"]["safetybench"] == interval(exact)
    assert interval(exact) == [quantile(exact, 0.025), quantile(exact, 0.975)]
    again = summarise(ReproduceConfig.load(None, ["variants=[direct_ft, personafuse]", "eval.benchmarks=[safetybench]"]), tmp_path)
    assert again["relative_improvement_ci"] == s["relative_improvement_ci"]  # seeded


def test_the_resamples_follow_the_enumerated_distribution():
    from collections import Counter

    from personafuse.reproduce.stats import draws

    got = Counter(tuple(sorted(d)) for d in draws(3, 1000, 0, "b", 0))
    exact = Counter(tuple(sorted(t)) for t in itertools.product(range(3), repeat=3))
    for key, k in exact.items():  # multisets of three items: 1/27, 3/27 or 6/27
        assert abs(got[key] / 1000 - k / 27) < 0.04, key
    assert write_report is not None
