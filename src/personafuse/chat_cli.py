"""``personafuse chat``, ``personafuse route`` and ``personafuse demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from personafuse.devices import DeviceOpt, DtypeOpt, cli_placement, placement_line
from personafuse.display import show_reply

console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="default (embedded SmolLM2 base and router encoder, untrained experts) | pf:DIR or a checkpoint "
        "directory | base, hf:ID_OR_PATH or a bare id/path: a plain model wrapped with fresh experts.",
    ),
]
RoutingOpt = Annotated[
    str,
    typer.Option(
        "--routing",
        "-r",
        help="router | pole:high_A | top_k:K | random:K | fixed:high_A=0.6,low_N=0.4 | blend:ALPHA:pole=w,...",
    ),
]

def quiet_loading() -> None:
    """No transformers progress bar per model load (two or three per command): they would bury
    the output, and the commands say what they are loading themselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(spec: str, device: str | None = None, dtype: str = "auto") -> Any:
    """A PersonaFuseModel for a ``--model`` spec (personafuse.specs: one grammar for every command)
    on ``device`` in ``dtype`` (personafuse.devices); a bad spec or missing path is a usage error
    naming ``--model``."""
    from personafuse.specs import load_personafuse

    quiet_loading()
    try:
        return load_personafuse(spec, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:  # a missing path or embedded package: the message says which
        raise typer.BadParameter(str(e), param_hint="--model") from None


def load_placed(spec: str, device: str, dtype: str) -> Any:
    """:func:`load_model` after checking ``--device`` / ``--dtype`` (a device this machine lacks
    exits 2 before anything loads), then the first line: where the model computes, read from its
    parameters."""
    device, dtype = cli_placement(device, dtype)
    with err_console.status("loading model…"):
        m = load_model(spec, device, dtype)
    err_console.print(placement_line(m, spec), markup=False, highlight=False, soft_wrap=True)
    return m


def _routing(text: str, seed: int):
    from personafuse.moe.routing import Routing
    from personafuse.traits import TraitError

    try:
        return Routing.parse(text, seed=seed)
    except TraitError as e:
        raise typer.BadParameter(str(e), param_hint="--routing") from None


def chat_command(
    message: Annotated[str | None, typer.Argument(help="One message; leave out for an interactive chat.")] = None,
    model: ModelOpt = "default",
    routing: RoutingOpt = "router",
    max_new_tokens: Annotated[int, typer.Option(help="Reply length limit in tokens.")] = 128,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample).")] = 0.7,
    seed: Annotated[int, typer.Option(help="Seed for sampling and random routing.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reply and weights as JSON.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Chat with a PersonaFuse model; every reply shows its ten routing weights."""
    route_spec = _routing(routing, seed)
    m = load_placed(model, device, dtype)
    kw = {"routing": route_spec, "max_new_tokens": max_new_tokens, "do_sample": sample, "temperature": temperature, "seed": seed}

    def show(text: str, gen: Any) -> None:
        if as_json:  # one JSON object per reply, also in the interactive chat
            print(json.dumps({"reply": gen.text, "weights": gen.weights, "finish_reason": gen.finish_reason}), flush=True)
        else:
            show_reply(text, gen, console)

    if message is not None:
        show(message, m.generate([message], **kw)[0])
        return
    _interactive(m, kw, show, as_json)


def _interactive(m: Any, kw: dict[str, Any], show: Any, as_json: bool) -> None:
    if not as_json:
        console.print("[bold]Interactive chat[/bold] — empty line or Ctrl-D to quit, '/reset' to start over.")
    history: list[dict[str, str]] = []
    while True:
        try:
            # with --json the prompt goes to stderr, so stdout stays one JSON object per line
            text = (err_console if as_json else console).input("[cyan]you> [/cyan]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not text:
            break
        if text == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": text})
        gen = m.generate([history], **kw)[0]
        history.append({"role": "assistant", "content": gen.text})
        show(text, gen)


def route_command(
    queries: Annotated[list[str], typer.Argument(help="One or more queries.")],
    model: ModelOpt = "default",
    as_json: Annotated[bool, typer.Option("--json", help='Print JSON: {"weights": {pole: w}} per query.')] = False,
    tau: Annotated[float | None, typer.Option(help="Override the softmax temperature.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Show how the router would mix the ten experts for each query (no generation)."""
    from personafuse.display import summary_line, weight_bars
    from personafuse.traits import big_five_summary, weights_dict

    if tau is not None and not tau > 0:
        raise typer.BadParameter(f"the temperature must be positive, got {tau}", param_hint="--tau")
    m = load_placed(model, device, dtype)
    w = m.route(queries, tau=tau)
    for q, row in zip(queries, w.tolist(), strict=True):
        weights = weights_dict(row)
        if as_json:
            top = sorted(weights, key=weights.__getitem__, reverse=True)[:3]
            print(json.dumps({"query": q, "weights": weights, "top": top, "big_five": big_five_summary(row)}))
        else:
            console.print(weight_bars(weights, title=q))
            console.print(f"[dim]{summary_line(weights)}[/dim]\n")


def demo_command(
    out: Annotated[Path, typer.Option(help="Working folder (data and checkpoints are cached here).")] = Path("runs/demo"),
    queries: Annotated[int, typer.Option(help="Seed queries the embedded teacher turns into records.")] = 24,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length limit in tokens (the demo's replies end on EOS well before it).")] = 384,
    untrained: Annotated[bool, typer.Option("--untrained", help="Skip data and training: show the untrained model.")] = False,
) -> None:
    """The whole pipeline on the embedded models, ending in contrasting replies.

    Persona-CoT data from the embedded teacher, the three training stages, then three contrasting
    queries (anxious user, maths, brainstorm), each reply shown with its ten routing weights."""
    from personafuse.demo import DEMO_QUERIES, run_demo

    quiet_loading()
    if untrained:
        with err_console.status("loading model…"):
            m = load_model("default")
        for q, gen in zip(DEMO_QUERIES, m.generate(DEMO_QUERIES, max_new_tokens=max_new_tokens), strict=True):
            show_reply(q, gen, console)
        return
    run_demo(out, queries=queries, max_new_tokens=max_new_tokens)


def export_command(
    out: Annotated[Path, typer.Argument(help="Folder for the adapter (created).")],
    routing: Annotated[
        str | None, typer.Option(help="The fixed persona: pole:high_A | fixed:high_A=0.6,low_N=0.4 | ten numbers after fixed:.")
    ] = None,
    model: ModelOpt = "default",
    name: Annotated[str | None, typer.Option(help="The adapter's name in the printed vllm command (default: the folder's name; with --stack: personafuse, what serve --engine vllm asks for).")] = None,
    stack: Annotated[
        bool, typer.Option("--stack", help="The ten experts unweighted, for vLLM with the personafuse plugin: every request sends its own weights.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Export one fixed persona as a standard peft LoRA (rank 10r, the same outputs as the mixture),
    e.g. for vLLM's multi-LoRA serving: one adapter per persona, chosen per request by model name.
    With --stack: the ten experts as one rank-10r adapter whose blocks the personafuse vLLM plugin
    scales per request (`personafuse serve --engine vllm` sends the weights).

    Prints the `vllm serve` command that loads it (docs/serving.md, "Past one machine")."""
    from personafuse.moe.model import vllm_max_lora_rank

    if stack == (routing is not None):
        raise typer.BadParameter("give either --routing (one fixed persona) or --stack (every persona, weights per request)", param_hint="--routing")
    w = None if stack else _fixed_weights(routing or "")
    m = load_placed(model, device, dtype)
    with err_console.status("writing the adapter…"):
        path = (m.export_stack(out) if w is None else m.export_lora(w, out)).resolve()
    info = json.loads((path / "personafuse_mixture.json").read_text())
    rank = m.config.r * m.config.num_experts
    what = "the ten experts, weighted per request" if stack else ", ".join(f"{k} {v:g}" for k, v in info["weights"].items() if v)
    err_console.print(f"wrote {path} (rank {rank}: {what})")
    # vLLM loads Hugging Face folders: serve_model is the converted one for a GGUF base
    print(f"vllm serve {info['serve_model']} --enable-lora --max-lora-rank {vllm_max_lora_rank(rank)} "
          f"--lora-modules {name or ('personafuse' if stack else path.name)}={path}")  # fmt: skip


def _fixed_weights(routing: str) -> list[float]:
    from personafuse.moe.routing import Routing
    from personafuse.traits import TraitError

    try:
        r = Routing.parse(routing)
    except TraitError as e:
        raise typer.BadParameter(str(e), param_hint="--routing") from None
    if r.mode not in ("fixed", "pole"):
        raise typer.BadParameter(f"an exported persona is one fixed mixture; {r.mode!r} depends on the query", param_hint="--routing")
    return r.resolve(1)[0].tolist()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
    app.command("route")(route_command)
    app.command("demo")(demo_command)
    app.command("export")(export_command)
