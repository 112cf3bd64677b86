"""The experiment's report, from the cells' own outputs: ``summary.json``, ``report.md`` (the
paper's Table 5/7 layout: absolute scores with standard errors, relative improvement over
Direct-FT and its average), bar figures like Figures 5-7, the router analysis on the held-out
situation queries, the encoder probing of Table 6 (when configured), the pairs file of the human
study and the time each cell took. Scores are read from each cell's ``results.json``; only the
bootstrap intervals re-aggregate the item records (reproduce/stats.py). A failed cell (the
benchmark's own rule, or no score) is marked failed everywhere and enters no comparison."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.report import benchmark_title
from personafuse.evaluation.runner import load_results
from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.plan import QUERIES, Cell
from personafuse.reproduce.stats import RESAMPLES, paired_intervals, relative
from personafuse.reproduce.stats import SEED as BOOT_SEED
from personafuse.reproduce.variants import BASELINE, PERSONAFUSE, VARIANT_TABLE, variant, variant_title

PCOT_FT_TARGET = ("Persona-CoT-FT is plain SFT on (query, response) pairs of the Persona-CoT records: the target is the "
                  "teacher's step-3 answer only (the text under its response heading, as `personafuse data generate` keeps it "
                  "in the record's `response`), written after the teacher named the cues and traits. The cues, traits and "
                  "rationale are not in the target, and the trait vector is not used.")


def _parse_rate(block: dict[str, Any]) -> float | None:
    """The share of items whose reply the benchmark could read."""
    n = block.get("n") or block.get("n_items")
    if not isinstance(n, int | float) or not n:
        return None
    if isinstance(block.get("parseable"), int | float):  # EQ-Bench
        return float(block["parseable"]) / n
    if isinstance(block.get("n_judged"), int | float):  # judged benchmarks: verdicts with a rating
        return float(block["n_judged"]) / n
    if isinstance(block.get("n_unparsed"), int | float):
        return 1.0 - float(block["n_unparsed"]) / n
    return None


def _variant_block(v: str, cfg: ReproduceConfig, out: Path, benches: list[str]) -> dict[str, Any]:
    """One row of the summary: each benchmark's mean over seeds unless it failed in some seed (its
    own rule, e.g. EQ-Bench under 83.33 % parsed, or a null score): then it is listed in ``failed``
    and has no score."""
    per_seed: dict[str, dict[str, float | None]] = {b: {} for b in benches}
    stderr: dict[str, list[float]] = {b: [] for b in benches}
    n: dict[str, int] = {}
    parse: dict[str, list[float]] = {b: [] for b in benches}
    failed_seeds: dict[str, list[int]] = {}
    for s in cfg.seeds:
        try:
            res = load_results(out / "eval" / v / f"seed{s}")
        except FileNotFoundError:
            res = {"benchmarks": {}}
        for b in benches:
            block = res["benchmarks"].get(b) or {}
            score = block.get("score")
            ok = isinstance(score, int | float) and math.isfinite(score)
            per_seed[b][str(s)] = float(score) if ok else None
            if not ok or block.get("failed") is True:
                failed_seeds.setdefault(b, []).append(s)
            if isinstance(block.get("stderr"), int | float):
                stderr[b].append(float(block["stderr"]))
            if (rate := _parse_rate(block)) is not None:
                parse[b].append(rate)
            if isinstance(block.get("n"), int):
                n.setdefault(b, block["n"])
    failed = [b for b in benches if b in failed_seeds]
    scores = {b: statistics.fmean(xs.values()) for b, xs in per_seed.items() if b not in failed}  # type: ignore[arg-type]
    several = len(cfg.seeds) > 1
    return {
        "title": variant_title(v),
        "benchmarks": scores,
        "n": n,
        "parse_rate": {b: statistics.fmean(xs) for b, xs in parse.items() if xs},
        "failed": failed,
        "failed_seeds": failed_seeds,
        "per_seed": per_seed,
        # the benchmark's own standard error, the seeds' mean of it
        "stderr": {b: statistics.fmean(xs) for b, xs in stderr.items() if xs and b in scores},
        # the standard error of the seed mean: stdev over seeds / sqrt(S) (absent for one seed)
        "stderr_seed_mean": {b: statistics.stdev(per_seed[b].values()) / math.sqrt(len(cfg.seeds))  # type: ignore[arg-type]
                             for b in scores} if several else {},
        "spread": {b: statistics.stdev(per_seed[b].values()) if several else 0.0 for b in scores},  # type: ignore[arg-type]
    }


def _eval_options(run: Path, bench: str) -> dict[str, Any]:
    """The options a run used for ``bench`` (as the runner builds them), for the bootstrap's
    re-aggregation; Arena-Hard's own inner bootstrap is skipped (it sets the interval, not the score)."""
    from personafuse.evaluation.benchmarks import BENCHMARKS

    cfg = load_results(run).get("config", {})
    opts = {"seed": cfg.get("seed", 0), **(cfg.get("options") or {}).get(bench, {})}
    cls = BENCHMARKS.get(bench)
    return {**opts, **cls.resample_options} if cls and cls.resample_options else opts


def summarise(cfg: ReproduceConfig, out: Path, *, resamples: int = RESAMPLES) -> dict[str, Any]:
    """``summary.json``: per variant ``benchmarks`` (mean over seeds), ``n``, ``parse_rate``,
    ``failed``, ``per_seed`` ({seed: score}), ``stderr`` and ``stderr_seed_mean``; the relative
    improvement over Direct-FT with its paired-bootstrap interval (``relative_improvement_ci``)
    and its average over ``average_covers`` (the same benchmarks for every row: those Direct-FT
    did not fail and scored above 0; a row with a failed cell among them has no average)."""
    from personafuse.evaluation.benchmarks import canonical_name

    benches = [canonical_name(b) for b in cfg.eval.benchmarks]
    variants = {v: _variant_block(v, cfg, out, benches) for v in cfg.all_variants()}
    rel: dict[str, dict[str, float | None]] = {}
    avg: dict[str, float | None] = {}
    ci: dict[str, dict[str, list[float]]] = {}
    covers: list[str] = []
    if BASELINE in variants:
        base = variants[BASELINE]["benchmarks"]
        covers = [b for b in benches if base.get(b) not in (None, 0.0)]
        for v, block in variants.items():
            if v == BASELINE:
                continue
            rel[v] = {b: relative(x, base.get(b)) for b, x in block["benchmarks"].items()}
            vals = [rel[v].get(b) for b in covers]
            avg[v] = statistics.fmean(vals) if vals and all(x is not None for x in vals) else None  # type: ignore[arg-type]
        runs = {v: {s: out / "eval" / v / f"seed{s}" for s in cfg.seeds} for v in variants}
        skip = {v: set(block["failed"]) for v, block in variants.items()}
        ci = paired_intervals(runs, BASELINE, benches, skip, _eval_options, resamples=resamples)
    return {"baseline": BASELINE if BASELINE in variants else None, "benchmarks": benches, "seeds": list(cfg.seeds),
            "variants": variants, "relative_improvement": rel, "relative_improvement_ci": ci,
            "bootstrap": {"resamples": resamples, "seed": BOOT_SEED, "level": 0.95, "paired": "items, within each seed"},
            "average_relative_improvement": avg, "average_covers": covers, "item_seed": cfg.eval.item_seed,
            "training": training_summary(cfg, out), "persona_cot_ft_target": PCOT_FT_TARGET, "provenance": provenance(cfg, out)}


def training_summary(cfg: ReproduceConfig, out: Path) -> dict[str, Any]:
    """How many query ids the trained variants learned from, and whether every one had the same."""
    from personafuse.reproduce.fairness import training_ids

    found = training_ids(out, [f"train/{v}/seed{s}" for v in cfg.all_variants() if variant(v).trained for s in cfg.seeds])
    sets = {tuple(ids) for ids in found.values()}
    return {"query_ids": len(next(iter(sets))) if len(sets) == 1 else None, "same_ids": len(sets) <= 1, "cells": len(found)}


def provenance(cfg: ReproduceConfig, out: Path) -> dict[str, Any]:
    """Package versions, the device, the git commit, and the models' and data sources' identities
    (Hub revisions or local file sizes and times) as the cells recorded them."""
    import importlib.metadata
    import platform

    from personafuse.reproduce.fingerprint import git_commit, package_version

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "lm-eval", "datasets"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    sources: dict[str, Any] = {}
    for done in sorted(out.glob("*/done.json")) + sorted(out.glob("*/*/done.json")) + sorted(out.glob("*/*/*/done.json")):
        d = json.loads(done.read_text(encoding="utf-8"))
        for src in (d.get("inputs") or {}).get("sources") or []:
            if src:
                sources[src["spec"]] = {k: v for k, v in src.items() if k != "files"}
    devices = sorted({str(_device_of(p)) for p in out.glob("eval/*/seed*/results.json")} - {"None"})
    return {"personafuse": package_version(), "git_commit": git_commit(), "python": platform.python_version(), "packages": versions,
            "platform": platform.platform(), "devices": devices, "sources": sources}


def _device_of(results: Path) -> str | None:
    subject = json.loads(results.read_text(encoding="utf-8")).get("subject") or {}
    return subject.get("device")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.1f}%" if pct else (f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}")


def tables(summary: dict[str, Any]) -> str:
    """Absolute scores (± standard error; ± standard error of the seed mean when there are
    several seeds) and the relative improvement over Direct-FT with its 95 % paired-bootstrap
    interval and average, as the paper's Tables 5 and 7. A failed cell reads "failed" in both."""
    benches = summary["benchmarks"]
    several = len(summary["seeds"]) > 1
    head = "| Model | " + " | ".join(benchmark_title(b) for b in benches) + " |"
    what = f"mean over seeds {summary['seeds']} ± standard error of that mean" if several else "± the benchmark's standard error"
    lines = [f"**Absolute scores** ({what})", "", head, "|---" * (len(benches) + 1) + "|"]
    for v in summary["variants"].values():
        cells = []
        for b in benches:
            if b in v["failed"]:
                cells.append("failed")
                continue
            x, err = v["benchmarks"].get(b), v["stderr_seed_mean" if several else "stderr"].get(b)
            cells.append(_fmt(x) + (f" ± {_fmt(err)}" if x is not None and err is not None else ""))
        lines.append(f"| {v['title']} | " + " | ".join(cells) + " |")
    if any(v["failed"] for v in summary["variants"].values()):
        lines += ["", f"failed: the benchmark's own rule marks the run failed in some seed ({_fail_rules()}) or it has no score; "
                  "such a cell is left out of the relative improvements and averages."]
    if summary["baseline"]:
        covers = ", ".join(benchmark_title(b) for b in summary["average_covers"]) or "none"
        lines += ["", f"**Relative improvement over {variant_title(summary['baseline'])}** (%, 95 % paired-bootstrap interval over items "
                  f"in brackets; Avg. over {covers})", "", head + " Avg. |", "|---" * (len(benches) + 2) + "|"]
        base_failed = set(summary["variants"][summary["baseline"]]["failed"])
        for name, rel in summary["relative_improvement"].items():
            cells = []
            for b in benches:
                if b in summary["variants"][name]["failed"] or b in base_failed:
                    cells.append("failed")
                    continue
                ci = summary["relative_improvement_ci"].get(name, {}).get(b)
                cells.append(_fmt(rel.get(b), pct=True) + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""))
            lines.append(f"| {variant_title(name)} | " + " | ".join(cells) + f" | {_fmt(summary['average_relative_improvement'][name], pct=True)} |")
    t = summary.get("training") or {}
    if t.get("cells"):
        same = "the same" if t["same_ids"] else "NOT the same"
        lines += ["", f"Every trained variant learned from {same} {t['query_ids'] if t['same_ids'] else ''} query ids "
                  f"(the queries every data mode accepted; {t['cells']} training cells)."]
    return "\n".join(lines) + "\n"


def _fail_rules() -> str:
    """Each registered benchmark's own failure rule, as the note under the tables quotes them."""
    from personafuse.evaluation.benchmarks import BENCHMARKS

    return "; ".join(f"{benchmark_title(b)}: {cls.fail_rule}" for b, cls in BENCHMARKS.items() if cls.fail_rule)


def plot_relative(summary: dict[str, Any], report: Path) -> list[Path]:
    """Figures 5-7's bars: relative improvement over Direct-FT per benchmark with the bootstrap
    interval; a failed cell is drawn as a hatched empty bar labelled "failed"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary["baseline"] or not summary["relative_improvement"]:
        return []
    benches, names = summary["benchmarks"], list(summary["relative_improvement"])
    base_failed = set(summary["variants"][summary["baseline"]]["failed"])
    fig, axes = plt.subplots(1, len(benches), figsize=(3.2 * len(benches) + 1, 3.6), squeeze=False)
    for ax, b in zip(axes[0], benches, strict=True):
        for i, v in enumerate(names):
            x = summary["relative_improvement"][v].get(b)
            failed = b in summary["variants"][v]["failed"] or b in base_failed
            if failed or x is None:  # x None: Direct-FT scored 0, no relative change
                ax.bar(i, 0, color="white", edgecolor="grey", hatch="//")
                ax.annotate("failed" if failed else "n/a", (i, 0), ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            ci = summary["relative_improvement_ci"].get(v, {}).get(b)
            err = [[x - ci[0]], [ci[1] - x]] if ci else None
            ax.bar(i, x, color=f"C{i}", yerr=err, capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([variant_title(v) for v in names], rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(benchmark_title(b))
    axes[0][0].set_ylabel("Relative improvement (%)")
    fig.suptitle(f"vs {variant_title(summary['baseline'])} (95 % paired-bootstrap intervals)")
    fig.tight_layout()
    path = report / "relative_improvement.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


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


def _routed() -> list[str]:
    """The variants with a learned router, in the table's order."""
    return [v.name for v in VARIANT_TABLE.values() if v.routed]


def routed_models(cfg: ReproduceConfig, out: Path) -> dict[str, Any]:
    """Each routed variant's first-seed router, loaded once on eval.device for both router sections."""
    from personafuse.evaluation.routing_analysis import load_router

    found = {}
    for v in _routed():
        model = out / "train" / v / f"seed{cfg.seeds[0]}" / "joint" / "model"
        if v in cfg.all_variants() and model.is_dir():
            found[v] = load_router(f"pf:{model}", device=cfg.eval.device, dtype=cfg.eval.dtype)
    return found


def router_analysis(cfg: ReproduceConfig, out: Path, report: Path, routers: dict[str, Any]) -> str:
    """Mean routing weight per held-out situation (and per benchmark) for each routed variant."""
    from personafuse.evaluation.routing_analysis import analyse

    parts = []
    for v in _routed():
        if v not in cfg.all_variants():
            continue
        seed = cfg.seeds[0]
        model = out / "train" / v / f"seed{seed}" / "joint" / "model"
        rep = analyse([str(out / "eval" / v / f"seed{seed}")], situations=str(out / QUERIES / "heldout.jsonl"),
                      model=f"pf:{model}", router=routers.get(v), out=str(report / "routing" / v),
                      device=cfg.eval.device, dtype=cfg.eval.dtype)  # fmt: skip
        radars = ", ".join(f"[{p.name}](routing/{v}/{p.name})" for p in rep.files if p.suffix == ".png")
        parts.append(f"### {variant_title(v)} (seed {seed})\n\n{rep.markdown}\nRadar charts: {radars}\n")
    return "\n".join(parts)


def routing_agreement_section(routers: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``routing_agreement()`` (evaluation/routing_analysis.py, issue 34) for every routed
    PersonaFuse variant's first-seed model: hit rate with its Wilson interval, contrast, n."""
    from personafuse.evaluation.routing_analysis import routing_agreement

    rows, found = ["| variant | hit rate | 95 % interval | contrast | n |", "|---|---|---|---|---|"], {}
    for v, router in routers.items():
        r = routing_agreement(router)
        found[v] = r
        lo, hi = r["hit_rate_ci"]
        rows.append(f"| {variant_title(v)} | {r['hit_rate']:.2f} | [{lo:.2f}, {hi:.2f}] | {r['contrast']:.2f} | {r['n']} |")
    return ("\n".join(rows) + "\n" if found else "No routed variant in this grid.\n"), found


def probing(cfg: ReproduceConfig, out: Path, report: Path) -> str:
    """The paper's Table 6 on the configured dataset: the router's encoder before and after training."""
    if not cfg.probe.dataset or PERSONAFUSE not in cfg.all_variants():
        return "Not run: set `probe.dataset` (and `probe.data` for a local copy) to probe the encoders.\n"
    from personafuse.devices import resolve_device
    from personafuse.evaluation.probing import run_probe

    model = out / "train" / PERSONAFUSE / f"seed{cfg.seeds[0]}" / "joint" / "model"
    enc = json.loads((model / "personafuse_config.json").read_text())["encoder_model"]
    before = enc if enc in ("smollm2", "minilm", "default") else f"hf:{enc}"
    pr = cfg.probe
    dataset, text, label = pr.dataset, pr.text_field, pr.label_field
    if dataset == "seeds":
        import importlib.resources

        dataset, text, label = str(importlib.resources.files("personafuse.data") / "seeds" / "seed_queries.jsonl"), "query", "situation"
    rep = run_probe(dataset, [before, f"pf:{model}"], text_field=text, label_field=label, limit=pr.limit, seed=cfg.seeds[0],
                    out=str(report / "probe"), data_file=pr.data, device=resolve_device(cfg.eval.device), dtype=cfg.eval.dtype)
    return (f"Softmax regression on frozen embeddings of `{pr.dataset}` ({rep['n']} texts): the router's encoder "
            f"before training (`{before}`) and after (`pf:`, PersonaFuse seed {cfg.seeds[0]}).\n\n" + rep["markdown"])


def pairs(cfg: ReproduceConfig, out: Path, report: Path) -> str:
    folder = report / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    for v in cfg.all_variants():
        shutil.copyfile(out / "replies" / v / f"seed{cfg.seeds[0]}" / "replies.jsonl", folder / f"{v}.jsonl")
    ref = f" --reference {PERSONAFUSE}" if PERSONAFUSE in cfg.all_variants() else ""
    return (f"One file per variant in `report/pairs/` (its replies to the held-out situation queries). Serve the study with\n"
            f"`personafuse annotate serve report/pairs/*.jsonl{ref}`.\n")


def write_report(cfg: ReproduceConfig, out: Path, cells: Sequence[Cell]) -> Path:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary = summarise(cfg, out)
    if summary["baseline"]:
        figures = plot_relative(summary, report)
    else:  # absolute scores; a failed cell has no bar (listed under the figure)
        from personafuse.evaluation.report import plot_scores

        names = list(summary["variants"])
        metrics = {v: {(b, "score"): x for b, x in summary["variants"][v]["benchmarks"].items()} for v in names}
        figures = plot_scores(names, metrics, {v: variant_title(v) for v in names}, None, report)
    failed = "; ".join(f"{v['title']}: {', '.join(v['failed'])}" for v in summary["variants"].values() if v["failed"])
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    routers = routed_models(cfg, out)
    agreement = routing_agreement_section(routers)
    # its own file: a router's weights carry float noise across processes (a resumed run's contrast
    # differs in the 5th digit), while summary.json holds what must repeat exactly
    (report / "routing_agreement.json").write_text(json.dumps(agreement[1], indent=2) + "\n", encoding="utf-8")
    sections = [
        "# Reproduction report\n",
        tables(summary),
        "## Figures\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + (f"\n\nFailed cells (no bar): {failed}" if failed else "") + "\n",
        "## Persona-CoT-FT's training target\n\n" + PCOT_FT_TARGET + "\n",
        "## Routing agreement (Table 1 poles, shipped held-out file)\n\n" + agreement[0],
        "## Router analysis (held-out situation queries)\n\n" + (router_analysis(cfg, out, report, routers) or "No routed variant in this grid.\n"),
        "## Encoder probing (Table 6)\n\n" + probing(cfg, out, report),
        "## Pairwise human study\n\n" + pairs(cfg, out, report),
        "## Time per cell\n\n" + cell_times(out, cells),
    ]
    (report / "report.md").write_text("\n".join(sections), encoding="utf-8")
    return report
