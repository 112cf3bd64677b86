"""Comparison reports: absolute score and relative change vs a baseline run, per benchmark and
sub-score (paper Tables 13–16), as Markdown and CSV, plus bar charts of relative improvement like
paper Figures 5–7. What is reported for each benchmark (title, sub-scores, figure group and order)
is stated by its class in evaluation/benchmarks/; nothing here names a benchmark."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personafuse.evaluation.runner import load_results


def _facts(bench: str) -> Any:
    """The registered class of ``bench`` (None for a benchmark this install does not know)."""
    from personafuse.evaluation.benchmarks import BENCHMARKS

    return BENCHMARKS.get(bench)


def subscores_of(bench: str) -> tuple[str, ...]:
    """Which numeric fields of a benchmark's result block are reported, in order (headline first)."""
    cls = _facts(bench)
    return cls.subscores if cls else ("score",)


def score_variants_of(bench: str) -> tuple[str, ...]:
    """The other variants a benchmark reports beside ``score`` on the same replies (shown by
    ``personafuse eval``'s summary; the report's columns stay :func:`subscores_of`)."""
    cls = _facts(bench)
    return cls.score_variants if cls else ()


def benchmark_title(bench: str) -> str:
    """How tables and figures name a benchmark (its registry key when it has no title)."""
    cls = _facts(bench)
    return (cls.title or bench) if cls else bench


@dataclass
class Report:
    rows: list[dict[str, Any]]
    markdown: str
    csv: str
    files: list[Path] = field(default_factory=list)


def metrics_of(results: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """``{(benchmark, metric): value}`` for the reported metrics present in a results.json."""
    out: dict[tuple[str, str], float] = {}
    for bench, block in (results.get("benchmarks") or {}).items():
        for k in subscores_of(bench):
            v = block.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[(bench, k)] = float(v)
    return out


def relative_change(value: float, base: float) -> float | None:
    """Percent change vs the baseline (``None`` when the baseline is 0)."""
    if base == 0:
        return None
    return 100.0 * (value - base) / abs(base)


def build_report(runs: Sequence[str], *, baseline: str | None = None, names: Sequence[str] | None = None, out: str | None = None) -> Report:
    all_runs = list(runs)
    if baseline and baseline not in all_runs:
        all_runs = [baseline, *all_runs]
    labels = list(names) if names else []
    if labels and len(labels) != len(runs):
        raise ValueError(f"--names gives {len(labels)} names for {len(runs)} runs")
    label_of = {r: (labels[runs.index(r)] if labels and r in runs else Path(r).name or r) for r in all_runs}
    metrics = {r: metrics_of(load_results(r)) for r in all_runs}
    keys: list[tuple[str, str]] = []
    from personafuse.evaluation.benchmarks import report_order

    order = report_order()
    for r in all_runs:
        for k in metrics[r]:
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (order.index(k[0]) if k[0] in order else len(order), subscores_of(k[0]).index(k[1]) if k[1] in subscores_of(k[0]) else 99))
    base_m = metrics[baseline] if baseline else {}
    rows = []
    for r in all_runs:
        for k in keys:
            v = metrics[r].get(k)
            b = base_m.get(k)
            rows.append(
                {
                    "run": label_of[r],
                    "benchmark": k[0],
                    "metric": k[1],
                    "value": v,
                    "baseline": b,
                    "rel_change_pct": relative_change(v, b) if (v is not None and b is not None and r != baseline) else None,
                }
            )
    md = _markdown(all_runs, keys, metrics, label_of, baseline)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["run", "benchmark", "metric", "value", "baseline", "rel_change_pct"])
    w.writeheader()
    for row in rows:
        w.writerow(row)
    rep = Report(rows=rows, markdown=md, csv=buf.getvalue())
    if out:
        od = Path(out)
        od.mkdir(parents=True, exist_ok=True)
        (od / "report.md").write_text(md, encoding="utf-8")
        (od / "report.csv").write_text(rep.csv, encoding="utf-8")
        rep.files += [od / "report.md", od / "report.csv"]
        rep.files += plot_scores(all_runs, metrics, label_of, baseline, od)
    return rep


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"


def _markdown(runs: Sequence[str], keys: Sequence[tuple[str, str]], metrics: Mapping[str, Mapping[tuple[str, str], float]], label_of: Mapping[str, str], baseline: str | None) -> str:
    head = ["Model"] + [f"{benchmark_title(b)} {m}" if m != "score" else benchmark_title(b) for b, m in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [label_of[r] + (" (baseline)" if r == baseline else "")]
        for k in keys:
            v = metrics[r].get(k)
            cell = _fmt(v)
            if baseline and r != baseline and v is not None and k in metrics[baseline]:
                rc = relative_change(v, metrics[baseline][k])
                if rc is not None:
                    cell += f" ({rc:+.1f}%)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(runs: Sequence[str], metrics: Mapping[str, Mapping[tuple[str, str], float]], label_of: Mapping[str, str], baseline: str | None, out: Path) -> list[Path]:
    """One PNG per benchmark group: relative improvement (%) over the baseline per benchmark headline
    (paper Figures 5–7); without a baseline, absolute headline scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    others = [r for r in runs if r != baseline] if baseline else list(runs)
    from personafuse.evaluation.benchmarks import groups

    for title, benches in groups().items():
        present = [b for b in benches if any((b, "score") in metrics[r] for r in others)]
        if baseline:  # a relative change needs a non-zero baseline score
            present = [b for b in present if metrics[baseline].get((b, "score")) not in (None, 0.0)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present) + 1, 3.4), squeeze=False)
        for ax, b in zip(axes[0], present, strict=True):
            vals, labels = [], []
            for r in others:
                v = metrics[r].get((b, "score"))
                if v is None:
                    continue
                if baseline:
                    base = metrics[baseline].get((b, "score"))
                    rc = relative_change(v, base) if base is not None else None
                    if rc is None:
                        continue
                    vals.append(rc)
                else:
                    vals.append(v)
                labels.append(label_of[r])
            colors = [f"C{i}" for i in range(len(vals))]
            bars = ax.bar(range(len(vals)), vals, color=colors)
            ax.bar_label(bars, fmt="%+.1f%%" if baseline else "%.3g", fontsize=8)
            ax.margins(y=0.15)
            ax.set_xticks(range(len(vals)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title(benchmark_title(b))
            if ax is axes[0][0]:
                ax.set_ylabel("Relative improvement (%)" if baseline else "Score")
        vs = f" vs {label_of[baseline]}" if baseline else ""
        fig.suptitle(f"{title}{vs}")
        fig.tight_layout()
        slug = title.lower().replace(" ", "_").replace("-", "_")
        p = out / f"relative_{slug}.png" if baseline else out / f"scores_{slug}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        files.append(p)
    return files


def summary_table(results: Mapping[str, Any]) -> Any:
    """A rich table of one run's headline scores (printed by ``personafuse eval``)."""
    from rich.table import Table

    t = Table(title="PersonaFuse evaluation")
    t.add_column("benchmark")
    t.add_column("score", justify="right")
    t.add_column("details")
    t.add_column("items", justify="right")
    for b, block in (results.get("benchmarks") or {}).items():
        extras = []
        for k in (*score_variants_of(b), *subscores_of(b)[1:]):
            v = block.get(k)
            if isinstance(v, bool):
                continue
            if isinstance(v, int):
                extras.append(f"{k}={v}")
            elif isinstance(v, float):
                extras.append(f"{k}={_fmt(v)}")
        score, err = block.get("score"), block.get("stderr")
        shown = _fmt(score) + (f" ± {_fmt(float(err))}" if isinstance(err, int | float) and score is not None else "")
        t.add_row(benchmark_title(b), shown, " ".join(extras), str(block.get("n_items", block.get("n", ""))))
    return t
