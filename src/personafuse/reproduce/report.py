"""The experiment's report, from the cells' own outputs: ``summary.json``, ``report.md`` (the
paper's Table 5/7 layout: absolute scores with standard errors, relative improvement over
Direct-FT and its average), bar figures like Figures 5-7, the router analysis on the held-out
situation queries, the encoder probing of Table 6 (when configured), the pairs file of the human
study and the time each cell took. Every number is read from a cell's ``results.json``, nothing
is recomputed from replies."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.report import TITLES as BENCH_TITLES
from personafuse.evaluation.report import plot_scores, relative_change
from personafuse.evaluation.runner import load_results
from personafuse.reproduce.config import TAT_VARIANT, TITLES, ReproduceConfig
from personafuse.reproduce.plan import QUERIES, Cell

BASELINE = "direct_ft"  # the paper reports improvements relative to Direct-finetuned


def summarise(cfg: ReproduceConfig, out: Path) -> dict[str, Any]:
    """``{"variants": {NAME: {"benchmarks": {BENCH: score}, ...}}, "relative_improvement": {NAME:
    {BENCH: pct}}, ...}``: each score the mean over seeds of its ``results.json`` score."""
    from personafuse.evaluation.benchmarks import canonical_name

    benches = [canonical_name(b) for b in cfg.eval.benchmarks]
    variants: dict[str, Any] = {}
    for v in cfg.all_variants():
        per_seed: dict[str, list[float]] = {b: [] for b in benches}
        stderr: dict[str, list[float]] = {b: [] for b in benches}
        failed: dict[str, list[int]] = {}  # seeds whose run the benchmark's own rule marks failed
        for s in cfg.seeds:
            res = load_results(out / "eval" / v / f"seed{s}")
            for b in benches:
                block = res["benchmarks"].get(b) or {}
                if isinstance(block.get("score"), int | float):
                    per_seed[b].append(float(block["score"]))
                if isinstance(block.get("stderr"), int | float):
                    stderr[b].append(float(block["stderr"]))
                if block.get("failed") is True:  # EQ-Bench: under 83.33 % of replies parsed
                    failed.setdefault(b, []).append(s)
        variants[v] = {
            "title": TITLES[v],
            "benchmarks": {b: statistics.fmean(xs) for b, xs in per_seed.items() if xs},
            # the benchmark's own standard error (the mean of the seeds' when there are several)
            "stderr": {b: statistics.fmean(xs) for b, xs in stderr.items() if xs},
            "per_seed": per_seed,
            # across seeds: the sample standard deviation (0 with one seed)
            "spread": {b: statistics.stdev(xs) if len(xs) > 1 else 0.0 for b, xs in per_seed.items() if xs},
            "failed_seeds": failed,
        }
    rel: dict[str, dict[str, float | None]] = {}
    avg: dict[str, float | None] = {}
    if BASELINE in variants:
        base = variants[BASELINE]["benchmarks"]
        for v, block in variants.items():
            if v == BASELINE:
                continue
            rel[v] = {b: relative_change(x, base[b]) if b in base else None for b, x in block["benchmarks"].items()}
            vals = [x for x in rel[v].values() if x is not None]
            avg[v] = statistics.fmean(vals) if vals else None
    return {"baseline": BASELINE if BASELINE in variants else None, "benchmarks": benches, "seeds": list(cfg.seeds),
            "variants": variants, "relative_improvement": rel, "average_relative_improvement": avg}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.1f}%" if pct else (f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}")


def tables(summary: dict[str, Any]) -> str:
    """Absolute scores (± standard error; ± spread over seeds when there are several) and the
    relative improvement over Direct-FT with its average, as the paper's Tables 5 and 7."""
    benches = summary["benchmarks"]
    several = len(summary["seeds"]) > 1
    head = "| Model | " + " | ".join(BENCH_TITLES.get(b, b) for b in benches) + " |"
    lines = ["**Absolute scores** (" + ("mean ± spread over seeds " + str(summary["seeds"]) if several else "± standard error") + ")", "",
             head, "|---" * (len(benches) + 1) + "|"]
    for v in summary["variants"].values():
        cells = []
        for b in benches:
            x = v["benchmarks"].get(b)
            err = v["spread" if several else "stderr"].get(b)
            cells.append(_fmt(x) + (f" ± {_fmt(err)}" if x is not None and err is not None else "") + (" †" if b in v["failed_seeds"] else ""))
        lines.append(f"| {v['title']} | " + " | ".join(cells) + " |")
    if any(v["failed_seeds"] for v in summary["variants"].values()):
        lines += ["", "† the benchmark's own rule marks the run failed (EQ-Bench: under 83.33 % of replies parsed); "
                  "the score covers the parsed replies only."]
    if summary["baseline"]:
        lines += ["", f"**Relative improvement over {TITLES[summary['baseline']]}** (%)", "",
                  head + " Avg. |", "|---" * (len(benches) + 2) + "|"]
        for name, rel in summary["relative_improvement"].items():
            cells = [_fmt(rel.get(b), pct=True) for b in benches]
            lines.append(f"| {TITLES[name]} | " + " | ".join(cells) + f" | {_fmt(summary['average_relative_improvement'][name], pct=True)} |")
    return "\n".join(lines) + "\n"


def cell_times(out: Path, cells: Sequence[Cell]) -> str:
    rows = ["| cell | seconds | command |", "|---|---|---|"]
    total = 0.0
    for c in cells:
        p = out / c.name / "done.json"
        if c.kind == "report" or not p.is_file():
            continue
        d = json.loads(p.read_text(encoding="utf-8"))
        total += float(d["seconds"])
        cmd = " ".join(d["command"]) if c.kind != "queries" else "(split of the query source)"
        rows.append(f"| {c.name} | {d['seconds']:.0f} | `{cmd}` |")
    rows.append(f"| **total** | **{total:.0f}** | |")
    return "\n".join(rows) + "\n"


def router_analysis(cfg: ReproduceConfig, out: Path, report: Path) -> str:
    """Mean routing weight per held-out situation (and per benchmark) for each routed variant."""
    from personafuse.evaluation.routing_analysis import analyse

    parts = []
    for v in ("personafuse", TAT_VARIANT):
        if v not in cfg.all_variants():
            continue
        seed = cfg.seeds[0]
        model = out / "train" / v / f"seed{seed}" / "joint" / "model"
        rep = analyse([str(out / "eval" / v / f"seed{seed}")], situations=str(out / QUERIES / "heldout.jsonl"),
                      model=f"pf:{model}", out=str(report / "routing" / v))
        radars = ", ".join(f"[{p.name}](routing/{v}/{p.name})" for p in rep.files if p.suffix == ".png")
        parts.append(f"### {TITLES[v]} (seed {seed})\n\n{rep.markdown}\nRadar charts: {radars}\n")
    return "\n".join(parts)


def probing(cfg: ReproduceConfig, out: Path, report: Path) -> str:
    """The paper's Table 6 on the configured dataset: the router's encoder before and after training."""
    if not cfg.probe.dataset or "personafuse" not in cfg.all_variants():
        return "Not run: set `probe.dataset` (and `probe.data` for a local copy) to probe the encoders.\n"
    from personafuse.evaluation.probing import run_probe

    model = out / "train" / "personafuse" / f"seed{cfg.seeds[0]}" / "joint" / "model"
    enc = json.loads((model / "personafuse_config.json").read_text())["encoder_model"]
    before = enc if enc in ("smollm2", "minilm", "default") else f"hf:{enc}"
    pr = cfg.probe
    dataset, text, label = pr.dataset, pr.text_field, pr.label_field
    if dataset == "seeds":
        import importlib.resources

        dataset, text, label = str(importlib.resources.files("personafuse.data") / "seeds" / "seed_queries.jsonl"), "query", "situation"
    rep = run_probe(dataset, [before, f"pf:{model}"], text_field=text, label_field=label, limit=pr.limit, seed=cfg.seeds[0],
                    out=str(report / "probe"), data_file=pr.data)
    return (f"Softmax regression on frozen embeddings of `{pr.dataset}` ({rep['n']} texts): the router's encoder "
            f"before training (`{before}`) and after (`pf:`, PersonaFuse seed {cfg.seeds[0]}).\n\n" + rep["markdown"])


def pairs(cfg: ReproduceConfig, out: Path, report: Path) -> str:
    folder = report / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    for v in cfg.all_variants():
        shutil.copyfile(out / "replies" / v / f"seed{cfg.seeds[0]}" / "replies.jsonl", folder / f"{v}.jsonl")
    ref = " --reference personafuse" if "personafuse" in cfg.all_variants() else ""
    return (f"One file per variant in `report/pairs/` (its replies to the held-out situation queries). Serve the study with\n"
            f"`personafuse annotate serve report/pairs/*.jsonl{ref}`.\n")


def write_report(cfg: ReproduceConfig, out: Path, cells: Sequence[Cell]) -> Path:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary = summarise(cfg, out)
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    names = list(summary["variants"])
    metrics = {v: {(b, "score"): x for b, x in summary["variants"][v]["benchmarks"].items()} for v in names}
    figures = plot_scores(names, metrics, TITLES, summary["baseline"], report)
    sections = [
        "# Reproduction report\n",
        tables(summary),
        "## Figures\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n",
        "## Router analysis (held-out situation queries)\n\n" + (router_analysis(cfg, out, report) or "No routed variant in this grid.\n"),
        "## Encoder probing (Table 6)\n\n" + probing(cfg, out, report),
        "## Pairwise human study\n\n" + pairs(cfg, out, report),
        "## Time per cell\n\n" + cell_times(out, cells),
    ]
    (report / "report.md").write_text("\n".join(sections), encoding="utf-8")
    return report
