"""Running the grid: every cell that loads a model is the project's own command (``personafuse data
generate``, ``train``, ``train baseline``, ``eval``) in a child process, run in ``OUT`` with paths
relative to it, its output appended to ``OUT/reproduce.log``. A cell is done when its
``done.json`` exists and its fingerprint (reproduce/fingerprint.py: command, config, input cells'
done.json digests, version, sources, benchmark data) matches today's; otherwise it is cleared and
redone. The commands resume themselves (records, checkpoints, evaluated items), so a run killed anywhere loses
at most part of one cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from personafuse.backends import teacher_capabilities
from personafuse.fileio import atomic_write
from personafuse.reproduce.commands import command, model_spec, train_config, write_train_config
from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.parallel import SIDE_BY_SIDE, run_side_by_side, slot_env, slots
from personafuse.reproduce.plan import Cell, estimate, plan
from personafuse.reproduce.variants import variant

LOG = "reproduce.log"
CONFIG = "reproduce.json"
INPUTS = "inputs.json"  # a cell's fingerprint, written when it starts (done.json repeats it when it ends)
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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM when the grid's process dies, so a killed run leaves no cell
    running behind it (the next run would race it). SIGTERM rather than SIGKILL: a launcher
    (``torchrun``, ``accelerate launch``) handles it by ending its ranks, which SIGKILL would orphan."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
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


def _as_spec(model: str | None) -> str | None:
    """A training config's model name as a source spec (a Hub id gets ``hf:``; paths stay paths)."""
    if model is None or Path(model).expanduser().exists() or "/" not in model:
        return model
    return f"hf:{model}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Grid:
    """One experiment directory: the plan of ``cfg`` and the state of each cell under ``out``."""

    def __init__(self, cfg: ReproduceConfig, out: Path, *, console: Any = None) -> None:
        from rich.console import Console

        self.cfg = resolved(cfg)
        self.out = Path(out).resolve()
        self.cells = plan(self.cfg)
        self.console = console or Console(stderr=True)
        self._commands: dict[str, dict[str, Any]] = {}  # per cell; the config does not change during a run
        self._running: dict[str, subprocess.Popen[bytes]] = {}  # cell name -> its process (group leader)
        self._slots: list[str] | None = None  # eval.devices resolved, when the first eval cell runs
        self._device = threading.local()  # the device of the cell this thread runs (None: as configured)
        self._log_lock = threading.Lock()

    # ---- state ------------------------------------------------------------------------------
    def stored(self, cell: Cell) -> dict[str, Any] | None:
        p = self.out / cell.name / "done.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def state(self, cell: Cell) -> str:
        """``done`` | ``stale`` (done, but what it read changed: its command or config, an input
        cell's done.json, the personafuse version, a source, the benchmark data) | ``todo``.
        Recomputed from disk on every call, so a change is seen after a crash too."""
        done = self.stored(cell)
        if done is None:
            return "todo"
        return "done" if done.get("inputs") == self.inputs(cell) else "stale"

    def inputs(self, cell: Cell) -> dict[str, Any]:
        """The cell's fingerprint (reproduce/fingerprint.py): its command and training config, the
        digests of its input cells' done.json, the personafuse version, the identity of what it
        loads from outside the grid."""
        from personafuse.reproduce import fingerprint as fp

        if cell.name not in self._commands:
            tc = train_config(self.cfg, cell).to_dict() if cell.kind == "train" else None
            self._commands[cell.name] = {"command": command(self.cfg, cell), "train_config": tc}
        out: dict[str, Any] = {**self._commands[cell.name], "version": fp.package_version(),
                               "needs": {n: fp.digest(self.out / n / "done.json") for n in cell.needs}}
        if cell.kind == "queries":
            out["sources"] = [fp.source_identity(s, "dataset") for s in self.cfg.data.sources]
        elif cell.kind == "data":
            out["sources"] = [fp.source_identity(self.cfg.teacher.spec)]
        elif cell.kind == "train":
            tc = self._commands[cell.name]["train_config"]["model"]
            out["sources"] = [fp.source_identity(_as_spec(tc.get("base_model"))), fp.source_identity(_as_spec(tc.get("encoder_model")))]
        elif cell.kind in ("eval", "replies") and not variant(cell.variant).trained:
            out["sources"] = [fp.source_identity(model_spec(self.cfg, cell.variant, cell.seed))]
        if cell.kind == "eval":
            out["benchdata"] = fp.benchdata_identity(self.cfg.eval.data, self.cfg.eval.benchmarks)
        return out

    def describe(self) -> str:
        """What ``--dry-run`` prints: every cell with its state and command, and the estimate."""
        lines = [f"experiment in {self.out}: {len(self.cells)} cells",
                 "  check: first, before any work (models, benchmarks, teacher, judge, launcher, devices, disk); --no-check skips it"]
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
        with Progress(*columns, console=self.console, transient=False) as bar, self._ending_cells():
            task = bar.add_task("", total=len(self.cells))
            ran: set[str] = set()  # cells already run side by side with an earlier one
            for cell in self.cells:
                if cell.name in ran:
                    continue
                wave = self._wave(cell)
                if len(wave) > 1:  # independent eval / replies cells, one per device (eval.devices)
                    run_side_by_side(wave, self._slots, lambda c, d: self._run_step(c, bar, task, device=d))
                    ran.update(c.name for c in wave)
                else:
                    self._run_step(cell, bar, task)
        return self.out / "report"

    def _run_step(self, cell: Cell, bar: Any, task: Any, device: str | None = None) -> None:
        """``cell`` unless it is done (on ``device``: a child seeing that device alone)."""
        state = self.state(cell)
        if state == "done":
            bar.advance(task)
            return
        left = sum(self.state(c) != "done" for c in self.cells)
        bar.update(task, description=f"{cell.name} ({left} left)")
        if state == "stale":
            self.console.print(f"[yellow]{cell.name}: what it read changed (command, config, an input cell, "
                               f"the personafuse version, a source or the benchmark data); redoing it[/yellow]")
            shutil.rmtree(self.out / cell.name)
        self._device.name = device  # read by _spawn in this thread
        seconds = self._run_cell(cell)
        self.console.print(f"[green]done[/green] {cell.name} in {seconds:.1f} s" + (f" on {device}" if device else ""))
        bar.advance(task)

    def _wave(self, cell: Cell) -> list[Cell]:
        """``cell`` and the cells after it that may run beside it: eval / replies cells whose inputs
        are done (and the data cells, when an endpoint does the teacher's work), when
        ``eval.devices`` gives more than one device; else ``[cell]``."""
        kinds = (*SIDE_BY_SIDE, "data") if teacher_capabilities(self.cfg.teacher.spec).endpoint else SIDE_BY_SIDE
        if cell.kind not in kinds or self.state(cell) == "done":
            return [cell]
        if self._slots is None:
            self._slots = slots(self.cfg.eval.devices)
        if len(self._slots) < 2:
            return [cell]
        start = self.cells.index(cell)
        return [c for c in self.cells[start:] if c.kind == cell.kind or (c.kind in SIDE_BY_SIDE and cell.kind in SIDE_BY_SIDE)
                if self.state(c) != "done" and all(self.state(self._cell(n)) == "done" for n in c.needs)]

    def _cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def _run_cell(self, cell: Cell) -> float:
        folder = self.out / cell.name
        inputs = self.inputs(cell)
        if folder.exists() and (cell.kind in FRESH or _read_json(folder / INPUTS) != inputs):
            # a partial folder left by a run with other inputs (or none recorded): its records,
            # checkpoints or evaluated items belong to other inputs
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / INPUTS, inputs)  # before any work: a resumed partial folder is checked against it
        t0 = time.perf_counter()
        cmd = inputs["command"]
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
        from personafuse.reproduce.fingerprint import git_commit

        done = {"inputs": inputs, "command": cmd, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                # provenance only (never compared): the checkout and the whole resolved config
                "git_commit": git_commit(), "config": dataclasses.asdict(self.cfg)}
        _write_json(folder / "done.json", done)
        return seconds

    @contextlib.contextmanager
    def _ending_cells(self) -> Iterator[None]:
        """On SIGINT/SIGTERM the grid ends each running cell's whole process group (a launcher and
        its ranks) before it stops; a SIGKILLed grid leaves that to PR_SET_PDEATHSIG."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            self.end_running()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def end_running(self, grace: float = 10.0) -> None:
        """SIGTERM to every running cell's process group, SIGKILL to what is left after ``grace`` s."""
        procs = list(self._running.values())
        for p in procs:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            _signal_group(p.pid, signal.SIGKILL)  # the ranks a launcher may have left behind

    def _log(self, cell: Cell, cmd: list[str]) -> None:
        shown = shlex.join(cmd) if cell.kind != "report" else "report"
        self._log_text(f"\n=== {cell.name} [{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {shown}\n")

    def _log_text(self, text: str) -> None:
        with (self.out / LOG).open("a", encoding="utf-8") as f:
            f.write(text)

    def _spawn(self, cell: Cell, cmd: list[str]) -> None:
        if (device := getattr(self._device, "name", None)) is not None:
            return self._spawn_on(cell, cmd, device)
        self._log(cell, cmd)
        if cmd[0] in ("personafuse", "python"):  # this interpreter, whatever is on PATH
            argv = [sys.executable, *(["-m", "personafuse.cli"] if cmd[0] == "personafuse" else []), *cmd[1:]]
        else:  # a launcher (accelerate launch ...): the one beside this interpreter if there is one
            exe = Path(sys.executable).with_name(cmd[0])
            argv = [str(exe) if exe.is_file() else cmd[0], *cmd[1:]]
        log = self.out / LOG
        start = log.stat().st_size
        with log.open("a", encoding="utf-8") as f:
            # its own session (and process group): the grid ends the whole group, a Ctrl-C in the
            # terminal reaches the grid only, and a kill of the grid's group leaves it to PDEATHSIG
            proc = subprocess.Popen(argv, cwd=self.out, stdout=f, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            self._running[cell.name] = proc
            try:
                rc = proc.wait()
            finally:
                self._running.pop(cell.name, None)
        if rc != 0:
            with log.open("rb") as f:
                f.seek(start)
                tail = f.read().decode("utf-8", "replace").strip().splitlines()[-15:]
            raise ReproduceError(f"cell {cell.name} failed (exit {rc}): {shlex.join(cmd)}\n" + "\n".join(tail)
                                 + f"\n(full output: {log}; rerun the same command to resume)")

    def _spawn_on(self, cell: Cell, cmd: list[str], device: str) -> None:
        """A cell beside others: its output in ``OUT/<cell>/cell.log`` (copied into reproduce.log
        whole when it ends, so parallel cells do not interleave), its device and wall clock in
        ``OUT/<cell>/device.json``."""
        folder = self.out / cell.name
        argv = [sys.executable, *(["-m", "personafuse.cli"] if cmd[0] == "personafuse" else []), *cmd[1:]]
        started = time.time()
        with (folder / "cell.log").open("w", encoding="utf-8") as f:
            proc = subprocess.Popen(argv, cwd=self.out, stdout=f, stderr=subprocess.STDOUT, env={**_child_env(), **slot_env(device)},
                                    start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            self._running[cell.name] = proc
            try:
                rc = proc.wait()
            finally:
                self._running.pop(cell.name, None)
        text = (folder / "cell.log").read_text(encoding="utf-8", errors="replace")
        with self._log_lock:
            self._log(cell, cmd)
            self._log_text(f"(on {device}, {time.time() - started:.1f} s)\n{text}")
        _write_json(folder / "device.json", {"device": device, **slot_env(device), "started": started, "ended": time.time()})
        if rc != 0:
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise ReproduceError(f"cell {cell.name} failed (exit {rc}) on {device}: {shlex.join(cmd)}\n{tail}"
                                 f"\n(full output: {folder / 'cell.log'}; rerun the same command to resume)")
