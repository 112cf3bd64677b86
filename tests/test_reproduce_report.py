"""The reproduce report's arithmetic on hand-written results.json files: means over seeds, their
spread, the benchmarks' own standard errors, relative improvement over Direct-FT and its average."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.report import summarise, tables

SCORES = {  # variant -> seed -> (emobench, eqbench)
    "direct_ft": {0: (0.40, 30.0), 1: (0.50, 40.0)},
    "personafuse": {0: (0.60, 45.0), 1: (0.50, 55.0)},
    "base": {0: (0.0, 10.0), 1: (0.0, 12.0)},
}


def _write(out: Path) -> None:
    for v, seeds in SCORES.items():
        for s, (emo, eq) in seeds.items():
            d = out / "eval" / v / f"seed{s}"
            d.mkdir(parents=True)
            blocks = {"emobench": {"score": emo, "stderr": 0.05}, "eqbench": {"score": eq, "stderr": 2.0 + s, "failed": v == "base" and s == 1}}
            (d / "results.json").write_text(json.dumps({"benchmarks": blocks}))


def test_means_spreads_and_relative_improvements(tmp_path: Path):
    _write(tmp_path)
    cfg = ReproduceConfig.load(None, ["variants=[base, direct_ft, personafuse]", "eval.benchmarks=[emobench, eq-bench]", "seeds=[0,1]"])
    s = summarise(cfg, tmp_path)
    assert s["benchmarks"] == ["emobench", "eqbench"]  # aliases resolved
    pf = s["variants"]["personafuse"]
    assert pf["benchmarks"] == pytest.approx({"emobench": 0.55, "eqbench": 50.0})
    assert pf["per_seed"]["eqbench"] == [45.0, 55.0]
    assert pf["spread"]["eqbench"] == pytest.approx(statistics.stdev([45.0, 55.0]))
    assert pf["stderr"]["eqbench"] == pytest.approx(2.5)  # the seeds' mean standard error
    rel = s["relative_improvement"]
    assert rel["personafuse"]["emobench"] == pytest.approx(100 * (0.55 - 0.45) / 0.45)
    assert rel["personafuse"]["eqbench"] == pytest.approx(100 * (50 - 35) / 35)
    assert rel["base"]["emobench"] == pytest.approx(-100.0)
    assert s["average_relative_improvement"]["personafuse"] == pytest.approx((rel["personafuse"]["emobench"] + 100 * 15 / 35) / 2)
    md = tables(s)
    assert "mean ± spread over seeds [0, 1]" in md
    assert "| PersonaFuse | 0.550 ± 0.071 | 50.00 ± 7.07 |" in md
    assert s["variants"]["base"]["failed_seeds"] == {"eqbench": [1]} and "| Base | 0.000 ± 0.000 | 11.00 ± 1.41 † |" in md
    assert "† the benchmark's own rule marks the run failed" in md
    assert f"| PersonaFuse | {rel['personafuse']['emobench']:+.1f}% | +42.9% | " in md


def test_no_direct_ft_means_no_relative_column(tmp_path: Path):
    _write(tmp_path)
    cfg = ReproduceConfig.load(None, ["variants=[base, personafuse]", "eval.benchmarks=[emobench]", "seeds=[0]"])
    s = summarise(cfg, tmp_path)
    assert s["baseline"] is None and s["relative_improvement"] == {}
    assert s["variants"]["base"]["spread"] == {"emobench": 0.0}
    assert "Relative improvement" not in tables(s) and "± standard error" in tables(s)
