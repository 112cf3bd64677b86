"""``personafuse reproduce``: the paper's whole experiment from one config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def reproduce_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder: every cell's output, reproduce.log, report/. Rerun to resume.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML grid config (configs/reproduce/*.yaml); default: the paper's grid on the embedded models.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field by its dotted key: --set eval.limit=8 --set seeds=[0,1,2] (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the cells, which are cached, and the request estimate, and run the check cell; train or evaluate nothing.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the preflight check cell (models, benchmarks, teacher, judge, launcher, devices, disk); --dry-run --no-check stays offline.")] = False,
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
    if not no_check and (dry_run or any(grid.state(c) != "done" for c in grid.cells)):
        _check(grid, str(config) if config else "defaults", bool(set_), write=not dry_run)
    if dry_run:
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


def _check(grid: Any, where: str, with_set: bool, *, write: bool) -> None:
    """The grid's first cell: exit 2 naming the file and field of every problem found."""
    from personafuse.reproduce.preflight import PreflightError, check_cell

    try:
        notes = check_cell(grid.cfg, grid.out, f"{where} with --set" if with_set else where, write=write)
    except PreflightError as e:
        typer.secho(f"error: {e}\n(--no-check skips the check)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for note in notes:  # a dry run prints them with the plan; a run keeps stdout for the report line
        typer.echo(f"check: {note}", err=write)


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_command)
