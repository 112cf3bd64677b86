"""Readable displays of the ten routing weights (terminal bars)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table
from rich.text import Text

from personafuse.traits import TRAIT_NAMES, TRAIT_POLES, big_five_summary

BAR_WIDTH = 24


def weight_bars(weights: Mapping[str, float], title: str | None = None) -> Table:
    """A rich table: one row per pole, grouped by trait, with a bar scaled to the largest weight."""
    top = max(weights.values()) or 1.0
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column("trait", style="bold")
    table.add_column("pole")
    table.add_column("bar")
    table.add_column("w", justify="right")
    for pole in TRAIT_POLES:
        w = float(weights[pole])
        level, code = pole.split("_")
        n = round(BAR_WIDTH * w / top)
        colour = "green" if level == "high" else "magenta"
        bar = Text("█" * n, style=colour) + Text("·" * (BAR_WIDTH - n), style="dim")
        table.add_row(TRAIT_NAMES[code] if level == "high" else "", pole, bar, f"{w:.3f}")
    return table


def summary_line(weights: Mapping[str, float]) -> str:
    """``Openness +0.12 · Conscientiousness -0.03 …`` (high minus low pole per trait)."""
    net = big_five_summary([weights[p] for p in TRAIT_POLES])
    return " · ".join(f"{name} {v:+.2f}" for name, v in net.items())
