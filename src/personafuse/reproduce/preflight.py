"""The grid's first cell, ``check``: the mistakes one minute finds, found before any work.

The base, encoder and teacher models are reachable (a gated one says how to get access and that
``HF_TOKEN`` is read); one item of every configured benchmark loads (gating facts come from each
benchmark class's ``gated``); one request per data mode reaches the teacher and one the judge; a
judge whose URL resolves to the teacher's is refused unless ``eval.judge_shares_teacher: true``;
the training launcher and the devices exist; the disk holds the estimated checkpoints. Every
problem names the config file and the field. Checks run side by side under one deadline (two
minutes in all). ``check`` is no input of any other cell: running it again never makes a cell stale.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse.backends import BackendError, model_backend, teacher_backend, teacher_capabilities
from personafuse.reproduce.config import ReproduceConfig

DEADLINE_S = 110.0  # the whole check, so it answers within two minutes
REQUEST_TIMEOUT_S = 30.0
OPENAI_URL = "https://api.openai.com/v1"
GIB = 1024**3


@dataclass(frozen=True)
class Problem:
    field: str  # dotted config field (or --out)
    message: str


class PreflightError(RuntimeError):
    """One line per problem, each ``FILE: FIELD: what is wrong``."""


class _Report:
    """What the checks found, appended from several threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def bad(self, field: str, message: str) -> None:
        with self.lock:
            self.problems.append(Problem(field, message))

    def ok(self, note: str) -> None:
        with self.lock:
            self.notes.append(note)


def run_check(cfg: ReproduceConfig, out: Path, where: str) -> list[str]:
    """Every check; returns the notes of what was verified, or raises :class:`PreflightError`."""
    rep = _Report()
    checks: list[Callable[[], None]] = [
        lambda: _models(cfg, rep),
        lambda: _teacher(cfg, rep),
        lambda: _judge(cfg, rep),
        lambda: _launcher_and_devices(cfg, rep),
        lambda: _disk(cfg, out, rep),
        *[(lambda i=i, b=b: _benchmark(cfg, i, b, rep)) for i, b in enumerate(cfg.eval.benchmarks)],
    ]
    t0 = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="check")
    futures = {pool.submit(_guarded, fn, rep): fn for fn in checks}
    _, late = wait(futures, timeout=DEADLINE_S)
    pool.shutdown(wait=False, cancel_futures=True)
    if late:
        rep.bad("check", f"{len(late)} check(s) did not finish within {DEADLINE_S:.0f} s (a server or the Hub not answering)")
    if rep.problems:
        lines = [f"{where}: {p.field}: {p.message}" for p in sorted(rep.problems, key=lambda p: p.field)]
        raise PreflightError(f"preflight check found {len(lines)} problem(s) before any work:\n" + "\n".join(lines))
    return [*sorted(rep.notes), f"check passed in {time.monotonic() - t0:.1f} s"]


def _guarded(fn: Callable[[], None], rep: _Report) -> None:
    try:
        fn()
    except Exception as e:  # a check that breaks is a problem to report, not a crash of the grid
        rep.bad("check", f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------- models
def _models(cfg: ReproduceConfig, rep: _Report) -> None:
    tc = cfg.training()
    base = cfg.model if cfg.model != "default" else tc.model.base_model
    for fld, spec in (("model", base), ("train.model.encoder_model", tc.model.encoder_model)):
        if (why := model_problem(spec)) is None:
            rep.ok(f"{fld}: {spec} reachable")
        else:
            rep.bad(fld, why)


def model_problem(spec: str) -> str | None:
    """Why ``spec`` (an embedded alias, a local folder or file, a Hub id) cannot be loaded, or None."""
    from personafuse.embedded import BASE_ALIASES, ENCODER_ALIASES, ModelNotFoundError, resolve

    key = spec.strip()
    p = Path(key).expanduser()
    if key.lower() in BASE_ALIASES | ENCODER_ALIASES or key.startswith((".", "/", "~")) or p.exists() or key.count("/") > 1:
        try:
            resolve(key)
        except ModelNotFoundError as e:
            return str(e)
        return None
    return hub_problem(key, "model")


def hub_problem(repo: str, repo_type: str) -> str | None:
    """Whether this machine can download ``repo``: offline, from the local cache; else the Hub's
    answer for this token (``HF_TOKEN``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo, "config.json", repo_type=repo_type), str):
            return None
        return (f"{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it first "
                f"(huggingface-cli download {repo}) or unset HF_HUB_OFFLINE")
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(repo, repo_type=repo_type)
    except GatedRepoError:
        return gated_message(repo, repo_type)
    except RepositoryNotFoundError:
        return f"{repo} is not on the Hub, or is private to another account (HF_TOKEN is read from the environment)"
    except Exception as e:  # network, proxy, rate limit
        return f"{repo}: the Hub did not answer ({type(e).__name__}: {e})"
    return None


def gated_message(repo: str, repo_type: str) -> str:
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    token = "HF_TOKEN is set, but its account has no access yet" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    return (f"{repo} is gated: accept its terms on {page} while logged in, then export HF_TOKEN=<a read token of that "
            f"account> (read from the environment by every cell; {token})")


# ----------------------------------------------------------------------------------- benchmarks
def _benchmark(cfg: ReproduceConfig, i: int, name: str, rep: _Report) -> None:
    from personafuse.evaluation.benchmarks import canonical_name, get_benchmark

    opts = cfg.eval.options.get(name) or cfg.eval.options.get(canonical_name(name))
    bench = get_benchmark(name, opts)
    try:
        items = bench.load(cfg.eval.data)
    except Exception as e:
        gate = f"; {gated_message(bench.gated, 'dataset')}" if bench.gated else ""
        where = f"eval.data ({cfg.eval.data})" if cfg.eval.data else "the default places (eval.data unset: $PERSONAFUSE_BENCHDATA, ../shared/benchdata, the Hub)"
        rep.bad(f"eval.benchmarks[{i}]", f"{name}: no item loads from {where}: {e}{gate}")
        return
    rep.ok(f"eval.benchmarks[{i}]: {name} loads ({len(items)} items, first {items[0].id!r})")


# ----------------------------------------------------------------------------------- endpoints
def _ask(base_url: str | None, model: str, purpose: str) -> None:
    """One short chat completion through the openai backend, the grid's own client, with no retry
    and one deadline; raises what the backend raises."""
    from personafuse.backends.openai_compat import OpenAIBackend
    from personafuse.endpoint import run_sync

    backend = OpenAIBackend(model, base_url=base_url or OPENAI_URL, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                            max_in_flight=1, timeout=REQUEST_TIMEOUT_S, max_retries=0, max_rate_limit_wait=0.0)
    messages = [{"role": "system", "content": f"PersonaFuse preflight check: {purpose}."},
                {"role": "user", "content": "Reply with the word ready."}]

    async def ask() -> None:
        try:
            await backend.chat(messages, max_tokens=8, temperature=0.0, require_content=False)
        finally:
            await backend.aclose()

    run_sync(ask)


def _endpoint_error(e: Exception, url: str, model: str) -> str:
    status = getattr(e, "status", None)  # personafuse.endpoint.EndpointFatal's
    if status in (401, 403):
        return f"{url} refused the key (HTTP {status}); OPENAI_API_KEY is read from the environment"
    if status == 404:
        return f"{url} has no model {model!r} (HTTP 404)"
    return f"{url} did not answer a request for {model!r}: {type(e).__name__}: {str(e)[:200]}"


def _loads_here(rep: _Report, field: str, spec: str, target: str) -> None:
    """A model this machine loads (no endpoint): reachable, or why not, named by its field."""
    why = model_problem(target)
    return rep.bad(field, why) if why else rep.ok(f"{field}: {spec} reachable")


def _teacher(cfg: ReproduceConfig, rep: _Report) -> None:
    from personafuse.reproduce.plan import plan

    t = cfg.teacher
    try:
        backend = teacher_backend(t.spec)
    except BackendError as e:
        return rep.bad("teacher.spec", str(e))
    arg = backend.target
    if not backend.capabilities.endpoint:
        return _loads_here(rep, "teacher.spec", t.spec, arg)
    url = t.base_url or os.environ.get("OPENAI_BASE_URL")
    if not url and not os.environ.get("OPENAI_API_KEY"):
        return rep.bad("teacher.spec", f"{t.spec} at api.openai.com needs OPENAI_API_KEY; or set teacher.base_url to your server")
    modes = [c.name.split("/")[1] for c in plan(cfg) if c.kind == "data"]
    for mode in modes:  # one request per data mode, as each data cell will send them
        try:
            _ask(url, arg, f"the teacher of the {mode} data")
        except Exception as e:
            return rep.bad("teacher.base_url" if t.base_url else "teacher.spec", _endpoint_error(e, url or OPENAI_URL, arg))
    rep.ok(f"teacher.spec: {t.spec} at {url or OPENAI_URL} answered {len(modes)} request(s) ({', '.join(modes)})")


def _same_url(a: str | None, b: str | None) -> bool:
    return (a or OPENAI_URL).rstrip("/").lower() == (b or OPENAI_URL).rstrip("/").lower()


def _judge(cfg: ReproduceConfig, rep: _Report) -> None:
    from personafuse.evaluation.benchmarks import get_benchmark

    e = cfg.eval
    judged = [b for b in e.benchmarks if get_benchmark(b).needs_judge]
    if not judged:
        return
    if not e.judge:
        return rep.bad("eval.judge", f"{', '.join(judged)} need a judge: openai:MODEL (key from OPENAI_API_KEY), hf:PATH or default")
    try:
        backend = model_backend(e.judge)
    except ValueError as err:
        return rep.bad("eval.judge", str(err))
    arg = backend.target
    if not backend.capabilities.endpoint:
        return _loads_here(rep, "eval.judge", e.judge, arg)
    url = e.judge_base_url or os.environ.get("OPENAI_BASE_URL")
    source = "eval.judge_base_url" if e.judge_base_url else ("$OPENAI_BASE_URL" if url else "neither eval.judge_base_url nor $OPENAI_BASE_URL set")
    if teacher_capabilities(cfg.teacher.spec).endpoint:
        teacher_url = cfg.teacher.base_url or os.environ.get("OPENAI_BASE_URL")
        if _same_url(url, teacher_url) and not e.judge_shares_teacher:
            return rep.bad("eval.judge_base_url", f"the judge resolves to the teacher's URL {url or OPENAI_URL} (from {source}); point "
                           "eval.judge_base_url at the judge's server, or set eval.judge_shares_teacher: true if the teacher is meant to judge")
    if _same_url(url, OPENAI_URL) and not os.environ.get("OPENAI_API_KEY"):
        return rep.bad("eval.judge", f"{e.judge} at api.openai.com ({source}) needs an API key: export OPENAI_API_KEY")
    try:
        _ask(url, arg, "the judge of " + ", ".join(judged))
    except Exception as err:
        return rep.bad("eval.judge_base_url" if e.judge_base_url else "eval.judge", _endpoint_error(err, url or OPENAI_URL, arg))
    rep.ok(f"eval.judge: {e.judge} at {url or OPENAI_URL} answered")


# ----------------------------------------------------------------------------------- machine
def launcher_path(exe: str) -> str | None:
    """The launcher beside this interpreter (a virtual environment's ``accelerate``), else on PATH."""
    beside = Path(sys.executable).with_name(exe)
    return str(beside) if beside.is_file() else shutil.which(exe)


def _launcher_and_devices(cfg: ReproduceConfig, rep: _Report) -> None:
    from personafuse import devices

    if cfg.train_launcher:
        argv = shlex.split(cfg.train_launcher)
        if launcher_path(argv[0]) is None:
            rep.bad("train_launcher", f"{argv[0]!r} is not installed (looked beside {sys.executable} and on PATH); "
                    f"pip install {'accelerate' if argv[0] == 'accelerate' else argv[0]}, or set train_launcher: null")
        procs = _launcher_processes(argv)
        if procs > 1 and "--cpu" not in argv:
            import torch

            have = torch.cuda.device_count()
            if have < procs:
                rep.bad("train_launcher", f"starts {procs} processes, one per GPU; this machine has {have} CUDA device(s)")
        # accelerate's --cpu is its simple launcher: one process whatever --num_processes says
        # (several CPU processes need mpirun); the launcher still runs every training cell
        procs = 1 if argv[0] == "accelerate" and "--cpu" in argv else procs
        rep.ok(f"train_launcher: {cfg.train_launcher} ({procs} process(es))")
    entries = [] if cfg.eval.devices == "auto" else list(cfg.eval.devices)
    single = getattr(cfg.eval, "device", None)  # the one device of every model-loading cell (issue 29, item 1)
    for fld, dev in [*((f"eval.devices[{i}]", d) for i, d in enumerate(entries)), *([("eval.device", single)] if single else [])]:
        try:
            devices.resolve_device(dev)
        except devices.DeviceError as e:
            rep.bad(fld, str(e))
    rep.ok(f"eval.devices: {cfg.eval.devices}")


def _launcher_processes(argv: list[str]) -> int:
    for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node", "--num-processes"):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
            if a.startswith(flag + "=") and a.split("=", 1)[1].isdigit():
                return int(a.split("=", 1)[1])
    return 1


def _disk(cfg: ReproduceConfig, out: Path, rep: _Report) -> None:
    need = checkpoint_bytes(cfg)
    if need is None:
        return rep.ok("--out: disk not estimated (the base or encoder config is not readable before download)")
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        return rep.bad("--out", f"{where} has {free / GIB:.1f} GiB free; the training checkpoints need about {need / GIB:.1f} GiB "
                       "(an estimate: LoRA experts and encoder with optimiser state, per train cell and stage)")
    rep.ok(f"--out: {free / GIB:.1f} GiB free, checkpoints need about {need / GIB:.2f} GiB (estimate)")


def _model_config(spec: str) -> dict[str, Any] | None:
    import json

    from personafuse.embedded import BASE_ALIASES, ENCODER_ALIASES

    if spec.strip().lower() in BASE_ALIASES | ENCODER_ALIASES:
        return None  # the embedded models: tens of MB
    p = Path(spec).expanduser()
    if not (p / "config.json").is_file():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec, "config.json")
        if not isinstance(hit, str):
            return None
        p = Path(hit).parent
    return json.loads((p / "config.json").read_text())


def _params(c: dict[str, Any]) -> tuple[int, int]:
    """(LoRA weights per rank on every projection of every layer, all weights) of a decoder config."""
    h, m, n = c["hidden_size"], c.get("intermediate_size", 4 * c["hidden_size"]), c["num_hidden_layers"]
    kv = h * c.get("num_key_value_heads", c.get("num_attention_heads", 1)) // max(1, c.get("num_attention_heads", 1))
    lora = n * (9 * h + 2 * kv + 3 * m)  # q, k, v, o, gate, up, down: (in + out) each
    return lora, c.get("vocab_size", 0) * h + n * (2 * h * h + 2 * h * kv + 3 * h * m)


def checkpoint_bytes(cfg: ReproduceConfig) -> int | None:
    """Estimated disk for the grid's training: fp32 weights plus Adam's two moments (12 bytes a
    parameter) for every trained parameter, kept for each stage (PersonaFuse: ten experts and the
    encoder; a baseline: one LoRA), times two for the checkpoint beside each stage's model."""
    from personafuse.reproduce.plan import plan

    tc = cfg.training()
    base = _model_config(cfg.model if cfg.model != "default" else tc.model.base_model)
    if base is None:
        return None
    enc = _model_config(tc.model.encoder_model)
    lora, _ = _params(base)
    encoder = _params(enc)[1] if enc else 0
    total = 0
    for cell in (c for c in plan(cfg) if c.kind == "train"):
        experts = 1 if cell.variant.endswith("_ft") else 10
        stages = 1 if cell.variant.endswith("_ft") else len(tc.stages)
        total += stages * 12 * (experts * tc.model.r * lora + (encoder if experts > 1 else 0))
    return 2 * total


def check_cell(cfg: ReproduceConfig, out: Path, where: str, *, write: bool = True) -> list[str]:
    """The ``check`` cell: :func:`run_check`, its notes (or problems) in ``OUT/check/check.json``
    and ``OUT/reproduce.log`` when ``write`` (a dry run writes nothing). Never cached: it runs
    whenever a cell is left to run, and no cell reads it."""
    t = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        notes = run_check(cfg, out, where)
    except PreflightError as e:
        if write:
            _record(out, {"ok": False, "finished": t, "problems": str(e).splitlines()[1:]}, f"{e}\n")
        raise
    if write:
        _record(out, {"ok": True, "finished": t, "notes": notes}, "".join(f"{n}\n" for n in notes))
    return notes


def _record(out: Path, result: dict[str, Any], text: str) -> None:
    import json

    folder = out / "check"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with (out / "reproduce.log").open("a", encoding="utf-8") as f:
        f.write(f"\n=== check [{result['finished']}]\n{text}")
