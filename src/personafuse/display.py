"""Readable displays of the ten routing weights (terminal bars)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
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


def show_reply(query: str, gen: Any, console: Console | None = None) -> None:
    """A query, the reply and its ten weights as ``chat`` and ``demo`` print them."""
    from rich.panel import Panel

    console = console or Console()
    console.print(Panel(query, title="user", border_style="cyan"))
    cut = " [dim](cut off at --max-new-tokens)[/dim]" if gen.finish_reason == "length" else ""
    console.print(Panel((gen.text or "(empty reply)") + cut, title="PersonaFuse", border_style="green"))
    console.print(weight_bars(gen.weights, title="routing weights"))
    console.print(f"[dim]{summary_line(gen.weights)}[/dim]\n")
