"""The command line of each cell of the grid (the project's own commands, paths relative to the
experiment folder) and a train cell's config, built from the variant's row (reproduce/variants.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from personafuse.backends import teacher_capabilities
from personafuse.reproduce.config import ReproduceConfig
from personafuse.reproduce.plan import QUERIES, Cell
from personafuse.reproduce.variants import variant


def model_spec(cfg: ReproduceConfig, name: str, seed: int) -> str:
    """The ``--model`` spec that evaluates variant ``name`` (paths relative to OUT)."""
    return variant(name).model_spec("base" if cfg.model == "default" else f"hf:{cfg.model}", seed)


def command(cfg: ReproduceConfig, cell: Cell) -> list[str]:
    """The command line a cell runs (``personafuse ...`` or ``python -m ...``), paths relative to OUT."""
    if cell.kind == "queries":
        return ["split", *cfg.data.sources, f"limit={cfg.data.limit}", f"heldout={cfg.data.heldout}", f"seed={cfg.data.seed}"]
    if cell.kind == "data":
        return _data_command(cfg, cell.name.split("/")[1])
    if cell.kind == "relabel":
        return ["personafuse", "data", "relabel", cell.needs[0], "--out", cell.name, "--labeller", "tat"]
    if cell.kind == "train":
        row = variant(cell.variant)
        cmd = ["personafuse", "train", *row.train_args(), "--config", f"{cell.name}/reproduce_train.json", "--resume", *row.train_flags()]
        return [*shlex.split(cfg.train_launcher), "-m", "personafuse.cli", *cmd[1:]] if cfg.train_launcher else cmd
    if cell.kind == "eval":
        return _eval_command(cfg, cell)
    if cell.kind == "replies":
        cmd = ["python", "-m", "personafuse.reproduce.replies", "--model", model_spec(cfg, cell.variant, cell.seed),
               "--queries", f"{QUERIES}/heldout.jsonl", "--out", f"{cell.name}/replies.jsonl", "--system", cell.variant,
               "--seed", str(cell.seed), "--batch-size", str(cfg.eval.batch_size), "--max-new-tokens", str(cfg.eval.reply_tokens)]
        return cmd + variant(cell.variant).inference_flags(cfg.eval.reasoning_tokens) + _threads(cfg) + _placement(cfg)
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
    if teacher_capabilities(t.spec).placement:  # a local teacher loads its model in the cell
        cmd += _placement(cfg)
    return cmd


def _eval_command(cfg: ReproduceConfig, cell: Cell) -> list[str]:
    e = cfg.eval
    cmd = ["personafuse", "eval", "--model", model_spec(cfg, cell.variant, cell.seed), "--benchmarks", ",".join(e.benchmarks),
           "--out", cell.name, "--seed", str(cell.seed), "--item-seed", str(e.item_seed), "--batch-size", str(e.batch_size), "--no-progress"]
    for flag, value in (("--limit", e.limit), ("--data", e.data), ("--judge", e.judge), ("--judge-base-url", e.judge_base_url)):
        if value is not None:
            cmd += [flag, str(value)]
    for bench, opts in sorted(e.options.items()):
        for key, value in sorted(opts.items()):
            cmd += ["-o", f"{bench}.{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return cmd + variant(cell.variant).inference_flags(cfg.eval.reasoning_tokens) + _threads(cfg) + _placement(cfg)


def _placement(cfg: ReproduceConfig) -> list[str]:
    """``--device`` / ``--dtype`` of every cell that loads a model (eval, replies, data with a local
    teacher), from ``eval.device`` / ``eval.dtype``; left out at ``auto``, the commands' default, so
    a run made before these fields existed keeps its done cells."""
    out: list[str] = []
    for flag, value in (("--device", cfg.eval.device), ("--dtype", cfg.eval.dtype)):
        if value != "auto":
            out += [flag, value]
    return out


def _threads(cfg: ReproduceConfig) -> list[str]:
    return ["--threads", str(cfg.eval.threads)] if cfg.eval.threads else []


def train_config(cfg: ReproduceConfig, cell: Cell) -> Any:
    """A train cell's ``TrainConfig``: ``train`` (or the paper's defaults) with the cell's data (its
    ``records.jsonl``: the queries every data mode accepted, see reproduce/fairness.py), folder, seed
    and base model. ``model.seed`` (the experts' and router's initialisation) follows the cell's
    seed like the SFT baselines' does, so seeds differ for PersonaFuse and Random Route too."""
    from personafuse.reproduce.fairness import RECORDS_FILE

    tc = cfg.training()  # the file with --set train.FIELD=VALUE applied
    model = tc.model if cfg.model == "default" else dataclasses.replace(tc.model, base_model=cfg.model)
    model = dataclasses.replace(model, seed=cell.seed)
    return dataclasses.replace(tc, data=f"{cell.name}/{RECORDS_FILE}", out=cell.name, seed=cell.seed, model=model)


def write_train_config(cfg: ReproduceConfig, cell: Cell, out: Path) -> None:
    """Written before the command, so ``--resume`` after a crash finds the same config: the
    training records (the source's records of the queries every data mode accepted) and, for the
    variants that share PersonaFuse's warm-up, its experts when the warm-up would be the same
    (the TAT variant's labels differ from the teacher's: it then warms up its own experts)."""
    from personafuse.reproduce.fairness import IDS_FILE, common_ids, same_labels, write_training_records

    folder = out / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    source = cell.needs[0]
    ids = common_ids(out, [n for n in cell.needs if n.startswith("data/")])
    write_training_records(out, source, ids, folder)
    train_config(cfg, cell).save(folder / "reproduce_train.json")
    warm = next((n for n in cell.needs if n.startswith("train/")), None)
    shared = warm is not None and variant(cell.variant).shares_warmup
    if shared:
        pf_source = json.loads((out / str(warm) / IDS_FILE).read_text(encoding="utf-8"))["source"]
        shared = pf_source == source or same_labels(out, source, pf_source, ids)
    if shared:  # PersonaFuse's warm-up experts
        src, dst = out / str(warm) / "warmup" / "model", folder / "warmup" / "model"
        if not dst.is_dir():
            tmp = dst.with_name("model.copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            os.replace(tmp, dst)
