"""The human study's results: per pair the majority vote of its annotators (an even split counts
half to each side), then win rates per system pair and task type with percentile bootstrap
intervals over pairs, exported as CSV, Markdown and a bar chart."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from personafuse.evaluation.annotation.store import CRITERIA, CRITERION_LABEL, AnnotationStore


def pair_outcomes(store: AnnotationStore) -> list[dict[str, Any]]:
    """Majority vote per pair and criterion: score of system_1 is 1 (won), 0.5 (even split) or 0."""
    votes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for j in store.judgements():
        votes[j["pair_id"]].append(j)
    out = []
    for pid, js in votes.items():
        j0 = js[0]
        row = {"pair_id": pid, "prompt_id": j0["prompt_id"], "task": j0["task"], "system_1": j0["system_1"],
               "system_2": j0["system_2"], "annotators": len(js),
               "mean_confidence": sum(j["confidence"] for j in js) / len(js)}
        for c in CRITERIA:
            n1 = sum(j[c] == j0["system_1"] for j in js)
            row[c] = 1.0 if n1 * 2 > len(js) else 0.5 if n1 * 2 == len(js) else 0.0
        out.append(row)
    return out


def win_rates(store: AnnotationStore, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for o in pair_outcomes(store):
        for task in (o["task"], "all") if o["task"] != "all" else ("all",):
            groups[(o["system_1"], o["system_2"], task)].append(o)
    rng = np.random.default_rng(seed)
    rows = []
    for (s1, s2, task), outs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] == "all", kv[0][2])):
        for c in CRITERIA:
            scores = np.array([o[c] for o in outs])
            boots = scores[rng.integers(0, len(scores), size=(n_boot, len(scores)))].mean(1)
            rows.append({
                "system": s1, "opponent": s2, "task": task, "criterion": c, "pairs": len(scores),
                "wins": int((scores == 1).sum()), "ties": int((scores == 0.5).sum()), "losses": int((scores == 0).sum()),
                "win_rate": float(scores.mean()), "ci_low": float(np.percentile(boots, 2.5)),
                "ci_high": float(np.percentile(boots, 97.5)),
                "annotators_per_pair": float(np.mean([o["annotators"] for o in outs])),
                "mean_confidence": float(np.mean([o["mean_confidence"] for o in outs])),
            })
    return rows


def export(store: AnnotationStore, out: str | Path, n_boot: int = 2000, seed: int = 0) -> list[Path]:
    """Write win_rates.csv, win_rates.md, win_rates.png and judgements.csv into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = win_rates(store, n_boot=n_boot, seed=seed)
    fields = ["system", "opponent", "task", "criterion", "pairs", "wins", "ties", "losses", "win_rate", "ci_low",
              "ci_high", "annotators_per_pair", "mean_confidence"]
    csv_path = out / "win_rates.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    judg = store.judgements()
    j_path = out / "judgements.csv"
    with j_path.open("w", newline="") as f:
        cols = ["pair_id", "prompt_id", "task", "system_1", "system_2", "annotator", "preferred", "confidence",
                "usefulness", "social_presence", "a_is_1", "seconds", "created_at"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(judg)
    md = [f"# Human evaluation: win rates (majority vote per pair, {store.annotators_per_pair} annotators wanted per pair)", "",
          "Win rate of *system* against *opponent*; an even split counts as half a win. "
          "95 % intervals: percentile bootstrap over pairs.", ""]
    for c in CRITERIA:
        md += [f"## {CRITERION_LABEL[c]}", "", "| system | opponent | task | pairs | W / T / L | win rate | 95 % CI | annotators per pair | mean confidence |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["criterion"] == c):
            md.append(f"| {r['system']} | {r['opponent']} | {r['task']} | {r['pairs']} | {r['wins']} / {r['ties']} / {r['losses']} "
                      f"| {100 * r['win_rate']:.1f} % | {100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} % "
                      f"| {r['annotators_per_pair']:.1f} | {r['mean_confidence']:.2f} |")
        md.append("")
    md_path = out / "win_rates.md"
    md_path.write_text("\n".join(md))
    png_path = out / "win_rates.png"
    _plot(rows, png_path)
    return [csv_path, md_path, png_path, j_path]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["system"], r["opponent"], r["task"]) for r in rows}, key=lambda g: (g[0], g[1], g[2] == "all", g[2]))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(groups) + 2), 3.6))
    width = 0.26
    for k, c in enumerate(CRITERIA):
        vals, lo, hi = [], [], []
        for g in groups:
            r = next(r for r in rows if (r["system"], r["opponent"], r["task"]) == g and r["criterion"] == c)
            vals.append(100 * r["win_rate"])
            lo.append(100 * (r["win_rate"] - r["ci_low"]))
            hi.append(100 * (r["ci_high"] - r["win_rate"]))
        xs = [i + (k - 1) * width for i in range(len(groups))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=CRITERION_LABEL[c])
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [f"{s}\nvs {o}\n({t})" for s, o, t in groups], fontsize=8)
    ax.set_ylabel("win rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Pairwise human evaluation (majority vote, 95 % bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
