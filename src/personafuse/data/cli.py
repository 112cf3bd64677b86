"""``personafuse data``: generate Persona-CoT (or baseline) records and summarise a run."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from personafuse.configs import config_message, default, option
from personafuse.data.config import PipelineConfig
from personafuse.data.source_options import SourceOptions
from personafuse.data.store import SHARD_SIZE
from personafuse.data.teacher_options import TeacherOptions
from personafuse.devices import DeviceOpt, DtypeOpt

if TYPE_CHECKING:
    from personafuse.data.run import RunSummary
    from personafuse.data.sources import Query
    from personafuse.data.store import ShardStore
    from personafuse.data.teachers import Teacher

app = typer.Typer(name="data", help="Generate and inspect Persona-CoT training data.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_show_locals=False)

LOCAL_RESPONSE_TOKENS = 256
P = PipelineConfig  # the options below that set its fields take their defaults and help from it
T = TeacherOptions  # likewise the endpoint policy and local batching options
S = SourceOptions  # and the query source's


def default_constrained(teacher: str) -> bool:
    """Whether Persona-CoT data from ``teacher`` uses constrained mode unless told otherwise: only
    the embedded 135M teacher, which cannot write the paper's chain of thought; every other teacher
    (``hf:``, ``openai:``, ``vllm:``) runs the full three-step procedure (``--constrained`` asks
    for the other mode explicitly)."""
    return teacher == "default"


def runs_here(teacher: str) -> bool:
    """Whether ``teacher`` is a transformers model in this process (its backend places weights on
    --device and batches by --batch-size, and a small model's defaults apply); an endpoint or vLLM
    is not. An unknown spec is not: make_teacher names the problem."""
    from personafuse.backends import teacher_capabilities

    return teacher_capabilities(teacher).placement


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (records*.jsonl, rejects*.jsonl, run.json).")],
    teacher: Annotated[str, typer.Option(help="default | hf:ID_OR_PATH | openai:MODEL | vllm:ID")] = "default",
    source: Annotated[str, option(S, "source")] = default(S, "source"),
    limit: Annotated[int | None, option(S, "limit")] = default(S, "limit"),
    mode: Annotated[str, option(P, "mode")] = default(P, "mode"),
    field: Annotated[list[str] | None, typer.Option("--field", help="Field mapping for files: query=COL, situation=COL (repeatable).")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default: $OPENAI_API_KEY).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Queries in flight, also the cap on HTTP requests in flight (default 32; 2 x --batch-size for local teachers).")] = None,
    timeout: Annotated[float, option(T, "timeout")] = default(T, "timeout"),
    max_retries: Annotated[int, option(T, "max_retries")] = default(T, "max_retries"),
    max_rate_limit_wait: Annotated[float, option(T, "max_rate_limit_wait")] = default(T, "max_rate_limit_wait"),
    max_endpoint_failures: Annotated[str, option(P, "max_endpoint_failures")] = default(P, "max_endpoint_failures"),
    backoff: Annotated[float, option(T, "backoff")] = default(T, "backoff"),
    batch_size: Annotated[int, option(T, "batch_size")] = default(T, "batch_size"),
    constrained: Annotated[bool | None, typer.Option("--constrained/--free", help="Pole choice by log-likelihood (the default for the embedded teacher only) or the full chain of thought parsed from free text (the default for every other teacher).")] = None,
    single_call: Annotated[bool, option(P, "single_call")] = default(P, "single_call"),
    allow_both_poles: Annotated[bool, option(P, "allow_both_poles")] = default(P, "allow_both_poles"),
    poles_per_cue: Annotated[int, option(P, "poles_per_cue")] = default(P, "poles_per_cue"),
    max_new_tokens: Annotated[int | None, typer.Option(help="Token limit for the response step.")] = None,
    temperature: Annotated[float, option(P, "temperature")] = default(P, "temperature"),
    shuffle: Annotated[bool, option(S, "shuffle")] = default(S, "shuffle"),
    seed: Annotated[int, option(S, "seed")] = default(S, "seed"),
    lang: Annotated[str | None, option(S, "lang")] = default(S, "lang"),
    min_chars: Annotated[int, option(S, "min_chars")] = default(S, "min_chars"),
    max_chars: Annotated[int, option(S, "max_chars")] = default(S, "max_chars"),
    hub_config: Annotated[str | None, option(S, "config", "--hub-config")] = default(S, "config"),
    hub_split: Annotated[str | None, option(S, "split", "--hub-split")] = default(S, "split"),
    shard_size: Annotated[int, typer.Option(help="Lines per output shard.")] = SHARD_SIZE,
    fsync: Annotated[bool, typer.Option(help="fsync after every line (survives power loss, slower).")] = False,
    retry_reasons: Annotated[list[str] | None, typer.Option("--retry-reasons", help="Also redo queries rejected for this reason (e.g. unparseable); endpoint rejects (endpoint_*, teacher_error) are always redone.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate records for a query source; rerun the same command to resume after a crash."""
    from personafuse.data.run import RunSummary
    from personafuse.data.sources import SourceError, load_source, parse_fields
    from personafuse.data.store import ShardStore, StoreError
    from personafuse.data.teachers import TeacherError, make_teacher
    from personafuse.devices import cli_placement, placement_line

    local = runs_here(teacher)
    # only a local teacher loads a model here: an endpoint's --device is not this machine's business
    device, dtype = cli_placement(device if local else "cpu", dtype)
    _check_retry_reasons(retry_reasons or [])
    # Local teachers batch concurrent requests; a couple of batches in flight keeps them full while
    # letting queries finish (and the progress bar move) in waves.
    concurrency = concurrency or (2 * batch_size if local else 32)
    is_constrained = mode == "persona_cot" and (default_constrained(teacher) if constrained is None else constrained)
    try:  # the config's own checks (mode, --max-endpoint-failures, ...), before any work
        cfg = PipelineConfig(
            mode=mode, constrained=is_constrained, allow_both_poles=allow_both_poles, poles_per_cue=poles_per_cue,
            single_call=single_call, concurrency=concurrency,
            response_tokens=max_new_tokens or (LOCAL_RESPONSE_TOKENS if local else 1024), temperature=temperature,
            trim_truncated=is_constrained or (local and mode != "persona_cot"),
            repetition_penalty=1.2 if local else 1.0, max_endpoint_failures=max_endpoint_failures,
        )
    except ValueError as e:
        _fail(config_message(e))
    try:
        queries = load_source(source, fields=parse_fields(field or []), limit=limit, shuffle=shuffle, seed=seed,
                              lang=lang or None, min_chars=min_chars, max_chars=max_chars, config=hub_config,
                              split=hub_split)
    except SourceError as e:
        _fail(str(e))
    if not queries:
        _fail(f"source {source!r} gave no queries")
    opts = TeacherOptions(base_url=base_url, api_key=api_key, max_in_flight=concurrency, timeout=timeout,
                          max_retries=max_retries, backoff=backoff, batch_size=batch_size, device=device, dtype=dtype)
    opts.max_rate_limit_wait = max_rate_limit_wait
    try:
        store = ShardStore(out, shard_size=shard_size, fsync=fsync)
        store.open()
    except (StoreError, OSError) as e:
        _fail(str(e))
    for note in store.repairs:  # a killed run's torn line, duplicates from older versions
        typer.echo(f"repaired {out}: {note}", err=True)
    summary = RunSummary()
    try:
        t0 = time.perf_counter()
        t = make_teacher(teacher, opts)
        if local:
            typer.echo(placement_line(t.model, teacher), err=True)  # type: ignore[attr-defined]
        typer.echo(f"teacher {t.name} ready in {time.perf_counter() - t0:.1f}s; mode {mode}"
                   f"{' (constrained: poles by log-likelihood)' if is_constrained else (' (full chain of thought)' if mode == 'persona_cot' else '')}; {len(queries)} queries from {source}", err=True)
        asyncio.run(_run(queries, t, store, cfg, retry_reasons or [], progress, summary))
    except (TeacherError, StoreError) as e:
        _stop(e, summary)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        store.close()
    typer.echo(json.dumps(summary.as_dict()), err=False)


def _check_retry_reasons(retry_reasons: list[str]) -> None:
    from personafuse.data.validation import REJECT_REASONS

    for r in retry_reasons:
        if r not in REJECT_REASONS:
            _fail(f"--retry-reasons {r!r}: known reasons are {', '.join(REJECT_REASONS)}")


def _stop(e: Exception, summary: RunSummary) -> None:
    """A run that stopped or finished with too many endpoint failures: its counters, then why
    (exit 1 when every query was tried but too many failed at the endpoint, else 2)."""
    from personafuse.data.run import EndpointFailuresExceeded

    if summary.total:
        typer.echo(json.dumps(summary.as_dict()), err=False)
    if isinstance(e, EndpointFailuresExceeded):
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    _fail(str(e))


async def _run(queries: list[Query], teacher: Teacher, store: ShardStore, cfg: PipelineConfig,
               retry_reasons: list[str], show: bool, summary: RunSummary) -> RunSummary:
    from tqdm import tqdm

    from personafuse.data.run import generate as run_generate

    bar: tqdm | None = None

    def on_start(n: int) -> None:
        nonlocal bar
        bar = tqdm(total=n, unit="q", disable=not show, file=sys.stderr, dynamic_ncols=True, desc="generate")

    def on_progress(s: RunSummary) -> None:
        if bar is not None:
            bar.n = s.records + s.rejected - s.reasons.get("duplicate_query", 0)
            bar.set_postfix(_progress_fields(s), refresh=False)
            bar.refresh()

    async def tick() -> None:  # a rate-limit storm finishes no query for a while; keep the counters moving
        while True:
            await asyncio.sleep(1.0)
            on_progress(summary)

    ticker = asyncio.ensure_future(tick()) if show and teacher.endpoint_stats is not None else None
    try:
        return await run_generate(queries, teacher, store, cfg, retry_reasons=retry_reasons, on_start=on_start,
                                  progress=on_progress, summary=summary)
    finally:
        if ticker is not None:
            ticker.cancel()
        if bar is not None:
            bar.close()
        await teacher.aclose()
        typer.echo(_closing_line(summary), err=True)


def _progress_fields(s: RunSummary) -> dict[str, object]:
    by = s.rejects_by_cause()
    fields: dict[str, object] = {"done": s.records, "rejected": s.rejected, "skipped": s.skipped}
    if s.endpoint is not None:
        fields.update(endpoint_rej=by["endpoint"], req=s.endpoint.requests, retries=s.endpoint.retries,
                      http=" ".join(f"{k}:{v}" for k, v in sorted(s.endpoint.http_status.items())),
                      waited=f"{s.endpoint.rate_limit_wait_s:.0f}s")
    return fields


def _closing_line(s: RunSummary) -> str:
    """The run in one line: what was kept, whose fault the rejects were, what the endpoint did."""
    by = s.rejects_by_cause()
    line = (f"{s.records} records, {s.rejected} rejected (endpoint {by['endpoint']}, teacher {by['teacher']}"
            f"{', duplicates ' + str(s.reasons['duplicate_query']) if s.reasons.get('duplicate_query') else ''}), "
            f"{s.skipped} skipped as done, in {s.seconds:.1f}s")
    if s.endpoint is not None:
        e = s.endpoint
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(e.http_status.items())) or "none"
        line += (f"; endpoint: {e.requests} requests, {e.retries} retries, HTTP {statuses}, "
                 f"{e.rate_limit_wait_s:.1f}s waiting on rate limits")
    if s.reasons:
        line += "; reject reasons: " + ", ".join(f"{k} {v}" for k, v in s.reasons.most_common())
    return line


@app.command()
def relabel(
    src: Annotated[Path, typer.Argument(help="Records folder (records-*.jsonl) or one records file.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the relabelled records (must not hold records).")],
    labeller: Annotated[str, typer.Option(help="tat: the paper's Table 1 task matched to each query by the embedded sentence encoder.")] = "tat",
    min_similarity: Annotated[float, typer.Option(help="Queries whose best cosine to a Table 1 task is below this keep the teacher's labels.")] = 0.0,
) -> None:
    """Give every record a new activation vector from another labeller; the teacher's stays in `raw`."""
    from personafuse.data.tat_labeller import TATLabeller, relabel_records

    if labeller != "tat":
        _fail(f"--labeller {labeller!r}: the only labeller is 'tat'")
    try:
        summary = relabel_records(src, out, TATLabeller(), min_similarity=min_similarity)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps(summary))


@app.command()
def stats(
    folder: Annotated[Path, typer.Argument(help="A generate --out folder.")],
    png: Annotated[Path | None, typer.Option(help="Heat map path (default FOLDER/stats.png).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON instead of tables.")] = False,
) -> None:
    """Counts per reject reason, pole frequencies, co-activation and situation x pole tables + a PNG."""
    from personafuse.data.stats import compute_stats, heatmap, print_stats

    if not folder.is_dir():
        _fail(f"{folder}: no such folder")
    st = compute_stats(folder)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        print_stats(st)
    path = heatmap(st, png or folder / "stats.png")
    typer.echo(f"heat map: {path}", err=True)


def main() -> None:  # python -m personafuse.data.cli
    app()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
