"""Running the grid: every cell that loads a model is the project's own command (``personafuse data
generate``, ``train``, ``train baseline``, ``eval``) in a child process, run in ``OUT`` with paths
relative to it, its output appended to ``OUT/reproduce.log``. A cell is done when its
``done.json`` (the command it ran, a train cell's whole training config, seconds) exists; a done
cell whose command or config changed, or whose input was redone, is cleared and redone. The
commands resume themselves (records, checkpoints, evaluated items), so a run killed anywhere loses
at most part of one cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from personafuse.reproduce.config import BASELINE_KIND, TRAINING_DATA, ReproduceConfig
from personafuse.reproduce.plan import QUERIES, Cell, estimate, plan, shares_warmup

LOG = "reproduce.log"
CONFIG = "reproduce.json"
# Cells whose command cannot pick up a partial folder: cleared before they run.
FRESH = ("queries", "relabel", "replies", "report")


class ReproduceError(RuntimeError):
    """A cell failed; the message names it and quotes the end of its output."""


def _absolute(value: str | None) -> str | None:
    """A path the user gave relative to their directory, made absolute (cells run inside OUT)."""
    if value is None:
        return None
    head, sep, rest = value.partition(":")
    if sep and head == "file":
        return f"file:{Path(rest).expanduser().resolve()}"
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def resolved(cfg: ReproduceConfig) -> ReproduceConfig:
    """``cfg`` with every local path absolute."""
    cfg = dataclasses.replace(cfg, model=_absolute(cfg.model) or cfg.model, train=_absolute(cfg.train))
    sources = [_absolute(s) or s for s in cfg.data.sources]
    cfg.data = dataclasses.replace(cfg.data, source=sources[0] if isinstance(cfg.data.source, str) else sources)
    cfg.eval = dataclasses.replace(cfg.eval, data=_absolute(cfg.eval.data))
    cfg.probe = dataclasses.replace(cfg.probe, data=_absolute(cfg.probe.data))
    return cfg


# ---------------------------------------------------------------------------------- the split
def split_queries(cfg: ReproduceConfig, folder: Path) -> dict[str, int]:
    """``train.jsonl`` (``data.limit`` distinct queries every data mode answers) and ``heldout.jsonl``
    (``data.heldout`` per situation, never trained on: the router analysis and the pairwise study),
    from the sources shuffled with ``data.seed``."""
    train, heldout = _split(mixed_sources(cfg), cfg.data.heldout, cfg.data.limit)
    if len(train) < cfg.data.limit:
        raise ReproduceError(f"data.limit: {cfg.data.limit} training queries asked, the source {cfg.data.source!r} has "
                             f"{len(train)} distinct ones left after holding out {cfg.data.heldout} per situation")
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        text = "".join(json.dumps({"id": f"{name[:-6]}-{i}", "query": q.text, "situation": q.situation}, ensure_ascii=False) + "\n"
                       for i, q in enumerate(rows))
        (folder / name).write_text(text, encoding="utf-8")
    return {"train": len(train), "heldout": len(heldout)}


def _split(queries: list[Any], heldout: int, limit: int) -> tuple[list[Any], list[Any]]:
    """The first ``heldout`` queries of each situation are held out, the next ``limit`` train."""
    held: dict[str, list[Any]] = defaultdict(list)
    train = []
    for q in queries:
        if q.situation and len(held[q.situation]) < heldout:
            held[q.situation].append(q)
        elif len(train) < limit:
            train.append(q)
    return train, [q for rows in held.values() for q in rows]


def _in_turn(lists: list[list[Any]]) -> list[Any]:
    """One query of each source in turn; a query another source (or an earlier turn) already gave
    is dropped (compared normalised, as ``personafuse data generate`` de-duplicates)."""
    from personafuse.data.sources import normalise_query

    seen: set[str] = set()
    out = []
    for i in range(max(map(len, lists), default=0)):
        for qs in lists:
            if i < len(qs) and (key := normalise_query(qs[i].text)) not in seen:
                seen.add(key)
                out.append(qs[i])
    return out


def _trim_hub(queries: list[Any], hub: set[int], excess: int) -> list[Any]:
    """Drops the last ``excess`` Hub queries (sampled a little over), so the split's cut at
    ``data.limit`` never falls on a small source's queries."""
    drop: set[int] = set()
    for q in reversed(queries):
        if len(drop) >= excess:
            break
        if id(q) in hub:
            drop.add(id(q))
    return [q for q in queries if id(q) not in drop]


def mixed_sources(cfg: ReproduceConfig) -> list[Any]:
    """The queries of ``data.source`` (one spec or a list, e.g. the paper's ShareGPT, WildChat,
    PersonaHub and Infinity-Instruct plus the labelled seeds), each shuffled with ``data.seed`` and
    taken in turn, duplicates across sources dropped. Small sources (seeds, files) give all they
    have; the Hub sources share the rest, sampled until the split holds ``data.limit`` distinct
    training queries (or every Hub source is exhausted: the split then says how many it found)."""
    from personafuse.data.sources import ADAPTERS, load_source

    specs = cfg.data.sources
    hub = [i for i, s in enumerate(specs) if s.split(":", 1)[0] in ADAPTERS]
    lists = [[] if i in hub else load_source(s, shuffle=True, seed=cfg.data.seed) for i, s in enumerate(specs)]
    asked = dict.fromkeys(hub, 0)
    while True:
        queries = _in_turn(lists)
        missing = cfg.data.limit - len(_split(queries, cfg.data.heldout, len(queries))[0])  # < 0: to spare
        # a source that gave fewer than asked has nothing more; the others share what is missing
        active = [i for i in hub if len(lists[i]) >= asked[i]]
        if missing <= 0 or not active:
            return _trim_hub(queries, {id(q) for i in hub for q in lists[i]}, -missing)
        # a little over the share: duplicates across sources cost another pass over the stream
        more = -(-missing // len(active)) + max(8, missing // 50)
        for i in active:
            asked[i] += more
            lists[i] = load_source(specs[i], shuffle=True, seed=cfg.data.seed, limit=asked[i])


# ---------------------------------------------------------------------------------- commands
def model_spec(cfg: ReproduceConfig, variant: str, seed: int) -> str:
    """The ``--model`` spec that evaluates ``variant`` (paths relative to OUT)."""
    if variant not in TRAINING_DATA:  # base, pcot_prompting
        return "base" if cfg.model == "default" else f"hf:{cfg.model}"
    folder = f"train/{variant}/seed{seed}"
    if variant in BASELINE_KIND:
        return f"lora:{folder}/baseline-{BASELINE_KIND[variant]}/adapter"
    return f"pf:{folder}/joint/model"


def routing_of(variant: str) -> str | None:
    return f"random:{variant.rsplit('_', 1)[1]}" if variant.startswith("random_route_") else None


def command(cfg: ReproduceConfig, cell: Cell) -> list[str]:
    """The command line a cell runs (``personafuse ...`` or ``python -m ...``), paths relative to OUT."""
    if cell.kind == "queries":
        return ["split", *cfg.data.sources, f"limit={cfg.data.limit}", f"heldout={cfg.data.heldout}", f"seed={cfg.data.seed}"]
    if cell.kind == "data":
        return _data_command(cfg, cell.name.split("/")[1])
    if cell.kind == "relabel":
        return ["personafuse", "data", "relabel", cell.needs[0], "--out", cell.name, "--labeller", "tat"]
    if cell.kind == "train":
        cmd = ["personafuse", "train"]
        if cell.variant in BASELINE_KIND:
            cmd += ["baseline", "--kind", BASELINE_KIND[cell.variant]]
        cmd += ["--config", f"{cell.name}/reproduce_train.json", "--resume"]
        if (k := routing_of(cell.variant)) is not None:
            cmd += ["--random-route", k.split(":")[1]]
        return [*shlex.split(cfg.train_launcher), "-m", "personafuse.cli", *cmd[1:]] if cfg.train_launcher else cmd
    if cell.kind == "eval":
        return _eval_command(cfg, cell)
    if cell.kind == "replies":
        cmd = ["python", "-m", "personafuse.reproduce.replies", "--model", model_spec(cfg, cell.variant, cell.seed),
               "--queries", f"{QUERIES}/heldout.jsonl", "--out", f"{cell.name}/replies.jsonl", "--system", cell.variant,
               "--seed", str(cell.seed), "--batch-size", str(cfg.eval.batch_size), "--max-new-tokens", str(cfg.eval.reply_tokens)]
        return cmd + _variant_flags(cfg, cell.variant) + _threads(cfg)
    return ["report", json.dumps(dataclasses.asdict(cfg), sort_keys=True)]


def _data_command(cfg: ReproduceConfig, mode: str) -> list[str]:
    t = cfg.teacher
    cmd = ["personafuse", "data", "generate", "--out", f"data/{mode}", "--teacher", t.spec, "--source",
           f"file:{QUERIES}/train.jsonl", "--mode", mode, "--seed", str(cfg.data.seed), "--no-progress"]
    if t.base_url:
        cmd += ["--base-url", t.base_url]
    if t.max_new_tokens:
        cmd += ["--max-new-tokens", str(t.max_new_tokens)]
    if mode == "persona_cot" and t.constrained is not None:
        cmd.append("--constrained" if t.constrained else "--free")
    return cmd


def _eval_command(cfg: ReproduceConfig, cell: Cell) -> list[str]:
    e = cfg.eval
    cmd = ["personafuse", "eval", "--model", model_spec(cfg, cell.variant, cell.seed), "--benchmarks", ",".join(e.benchmarks),
           "--out", cell.name, "--seed", str(cell.seed), "--batch-size", str(e.batch_size), "--no-progress"]
    for flag, value in (("--limit", e.limit), ("--data", e.data), ("--judge", e.judge), ("--judge-base-url", e.judge_base_url)):
        if value is not None:
            cmd += [flag, str(value)]
    for bench, opts in sorted(e.options.items()):
        for key, value in sorted(opts.items()):
            cmd += ["-o", f"{bench}.{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return cmd + _variant_flags(cfg, cell.variant) + _threads(cfg)


def _variant_flags(cfg: ReproduceConfig, variant: str) -> list[str]:
    """How a variant is run at inference: Random Route k routes k random experts (seeded by the
    command's --seed), Persona-CoT prompting reasons before it answers."""
    if (r := routing_of(variant)) is not None:
        return ["--routing", r]
    if variant == "pcot_prompting":
        return ["--persona-cot-prompting", "--reasoning-tokens", str(cfg.eval.reasoning_tokens)]
    return []


def _threads(cfg: ReproduceConfig) -> list[str]:
    return ["--threads", str(cfg.eval.threads)] if cfg.eval.threads else []


def train_config(cfg: ReproduceConfig, cell: Cell) -> Any:
    """A train cell's ``TrainConfig``: ``train`` (or the paper's defaults) with the cell's data,
    folder, seed and base model."""
    tc = cfg.training()  # the file with --set train.FIELD=VALUE applied
    model = tc.model if cfg.model == "default" else dataclasses.replace(tc.model, base_model=cfg.model)
    return dataclasses.replace(tc, data=cell.needs[0], out=cell.name, seed=cell.seed, model=model)


def write_train_config(cfg: ReproduceConfig, cell: Cell, out: Path) -> None:
    """Written before the command, so ``--resume`` after a crash finds the same config."""
    folder = out / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    train_config(cfg, cell).save(folder / "reproduce_train.json")
    if shares_warmup(cell.variant) and len(cell.needs) > 1:  # PersonaFuse's warm-up experts
        src, dst = out / cell.needs[1] / "warmup" / "model", folder / "warmup" / "model"
        if not dst.is_dir():
            tmp = dst.with_name("model.copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            os.replace(tmp, dst)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGKILL when the grid's process dies, so a killed run leaves no cell
    running behind it (the next run would race it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Cells run inside OUT: a relative PYTHONPATH (``PYTHONPATH=src``) must keep pointing here.
    paths = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if env.get("PERSONAFUSE_BENCHDATA"):
        env["PERSONAFUSE_BENCHDATA"] = str(Path(env["PERSONAFUSE_BENCHDATA"]).resolve())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Grid:
    """One experiment directory: the plan of ``cfg`` and the state of each cell under ``out``."""

    def __init__(self, cfg: ReproduceConfig, out: Path, *, console: Any = None) -> None:
        from rich.console import Console

        self.cfg = resolved(cfg)
        self.out = Path(out).resolve()
        self.cells = plan(self.cfg)
        self.console = console or Console(stderr=True)
        self.redone: set[str] = set()
        self._inputs: dict[str, dict[str, Any]] = {}  # per cell; the config does not change during a run

    # ---- state ------------------------------------------------------------------------------
    def stored(self, cell: Cell) -> dict[str, Any] | None:
        p = self.out / cell.name / "done.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def state(self, cell: Cell) -> str:
        """``done`` | ``stale`` (done under another command, or an input was redone) | ``todo``."""
        done = self.stored(cell)
        if done is None:
            return "todo"
        redone_input = cell.name not in self.redone and any(n in self.redone for n in cell.needs)
        if {k: done.get(k) for k in ("command", "train_config")} != self.inputs(cell) or redone_input:
            return "stale"
        return "done"

    def inputs(self, cell: Cell) -> dict[str, Any]:
        """What a done cell must have run with to count as done: its command, and for training the
        config it wrote (an edited training config redoes the training)."""
        if cell.name not in self._inputs:  # state() asks for every cell before each cell runs
            tc = train_config(self.cfg, cell).to_dict() if cell.kind == "train" else None
            self._inputs[cell.name] = {"command": command(self.cfg, cell), "train_config": tc}
        return self._inputs[cell.name]

    def describe(self) -> str:
        """What ``--dry-run`` prints: every cell with its state and command, and the estimate."""
        lines = [f"experiment in {self.out}: {len(self.cells)} cells"]
        states: dict[str, str] = {}
        for c in self.cells:
            state = self.state(c)
            if state == "done" and any(states[n] != "done" for n in c.needs):
                state = "stale"  # an input will be redone first
            states[c.name] = state
            shown = "(tables, figures, router analysis, pairs)" if c.kind == "report" else shlex.join(self.inputs(c)["command"])
            lines.append(f"  [{state:5}] {c.name:34} {shown}")
        est = estimate(self.cfg)
        lines.append("estimate: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in est.items()))
        return "\n".join(lines)

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> Path:
        """Every cell not done, in order; returns the report folder."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CONFIG).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n", encoding="utf-8")
        columns = (TextColumn("[bold]reproduce[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("", total=len(self.cells))
            for cell in self.cells:
                state = self.state(cell)
                if state == "done":
                    bar.advance(task)
                    continue
                left = sum(self.state(c) != "done" for c in self.cells)
                bar.update(task, description=f"{cell.name} ({left} left)")
                if state == "stale":
                    self.console.print(f"[yellow]{cell.name}: its command or an input changed; redoing it[/yellow]")
                    shutil.rmtree(self.out / cell.name)
                seconds = self._run_cell(cell)
                self.redone.add(cell.name)
                self.console.print(f"[green]done[/green] {cell.name} in {seconds:.1f} s")
                bar.advance(task)
        return self.out / "report"

    def _run_cell(self, cell: Cell) -> float:
        folder = self.out / cell.name
        if cell.kind in FRESH and folder.exists():
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        cmd = self.inputs(cell)["command"]
        if cell.kind == "queries":
            self._log(cell, cmd)
            counts = split_queries(self.cfg, folder)
            self._log_text(f"{counts}\n")
        elif cell.kind == "report":
            from personafuse.chat_cli import quiet_loading
            from personafuse.reproduce.report import write_report

            quiet_loading()  # the router analysis loads checkpoints: no per-load bars and reports

            self._log(cell, ["report"])
            write_report(self.cfg, self.out, self.cells)
        else:
            if cell.kind == "train":
                write_train_config(self.cfg, cell, self.out)
            folder.mkdir(parents=True, exist_ok=True)
            self._spawn(cell, cmd)
        seconds = time.perf_counter() - t0
        done = {**self.inputs(cell), "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = folder / "done.json.tmp"
        tmp.write_text(json.dumps(done, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "done.json")
        return seconds

    def _log(self, cell: Cell, cmd: list[str]) -> None:
        shown = shlex.join(cmd) if cell.kind != "report" else "report"
        self._log_text(f"\n=== {cell.name} [{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {shown}\n")

    def _log_text(self, text: str) -> None:
        with (self.out / LOG).open("a", encoding="utf-8") as f:
            f.write(text)

    def _spawn(self, cell: Cell, cmd: list[str]) -> None:
        self._log(cell, cmd)
        if cmd[0] in ("personafuse", "python"):  # this interpreter, whatever is on PATH
            argv = [sys.executable, *(["-m", "personafuse.cli"] if cmd[0] == "personafuse" else []), *cmd[1:]]
        else:  # a launcher (accelerate launch ...): the one beside this interpreter if there is one
            exe = Path(sys.executable).with_name(cmd[0])
            argv = [str(exe) if exe.is_file() else cmd[0], *cmd[1:]]
        log = self.out / LOG
        start = log.stat().st_size
        with log.open("a", encoding="utf-8") as f:
            rc = subprocess.run(argv, cwd=self.out, stdout=f, stderr=subprocess.STDOUT, env=_child_env(),
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None, check=False).returncode
        if rc != 0:
            with log.open("rb") as f:
                f.seek(start)
                tail = f.read().decode("utf-8", "replace").strip().splitlines()[-15:]
            raise ReproduceError(f"cell {cell.name} failed (exit {rc}): {shlex.join(cmd)}\n" + "\n".join(tail)
                                 + f"\n(full output: {log}; rerun the same command to resume)")
