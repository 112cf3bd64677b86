"""Summaries of a generation folder: reject reasons, pole frequencies, co-activation, situation x pole."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from personafuse.data.store import RECORDS, REJECTS, line_key, read_all
from personafuse.data.validation import DUPLICATE, ENDPOINT_REJECTS
from personafuse.traits import NUM_POLES, TRAIT_POLES


def compute_stats(out: str | Path) -> dict[str, Any]:
    """Counts for one output folder. A query rejected once and later retried counts only as a record."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder")
    records = read_all(out, RECORDS)
    rec_ids = {r["id"] for r in records}
    rejects = [r for r in read_all(out, REJECTS) if line_key(r) not in rec_ids]
    pole_freq = [0] * NUM_POLES
    co = [[0] * NUM_POLES for _ in range(NUM_POLES)]
    by_sit: dict[str, list[int]] = {}
    sit_count: Counter[str] = Counter()
    n_poles: Counter[int] = Counter()
    for r in records:
        p = r.get("p")
        if not p:
            continue
        n_poles[sum(p)] += 1
        sit = r.get("situation") or "(none)"
        sit_count[sit] += 1
        row = by_sit.setdefault(sit, [0] * NUM_POLES)
        for i in range(NUM_POLES):
            if p[i]:
                pole_freq[i] += 1
                row[i] += 1
                for j in range(NUM_POLES):
                    if p[j]:
                        co[i][j] += 1
    total = len(records) + len(rejects)
    n_endpoint = sum(r["reason"] in ENDPOINT_REJECTS for r in rejects)
    return {
        "folder": str(out),
        "records": len(records),
        "rejected": len(rejects),
        "kept_fraction": (len(records) / total) if total else 0.0,
        "reject_reasons": dict(Counter(r["reason"] for r in rejects).most_common()),
        "rejects_by_cause": {"endpoint": n_endpoint,
                             "teacher": sum(r["reason"] != DUPLICATE for r in rejects) - n_endpoint},
        "endpoint": _endpoint_block(out),
        "pole_frequency": dict(zip(TRAIT_POLES, pole_freq, strict=True)),
        "poles_per_record": {str(k): v for k, v in sorted(n_poles.items())},
        "coactivation": co,
        "situation_counts": dict(sit_count.most_common()),
        "situation_by_pole": by_sit,
        "modes": dict(Counter(r.get("mode") for r in records)),
        "teachers": dict(Counter(r.get("teacher") for r in records)),
    }


def _endpoint_block(out: Path) -> dict[str, Any] | None:
    """``run.json``'s endpoint counters (HTTP teachers; totals over every run into the folder)."""
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    block = info.get("endpoint") if isinstance(info, dict) else None
    return block if isinstance(block, dict) else None


def _short(pole: str) -> str:
    """``high_A`` -> ``+A`` so ten columns fit a terminal."""
    level, code = pole.split("_")
    return ("+" if level == "high" else "-") + code


def print_stats(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # piped or captured: wide enough for the ten pole columns
        con = Console(width=150)
    con.print(f"[bold]{st['folder']}[/]: {st['records']} records, {st['rejected']} rejected "
              f"({100 * st['kept_fraction']:.1f}% kept)")
    t = Table(title="Reject reasons")
    t.add_column("reason")
    t.add_column("count", justify="right")
    for k, v in st["reject_reasons"].items():
        t.add_row(k, str(v))
    con.print(t)
    by = st["rejects_by_cause"]
    con.print(f"rejects by cause: endpoint {by['endpoint']}, teacher {by['teacher']}")
    if (e := st.get("endpoint")) is not None:
        t = Table(title="Endpoint (all runs into this folder)")
        t.add_column("requests", justify="right")
        t.add_column("retries", justify="right")
        t.add_column("HTTP statuses")
        t.add_column("rate-limit wait", justify="right")
        t.add_row(str(e.get("requests", 0)), str(e.get("retries", 0)),
                  ", ".join(f"{k} x{v}" for k, v in (e.get("http_status") or {}).items()),
                  f"{e.get('rate_limit_wait_s', 0.0):.1f}s")
        con.print(t)
    t = Table(title="Pole frequency")
    t.add_column("pole")
    t.add_column("records", justify="right")
    t.add_column("share", justify="right")
    n = max(1, st["records"])
    for k, v in st["pole_frequency"].items():
        t.add_row(k, str(v), f"{100 * v / n:.1f}%")
    con.print(t)
    t = Table(title="Co-activation (records with both poles; +A = high_A, -A = low_A)")
    t.add_column("")
    for p in TRAIT_POLES:
        t.add_column(_short(p), justify="right")
    for p, row in zip(TRAIT_POLES, st["coactivation"], strict=True):
        t.add_row(_short(p), *map(str, row))
    con.print(t)
    if st["situation_by_pole"]:
        t = Table(title="Situation x pole (share of the situation's records)")
        t.add_column("situation")
        t.add_column("n", justify="right")
        for p in TRAIT_POLES:
            t.add_column(_short(p), justify="right")
        for sit, row in sorted(st["situation_by_pole"].items()):
            k = max(1, st["situation_counts"].get(sit, 0))
            t.add_row(sit, str(k), *(f"{v / k:.2f}" for v in row))
        con.print(t)


def heatmap(st: dict[str, Any], path: str | Path) -> Path:
    """PNG with the co-activation matrix and the situation x pole shares side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    import numpy as np

    sits = sorted(st["situation_by_pole"])
    fig, axes = plt.subplots(1, 2, figsize=(16, max(5, 0.45 * len(sits) + 2)))
    co = np.array(st["coactivation"], dtype=float)
    ax = axes[0]
    im = ax.imshow(co, cmap="viridis")
    ax.set_xticks(range(NUM_POLES), TRAIT_POLES, rotation=60, ha="right")
    ax.set_yticks(range(NUM_POLES), TRAIT_POLES)
    ax.set_title(f"Pole co-activation ({st['records']} records)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[1]
    if sits:
        m = np.array([[v / max(1, st["situation_counts"][s]) for v in st["situation_by_pole"][s]] for s in sits])
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(sits)), sits)
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(NUM_POLES), TRAIT_POLES, rotation=60, ha="right")
    ax.set_title("Share of records activating each pole, by situation")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
