"""Record the "behaviour stays as it is" goldens of issue 33 from whichever ``personafuse`` is on the path.

The committed goldens were taken from the code before the issue-33 moves (commit f474583):

    PYTHONPATH=/tmp/grid/main/src HF_HUB_OFFLINE=1 .venv/bin/python tests/golden/make_goldens.py

Pass part names (``help metrics checkpoint eval_run chat``) to redo only those. tests/test_golden_behaviour.py
computes the same snapshots from the current code (the functions below) and compares them with the files:

* ``cli_help.json``: every command's and sub-command's options (names, flags, defaults, types), read from
  the click objects that ``--help`` prints;
* ``metrics.json``: the ``/metrics`` families (name, type, label names, label values of a fixed request
  sequence, histogram buckets) of a real server around the tiny test model;
* ``checkpoint/``: a PersonaFuse checkpoint on the embedded SmolLM2 (rank 1, ``k_proj`` only, seeded
  random experts: small enough to commit) that today's loader must keep reading;
* ``cli_outputs.json``: ``chat --json`` and ``route --json`` stdout (greedy) on the embedded default and
  on ``pf:`` that checkpoint, byte for byte;
* ``eval_run/``: a small stored ``eval`` run on tests/fixtures/benchdata whose ``--rescore`` must give
  the same results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent
ROOT = GOLDEN.parents[1]
TESTS = ROOT / "tests"
CHECKPOINT = GOLDEN / "checkpoint"
EVAL_RUN = GOLDEN / "eval_run"
EVAL_BENCHMARKS = "emobench"  # more benchmarks (gsm8k, eqbench, ...) did not finish recording on the shared CPU

PROMPTS = ["I can't sleep before my exam tomorrow.", "Give me three ideas for a birthday party."]
QUERIES = [*PROMPTS, "Prove that the square root of 2 is irrational."]
# Each case: the CLI words after ``personafuse`` (``--model`` is added per model).
CLI_CASES: dict[str, list[str]] = {
    "chat_router": ["chat", "--json", "--max-new-tokens", "24", PROMPTS[0]],
    "chat_router_2": ["chat", "--json", "--max-new-tokens", "24", PROMPTS[1]],
    "chat_pole": ["chat", "--json", "--max-new-tokens", "24", "--routing", "pole:high_A", PROMPTS[0]],
    "chat_fixed": ["chat", "--json", "--max-new-tokens", "16", "--routing", "fixed:high_O=0.5,low_N=0.5", PROMPTS[1]],
    "route": ["route", "--json", *QUERIES],
    "route_tau": ["route", "--json", "--tau", "0.25", *QUERIES],
}
MODELS = {"default": "default", "checkpoint": f"pf:{CHECKPOINT}"}


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return str(v)


# ---------------------------------------------------------------- --help options
def cli_help() -> dict[str, Any]:
    """{command path: {param name: {opts, secondary_opts, default, flag, multiple, required, type}}} for
    every command of the CLI, read from the click command tree that ``--help`` renders."""
    import typer

    import personafuse.cli as cli

    cli._register()
    root = typer.main.get_command(cli.app)
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: str) -> None:  # typer's own click (typer._click): read by duck typing
        params = {}
        for p in cmd.params:
            params[p.name] = {
                "kind": p.param_type_name,
                "opts": sorted(p.opts),
                "secondary_opts": sorted(p.secondary_opts),
                "default": _jsonable(p.default),
                "flag": bool(getattr(p, "is_flag", False)),
                "multiple": bool(p.multiple),
                "required": bool(p.required),
            }
        out[path or "personafuse"] = params
        if isinstance(getattr(cmd, "commands", None), dict):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, f"{path} {name}".strip())

    walk(root, "")
    return out


# ---------------------------------------------------------------- /metrics
def parse_metrics(text: str) -> dict[str, Any]:
    """The families of a Prometheus text exposition: type, label names, label sets (bucket bounds
    aside), and the bucket bounds of each histogram. Read line by line (the format's grammar: a
    ``# TYPE`` line, then samples ``name{l="v",...} value``), so the same reading applies to the
    hand-written text of before and the client library's."""
    import re

    types: dict[str, str] = {}
    fams: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            fams[name] = {"type": kind, "labels": set(), "label_sets": set(), "buckets": []}
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        assert m, f"unparsable metrics line {line!r}"
        sample, labels = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        fam = next((f for f in types if sample == f or (sample.startswith(f + "_") and sample[len(f) + 1 :] in ("bucket", "sum", "count", "total"))), None)
        assert fam is not None, f"sample {sample} has no # TYPE"
        le = labels.pop("le", None)
        if le is not None and sample.endswith("_bucket"):
            bound = repr(float(le))  # "1", "1.0" and "1e0" are one bound
            if bound not in fams[fam]["buckets"]:
                fams[fam]["buckets"].append(bound)
        fams[fam]["labels"] |= set(labels)
        if labels:
            fams[fam]["label_sets"].add(json.dumps(labels, sort_keys=True))
    return {n: {**f, "labels": sorted(f["labels"]), "label_sets": sorted(f["label_sets"])} for n, f in fams.items()}


def metrics_text() -> str:
    """/metrics of a real server (tiny test model, loopback) after a fixed request sequence: two
    answered chat completions, one refused as too long (400), one unknown model (404)."""
    sys.path.insert(0, str(TESTS))
    import httpx

    from conftest import build_tiny
    from personafuse.serving.server import ServeConfig, create_app
    from serve_support import LiveServer

    cfg = ServeConfig(model_name="tiny", max_tokens_limit=8, max_prompt_tokens=40, default_max_tokens=4, batch_wait_ms=5)
    with LiveServer(create_app(build_tiny(), cfg)) as s:
        for body in (
            {"model": "tiny", "messages": [{"role": "user", "content": "i feel so anxious"}], "max_tokens": 3},
            {"model": "tiny", "messages": [{"role": "user", "content": "write a poem"}], "max_tokens": 2, "stream": True},
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 999},
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ):
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120).read()
        return httpx.get(s.url + "/metrics", timeout=60).text


# ---------------------------------------------------------------- checkpoint fixture
def make_checkpoint(directory: Path = CHECKPOINT) -> None:
    """A checkpoint as today's code writes it, on the embedded SmolLM2: rank 1 on ``k_proj`` with a
    16-wide persona embedding (about 1 MB), experts seeded random so that they change the replies."""
    import torch

    from personafuse import PersonaFuseConfig, PersonaFuseModel

    cfg = PersonaFuseConfig(r=1, alpha=2.0, target_modules=["k_proj"], embed_dim=16, seed=3)
    model = PersonaFuseModel.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.mixture_layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.05)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory)


# ---------------------------------------------------------------- CLI outputs
def run_cli(args: list[str], env_src: str | None = None) -> str:
    """stdout of ``personafuse ARGS`` in a fresh process (``env_src``: the ``src`` folder to run)."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if env_src:
        env["PYTHONPATH"] = env_src
    r = subprocess.run([sys.executable, "-m", "personafuse.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise RuntimeError(f"personafuse {' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def cli_outputs() -> dict[str, dict[str, str]]:
    """stdout of each case, in this process through typer's test runner (the command's own code
    path, output included), each model loaded once: a fresh process per case would load SmolLM2
    twelve times. One torch thread, recorded and compared: greedy text from random experts can flip
    a token with the reduction order, which the thread count changes (`make test` runs on one)."""
    import functools

    import torch
    from typer.testing import CliRunner

    import personafuse.chat_cli as chat_cli
    import personafuse.cli as cli

    cli._register()
    original = chat_cli.load_model
    chat_cli.load_model = functools.lru_cache(maxsize=2)(original)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, dict[str, str]] = {}
        for m, spec in MODELS.items():
            out[m] = {}
            for case, args in CLI_CASES.items():
                r = CliRunner().invoke(cli.app, [*args[:1], "--model", spec, *args[1:]])
                if r.exit_code:
                    raise RuntimeError(f"personafuse {' '.join(args)} exited {r.exit_code}: {r.output[-2000:]}") from r.exception
                out[m][case] = r.stdout
            chat_cli.load_model.cache_clear()
        return out
    finally:
        chat_cli.load_model = original
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- eval run
def make_eval_run(directory: Path = EVAL_RUN) -> None:
    """Resumes a run left in ``directory`` (delete it to start afresh)."""
    run_cli(["eval", "--model", "default", "--benchmarks", EVAL_BENCHMARKS, "--data", str(TESTS / "fixtures" / "benchdata"),
             "--limit", "2", "--max-new-tokens", "24", "--batch-size", "4", "--threads", "2", "--no-progress", "--out", str(directory)])  # fmt: skip


def eval_scores(results: dict[str, Any]) -> dict[str, Any]:
    """What ``--rescore`` must reproduce: each benchmark's aggregate, less its bookkeeping."""
    return {n: {k: v for k, v in agg.items() if k not in ("rescore",)} for n, agg in results["benchmarks"].items()}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main(parts: list[str]) -> None:
    parts = parts or ["help", "metrics", "checkpoint", "chat", "eval_run"]
    if "help" in parts:
        write_json(GOLDEN / "cli_help.json", cli_help())
    if "metrics" in parts:
        write_json(GOLDEN / "metrics.json", parse_metrics(metrics_text()))
    if "checkpoint" in parts:
        make_checkpoint()
    if "chat" in parts:
        write_json(GOLDEN / "cli_outputs.json", cli_outputs())
    if "eval_run" in parts:
        make_eval_run()
        results = json.loads((EVAL_RUN / "results.json").read_text())
        write_json(GOLDEN / "eval_scores.json", eval_scores(results))


if __name__ == "__main__":
    main(sys.argv[1:])
