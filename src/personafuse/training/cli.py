"""``personafuse train`` (the three stages) and ``personafuse train baseline``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)

app = typer.Typer(
    help="Train Persona-MoE from Persona-CoT records: warmup (experts), router, joint; or a baseline.",
    invoke_without_command=True,
    no_args_is_help=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML/JSON training config (defaults: the paper's).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Records directory or JSONL file (overrides the config).")]
OutOpt = Annotated[str | None, typer.Option("--out", help="Output directory (overrides the config).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint; skip finished stages.")]


def _load(config: Path | None, data: str | None, out: str | None):
    from personafuse.training.config import TrainConfig

    try:
        tc = TrainConfig.load(config) if config else TrainConfig()
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e), param_hint="--config") from None
    if data:
        tc.data = data
    if out:
        tc.out = out
    return tc


def _say(message: str) -> None:
    """Once per launch: under ``accelerate launch``/``torchrun`` only the first process speaks."""
    import os

    if os.environ.get("RANK", "0") == "0":
        console.print(message)


def _run(fn, *args, **kwargs):
    from personafuse.embedded import ModelNotFoundError
    from personafuse.training.records import RecordError

    try:
        return fn(*args, **kwargs)
    except (RecordError, ModelNotFoundError, FileNotFoundError, ValueError) as e:
        # Plain stderr, not rich: paths and ids must not be re-wrapped or read as markup.
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None


@app.callback()
def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    stage: Annotated[str, typer.Option("--stage", help="warmup | router | joint | all")] = "all",
    resume: ResumeOpt = False,
    data: DataOpt = None,
    out: OutOpt = None,
    random_route: Annotated[
        int | None,
        typer.Option(
            "--random-route",
            metavar="K",
            help="Train the Random Route K baseline instead (paper Table 3): warm-up, no router stage, "
            "joint stage with K random experts per sequence. Evaluate it with --routing random:K.",
        ),
    ] = None,
) -> None:
    """Run the training stages; each saves OUT/STAGE/model and starts from the previous one."""
    if ctx.invoked_subcommand is not None:
        return
    import dataclasses

    from personafuse.training.stages import train as run_train

    tc = _load(config, data, out)
    if random_route is not None:
        try:
            tc = dataclasses.replace(tc, random_route=random_route)
        except ValueError as e:
            from personafuse.configs import config_message

            raise typer.BadParameter(config_message(e), param_hint="--random-route") from None
    final = _run(run_train, tc, stage, resume=resume)
    _say(f"[green]done[/green]: model saved to {final}")
    _say(f"loss logs and curves: {Path(tc.out)}/<stage>/losses.jsonl, loss.png, tensorboard/")
    if tc.random_route:
        _say(f"Random Route {tc.random_route}: evaluate with --routing random:{tc.random_route} (its router was never trained)")


@app.command()
def baseline(
    kind: Annotated[str, typer.Option("--kind", help="direct | human_like | cot_sft")],
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    data: DataOpt = None,
    out: OutOpt = None,
) -> None:
    """Fit one LoRA by SFT (Direct-, Human-Like- or Persona-CoT-finetuned baseline)."""
    from personafuse.training.stages import train_baseline

    tc = _load(config, data, out)
    adapter = _run(train_baseline, tc, kind, resume=resume)
    _say(f"[green]done[/green]: peft adapter saved to {adapter} (evaluate with --model lora:{adapter})")
