"""``personafuse reproduce``: the paper's whole experiment from one config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def reproduce_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder: every cell's output, reproduce.log, report/. Rerun to resume.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML grid config (configs/reproduce/*.yaml); default: the paper's grid on the embedded models.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field by its dotted key: --set eval.limit=8 --set seeds=[0,1,2] (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the cells, which are cached, and the request estimate; run nothing.")] = False,
) -> None:
    """Data from one teacher, every Table 3 variant trained and evaluated on the same benchmarks,
    then the report (tables, figures, router analysis, pairs file) in OUT/report/.

    Each cell is cached under OUT; a run killed at any point resumes where it stopped."""
    from personafuse.reproduce.config import ConfigError, ReproduceConfig
    from personafuse.reproduce.run import Grid, ReproduceError

    try:
        cfg = ReproduceConfig.load(config, set_ or [])
    except ConfigError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    grid = Grid(cfg, out)
    if dry_run:
        typer.echo(grid.describe())
        return
    try:
        report = grid.run()
    except ReproduceError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted; rerun the same command to resume ({out})", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"report: {report / 'report.md'} (summary.json, figures, routing/, pairs/)")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_command)
