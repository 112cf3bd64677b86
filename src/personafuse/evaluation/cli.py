"""``personafuse eval``, ``personafuse report``, ``personafuse routing``, ``personafuse probe`` and
``personafuse lm-eval`` (lm-evaluation-harness with the ``personafuse`` model class registered)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from personafuse.configs import default, option
from personafuse.devices import DeviceOpt, DtypeOpt, cli_placement, placement_line
from personafuse.evaluation.benchmarks import BENCHMARKS  # the --benchmarks help lists the registry
from personafuse.evaluation.config import REASONING_TOKENS, EvalConfig

E = EvalConfig  # the eval options that set its fields take their defaults and help from it


def _parse_options(values: list[str] | None) -> dict[str, dict[str, Any]]:
    """``-o eqbench.version=v1 -o emobench.language=zh`` → ``{"eqbench": {"version": "v1"}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for v in values or []:
        key, eq, val = v.partition("=")
        bench, dot, opt = key.partition(".")
        if not eq or not dot:
            raise typer.BadParameter(f"option {v!r} should look like BENCHMARK.KEY=VALUE")
        try:
            parsed: Any = json.loads(val)
        except json.JSONDecodeError:
            parsed = val
        out.setdefault(bench.strip().lower(), {})[opt.strip()] = parsed
    return out


def _short(v: Any) -> str:
    """A score in six significant digits (the rescore line fits a terminal); ``None`` as "–"."""
    return f"{v:.6g}" if isinstance(v, int | float) and not isinstance(v, bool) else ("–" if v is None else str(v))


def eval_command(
    model: Annotated[str, option(E, "model")] = default(E, "model"),
    benchmarks: Annotated[str, option(E, "benchmarks", help="comma-separated: " + ",".join(BENCHMARKS))] = ",".join(default(E, "benchmarks")),
    out: Annotated[Path, option(E, "out")] = Path(default(E, "out")),
    data: Annotated[str | None, option(E, "data")] = default(E, "data"),
    limit: Annotated[int | None, option(E, "limit")] = default(E, "limit"),
    seed: Annotated[int, option(E, "seed")] = default(E, "seed"),
    item_seed: Annotated[int, option(E, "item_seed", "--item-seed")] = default(E, "item_seed"),
    routing: Annotated[str | None, option(E, "routing")] = default(E, "routing"),
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL for openai:MODEL")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for openai:MODEL (else OPENAI_API_KEY)")] = None,
    judge: Annotated[str | None, option(E, "judge", help="judge for " + "/".join(n for n, c in BENCHMARKS.items() if c.needs_judge) + ": openai:MODEL, hf:PATH, default or base (the embedded model)")] = default(E, "judge"),
    judge_base_url: Annotated[str | None, typer.Option(help="base URL of the judge endpoint")] = None,
    judge_api_key: Annotated[str | None, typer.Option(help="API key of the judge endpoint")] = None,
    batch_size: Annotated[int, option(E, "batch_size")] = default(E, "batch_size"),
    system_prompt: Annotated[str | None, option(E, "system_prompt")] = default(E, "system_prompt"),
    max_new_tokens: Annotated[int | None, option(E, "max_new_tokens")] = default(E, "max_new_tokens"),
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="BENCHMARK.KEY=VALUE, e.g. eqbench.version=v1, emobench.language=zh")] = None,
    overwrite: Annotated[bool, typer.Option(help="start the run directory afresh")] = False,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    rescore: Annotated[bool, typer.Option(help="re-parse and re-score the stored responses (no regeneration)")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (1 is much faster on a busy shared CPU)")] = None,
    persona_cot_prompting: Annotated[bool, typer.Option(help="Persona-CoT prompting baseline: the model names the cues and poles, then answers; only the answer is scored")] = False,
    reasoning_tokens: Annotated[int, typer.Option(help="with --persona-cot-prompting: tokens allowed for the reasoning on top of each benchmark's answer cap")] = REASONING_TOKENS,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Evaluate a model on the paper's benchmarks; writes OUT/results.json and OUT/NAME.jsonl."""
    device, dtype = cli_placement(device, dtype)  # a device this machine lacks: exit 2 before loading
    if threads:
        import torch

        torch.set_num_threads(threads)
    from rich.console import Console

    from personafuse.chat_cli import quiet_loading
    from personafuse.evaluation.cot_prompting import with_persona_cot
    from personafuse.evaluation.data import DataError
    from personafuse.evaluation.report import summary_table
    from personafuse.evaluation.runner import RunMismatch, Runner
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    quiet_loading()  # the run shows its own progress; no transformers bar per model load
    cfg = EvalConfig(
        model=model,
        benchmarks=[b.strip() for b in benchmarks.split(",") if b.strip()],
        out=str(out),
        data=data,
        limit=limit,
        seed=seed,
        item_seed=item_seed,
        judge=judge,
        routing=routing,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        options=_parse_options(option),
        persona_cot=reasoning_tokens if persona_cot_prompting else None,
    )
    sopts = SubjectOptions(base_url=base_url, api_key=api_key, routing=routing, batch_size=batch_size, seed=seed,
                           system_prompt=system_prompt, device=device, dtype=dtype)
    jopts = SubjectOptions(base_url=judge_base_url, api_key=judge_api_key, batch_size=batch_size, device=device, dtype=dtype)

    def subject() -> Any:
        s = load_subject(model, sopts)
        if hasattr(s, "model") and hasattr(s.model, "parameters"):  # a local model: where it computes
            typer.echo(placement_line(s.model, model), err=True)
        return with_persona_cot(s, cfg.persona_cot)

    try:
        runner = Runner(
            cfg,
            subject,
            judge_factory=(lambda: load_subject(judge, jopts)) if judge else None,
            progress=progress,
            overwrite=overwrite,
            rescore=rescore,
        )
        results = runner.run()
    except (DataError, RunMismatch, KeyError, ValueError) as e:
        # Bad data, an unknown benchmark or a mismatched run directory: say what, not a traceback.
        typer.echo(f"error: {e.args[0] if e.args else e}", err=True)
        raise typer.Exit(2) from None
    Console().print(summary_table(results))
    for name, agg in results["benchmarks"].items():
        if (rs := agg.get("rescore")) is not None:  # what the fixed scorer changed in stored replies
            Console().print(f"rescored {name}: {rs['items_changed']} of {rs['items']} items changed; score {_short(rs['old_score'])} -> {_short(rs['new_score'])}")
    Console().print(f"wrote {out / 'results.json'}")


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="run directories (each with results.json)")],
    baseline: Annotated[Path | None, typer.Option(help="run to compare against (relative change)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.md, report.csv and the bar charts")] = None,
    names: Annotated[str | None, typer.Option(help="comma-separated display names, one per run")] = None,
) -> None:
    """Paper-style comparison: absolute scores and % change vs the baseline, Markdown + CSV + plots."""
    from personafuse.evaluation.report import build_report

    rep = build_report([str(r) for r in runs], baseline=str(baseline) if baseline else None, names=names.split(",") if names else None, out=str(out) if out else None)
    typer.echo(rep.markdown)
    if out:
        typer.echo(f"\nwrote {', '.join(str(p) for p in rep.files)}")


def routing_command(
    runs: Annotated[list[Path], typer.Argument(help="run directories whose items carry routing weights")] = None,  # type: ignore[assignment]
    situations: Annotated[Path | None, typer.Option(help="JSONL with fields query and situation, routed by --model")] = None,
    model: Annotated[str | None, typer.Option(help="PersonaFuse checkpoint (pf:DIR) to route --situations / --expect")] = None,
    out: Annotated[Path, typer.Option(help="folder for routing.md, routing.csv and radar PNGs")] = Path("runs/routing"),
    expect: Annotated[Path | None, typer.Option(help="JSONL of query, situation, positive and negative poles: hit rate and contrast of --model's routing ('heldout': the shipped Table 1 file)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print --expect's agreement as JSON")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Mean routing weight per pole for each benchmark and each held-out situation, plus radar charts;
    with --expect, how often --model's router favours the poles Table 1 expects."""
    device, dtype = cli_placement(device, dtype)  # a device this machine lacks: exit 2 before loading
    from personafuse.evaluation.routing_analysis import (
        agreement_markdown,
        analyse,
        heldout_path,
        routing_agreement,
    )

    router = _router(model, device, dtype) if model and (expect is not None or situations is not None) else None
    if expect is not None:
        if not model:
            raise typer.BadParameter("--expect needs --model pf:DIR (a PersonaFuse checkpoint)")
        path = heldout_path() if str(expect) == "heldout" else expect
        res = routing_agreement(router, path)
        typer.echo(json.dumps(res, indent=2) if as_json else f"{path}\n\n{agreement_markdown(res)}")
        if not runs and situations is None:
            return
    rep = analyse([str(r) for r in runs or []], situations=str(situations) if situations else None, model=model, router=router, out=str(out))
    typer.echo(rep.markdown)
    typer.echo(f"\nwrote {', '.join(str(p) for p in rep.files)}")


def _router(model: str, device: str, dtype: str) -> Any:
    """--model's router on --device in --dtype (routing --situations / --expect), its placement
    said first."""
    from personafuse.chat_cli import quiet_loading
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    quiet_loading()  # no transformers bar per load: the placement line comes first
    subj = load_subject(model, SubjectOptions(device=device, dtype=dtype))
    if not hasattr(subj, "route"):
        raise typer.BadParameter(f"{model} has no router (routing analysis needs a PersonaFuse checkpoint)", param_hint="--model")
    typer.echo(placement_line(subj.model, model), err=True)  # type: ignore[attr-defined]
    return subj.route


def probe_command(
    dataset: Annotated[str, typer.Option(help="clinc150 (11 domains) | clinc150-intents | emotion | ecommerce, or a local CSV/JSONL file")],
    encoder: Annotated[list[str], typer.Option(help="encoder(s) to compare: minilm, default-encoder (SmolLM2), hf:PATH[@mean|@last], random:SPEC, pf:DIR; repeat")],
    text_field: Annotated[str | None, typer.Option(help="text column of a local file")] = None,
    label_field: Annotated[str | None, typer.Option(help="label column of a local file")] = None,
    limit: Annotated[int | None, typer.Option(help="seeded subsample of N examples")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="write probe.json and probe.md here")] = None,
    data: Annotated[str | None, typer.Option(help="a local copy for a preset: Hub parquet file, CSV/JSONL, or CLINC's data_oos_plus.json")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Persona-encoder probing (paper Table 6): softmax regression on frozen embeddings."""
    device, dtype = cli_placement(device, dtype)  # a device this machine lacks: exit 2 before loading
    from personafuse.evaluation.probing import run_probe

    rep = run_probe(dataset, encoder, text_field=text_field, label_field=label_field, limit=limit, seed=seed, out=str(out) if out else None, data_file=data,
                    device=device, dtype=dtype, on_load=lambda line: typer.echo(line, err=True))
    typer.echo(rep["markdown"])


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    app.command("routing")(routing_command)
    app.command("probe")(probe_command)

    @app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def lm_eval_command(ctx: typer.Context) -> None:
        """Run lm-evaluation-harness with `--model personafuse` available (arguments pass through)."""
        from personafuse.evaluation.lm_eval_model import cli_main

        cli_main(list(ctx.args))
