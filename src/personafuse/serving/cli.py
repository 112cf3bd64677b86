"""``personafuse serve`` and ``personafuse annotate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from personafuse.configs import config_message, default, option
from personafuse.devices import DeviceOpt, DtypeOpt
from personafuse.serving.config import ServeConfig

S = ServeConfig  # the options below take their defaults and help from its fields


def serve_command(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="default (embedded PersonaFuse, untrained experts) | pf:DIR or a checkpoint directory | base, hf:ID_OR_PATH or a bare id/path: a plain model wrapped with fresh experts."),
    ] = "default",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, option(S, "api_key", envvar="PERSONAFUSE_API_KEY")] = default(S, "api_key"),
    served_name: Annotated[str, option(S, "model_name")] = default(S, "model_name"),
    max_batch: Annotated[int, option(S, "max_batch")] = default(S, "max_batch"),
    max_queue: Annotated[int, option(S, "max_queue")] = default(S, "max_queue"),
    batch_wait_ms: Annotated[float, option(S, "batch_wait_ms")] = default(S, "batch_wait_ms"),
    max_prompt_tokens: Annotated[int, option(S, "max_prompt_tokens")] = default(S, "max_prompt_tokens"),
    max_tokens_limit: Annotated[int, option(S, "max_tokens_limit")] = default(S, "max_tokens_limit"),
    default_max_tokens: Annotated[int, option(S, "default_max_tokens")] = default(S, "default_max_tokens"),
    temperature: Annotated[float, option(S, "default_temperature")] = default(S, "default_temperature"),
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    max_body_bytes: Annotated[int, option(S, "max_body_bytes")] = default(S, "max_body_bytes"),
    max_prompt_chars: Annotated[int | None, option(S, "max_prompt_chars")] = default(S, "max_prompt_chars"),
    request_timeout: Annotated[float, option(S, "request_timeout_s")] = default(S, "request_timeout_s"),
    drain_timeout: Annotated[float, option(S, "drain_timeout_s")] = default(S, "drain_timeout_s"),
    scheduler: Annotated[str, option(S, "scheduler")] = default(S, "scheduler"),
    prefill_chunk: Annotated[int, option(S, "prefill_chunk")] = default(S, "prefill_chunk"),
    base_only: Annotated[bool, option(S, "base_only", "--base-only")] = default(S, "base_only"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    engine: Annotated[
        str, typer.Option(help="local: decode in this process | vllm: a stateless front that routes here and generates on vLLM at --vllm-url (docs/serving.md, \"Past one machine\").")
    ] = "local",
    vllm_url: Annotated[
        str | None, typer.Option(help="With --engine vllm: the vLLM server holding the stack adapter (personafuse export --stack), e.g. http://10.0.0.5:8000.")
    ] = None,
    vllm_adapter: Annotated[str, typer.Option(help="With --engine vllm: the stack adapter's name in vLLM's --lora-modules.")] = "personafuse",
) -> None:
    """Serve the model with an OpenAI-compatible API and a chat page at http://HOST:PORT/.

    With --engine vllm the same API runs the router here and generates on vLLM (the personafuse
    plugin applies each request's mixture): many fronts can share many vLLM replicas."""
    api_key = _nonempty_key(api_key, "PERSONAFUSE_API_KEY", "--api-key")
    _check_engine(engine, vllm_url, base_only)
    try:  # the config's own checks, before any model loads
        cfg = ServeConfig(
            model_name=served_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
            batch_wait_ms=batch_wait_ms, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
            default_max_tokens=default_max_tokens, default_temperature=temperature, max_body_bytes=max_body_bytes,
            max_prompt_chars=max_prompt_chars, request_timeout_s=request_timeout, drain_timeout_s=drain_timeout,
            scheduler=scheduler, prefill_chunk=prefill_chunk, base_only=base_only,
        )
    except ValueError as e:
        raise typer.BadParameter(config_message(e)) from None
    from personafuse.devices import cli_placement, placement_line

    device, dtype = cli_placement(device, dtype)  # a device this machine lacks: exit 2 before loading
    import torch

    from personafuse.chat_cli import load_model
    from personafuse.serving.server import create_app, serve

    if threads:
        torch.set_num_threads(threads)
    m = load_model(model, device, dtype).eval()
    typer.echo(placement_line(m, model), err=True)
    typer.echo(f"chat page: http://{host}:{port}/   API: http://{host}:{port}/v1", err=True)
    if engine == "vllm":
        from personafuse.serving.vllm_front import create_front_app

        typer.echo(f"generating on vLLM at {vllm_url} (adapter {vllm_adapter!r})", err=True)
        serve(create_front_app(m, str(vllm_url), cfg, vllm_adapter), host, port)
    else:
        serve(create_app(m, cfg), host, port)


def _check_engine(engine: str, vllm_url: str | None, base_only: bool) -> None:
    if engine not in ("local", "vllm"):
        raise typer.BadParameter(f"{engine!r} is not an engine; use local or vllm", param_hint="--engine")
    if engine == "vllm" and not vllm_url:
        raise typer.BadParameter("--engine vllm needs the vLLM server's address, e.g. --vllm-url http://127.0.0.1:8001", param_hint="--vllm-url")
    if engine == "vllm" and not vllm_url.startswith(("http://", "https://")):  # type: ignore[union-attr]
        raise typer.BadParameter(f"{vllm_url!r} is not an http(s) URL", param_hint="--vllm-url")
    if engine == "local" and vllm_url:
        raise typer.BadParameter("--vllm-url is read with --engine vllm only", param_hint="--vllm-url")
    if engine == "vllm" and base_only:
        raise typer.BadParameter("--base-only is a local-engine anchor; vLLM serves the base under its own model name", param_hint="--base-only")


def _nonempty_key(value: str | None, envvar: str, option: str) -> str | None:
    """The key as given; an empty one is an error, not "no authentication". Click reads an empty
    environment variable as unset, so the variable is looked at directly."""
    if value is None and envvar in os.environ:
        value = os.environ[envvar]
    if value is not None and not value.strip():
        raise typer.BadParameter(f"the key is empty (from {option} or {envvar}); give a key or leave both unset", param_hint=option)
    return value


def annotate_serve_command(
    responses: Annotated[
        list[Path] | None, typer.Argument(help="JSONL files, one per system (see docs/serving.md); leave out to reuse the database.")
    ] = None,
    db: Annotated[Path, typer.Option(help="SQLite file holding pairs and judgements.")] = Path("annotations.sqlite"),
    annotators_per_pair: Annotated[
        int | None,
        typer.Option(help="Judgements wanted per pair (7 as in the paper if never set; later runs keep the stored value)."),
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8100,
    reference: Annotated[
        str | None, typer.Option(help="Only pair this system with each other one (e.g. personafuse vs each baseline).")
    ] = None,
    owner_key: Annotated[
        str | None,
        typer.Option(envvar="PERSONAFUSE_OWNER_KEY", help="Key for /api/summary (default: a new random key, printed at start)."),
    ] = None,
) -> None:
    """Load responses (once; later runs reuse the database) and serve the annotation page.
    Participants sign in with tokens from 'personafuse annotate tokens'."""
    import uvicorn

    from personafuse.evaluation.annotation import AnnotationStore, create_annotation_app

    owner_key = _nonempty_key(owner_key, "PERSONAFUSE_OWNER_KEY", "--owner-key")
    store = AnnotationStore(db, annotators_per_pair=annotators_per_pair, reference=reference)
    if responses:
        added = store.load_responses(responses)
        typer.echo(f"{added} new pairs; {store.count_pairs()} in {db}", err=True)
    if not store.participants():
        typer.echo(f"no participant tokens yet: issue them with 'personafuse annotate tokens --db {db} --mint N'", err=True)
    app = create_annotation_app(store, owner_key=owner_key)
    if owner_key is None:
        typer.echo(f"owner key for /api/summary (this run only): {app.state.owner_key}", err=True)
    typer.echo(f"annotation page: http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def annotate_tokens_command(
    names: Annotated[
        list[str] | None, typer.Argument(help="Participants to issue tokens to (a participant who has one gets a new one).")
    ] = None,
    db: Annotated[Path, typer.Option(help="SQLite file of the study.")] = Path("annotations.sqlite"),
    mint: Annotated[int, typer.Option(help="Issue tokens to this many new participants (p001, p002, ...).")] = 0,
    import_file: Annotated[
        Path | None,
        typer.Option("--import", help="Register tokens issued elsewhere: lines 'participant<TAB or comma>token' ('#' comments)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the new 'participant<TAB>token' lines here (default: stdout).")] = None,
) -> None:
    """Issue participant tokens for the annotation page (only their hashes are stored: hand them
    out now), or register a list of tokens; with no arguments, list the participants."""
    from personafuse.evaluation.annotation import AnnotationError, AnnotationStore

    store = AnnotationStore(db)
    try:
        if import_file is not None:
            n = store.import_tokens(_token_lines(import_file))
            typer.echo(f"{n} tokens registered in {db}", err=True)
        issued = store.issue_tokens(names or [], mint) if names or mint else []
    except AnnotationError as e:
        raise typer.BadParameter(str(e)) from None
    if issued:
        text = "".join(f"{pid}\t{token}\n" for pid, token in issued)
        if out is None:
            typer.echo(text, nl=False)
        else:
            # the tokens are the participants' passwords: the file is the owner's alone from the start
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            typer.echo(f"{len(issued)} tokens written to {out}", err=True)
    elif import_file is None:
        for p in store.participants():
            typer.echo(f"{p['id']}\t{p['judgements']} judgements")


def _token_lines(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pid, sep, token = line.partition("\t") if "\t" in line else line.partition(",")
        if not sep:
            raise typer.BadParameter(f"{path}:{n}: expected 'participant<TAB>token' or 'participant,token'")
        pairs.append((pid.strip(), token.strip()))
    return pairs


def annotate_export_command(
    db: Annotated[Path, typer.Option(help="SQLite file written by 'annotate serve'.")] = Path("annotations.sqlite"),
    out: Annotated[Path, typer.Option(help="Folder for win_rates.csv, win_rates.md and win_rates.png.")] = Path("human_eval"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")] = 2000,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Win rates per system pair and task type (majority vote per pair) with bootstrap CIs."""
    from personafuse.evaluation.annotation import AnnotationStore, export

    paths = export(AnnotationStore(db), out, n_boot=bootstrap, seed=seed)
    for p in paths:
        typer.echo(str(p))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    annotate_app = typer.Typer(help="Pairwise human evaluation: collect judgements, export win rates.", no_args_is_help=True)
    app.add_typer(annotate_app, name="annotate")

    annotate_app.command("serve")(annotate_serve_command)
    annotate_app.command("tokens")(annotate_tokens_command)
    annotate_app.command("export")(annotate_export_command)
