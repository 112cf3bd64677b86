"""The loop every stage runs (a torchtune recipe's ``train``): set up, resume, step / clip / log /
checkpoint, hand back.

:func:`train_loop` takes a stage's objective (what it trains: :mod:`.objectives`), its plan (which
rows each step holds: :mod:`.plans`) and its ``step_fn`` (one step's forward and backward, through
:func:`.batching.micro_batches`), and owns everything around them: the accelerator and
float32 master weights (:class:`_StageRun`), the optimiser and schedule, gradient clipping (global,
or per expert: :func:`clip_per_expert`), ``losses.jsonl`` / TensorBoard / progress bar, ``loss.png``
and the checkpoints that ``--resume`` reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from personafuse.fileio import atomic_write, read_jsonl
from personafuse.moe.mixture import MixtureLinear
from personafuse.training import engine
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.plans import Row


@dataclass
class StageResult:
    stage: str
    out_dir: Path
    steps_done: int
    losses: list[dict[str, float]]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    ckpts = sorted(
        stage_dir.glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
    )
    ckpts = [c for c in ckpts if (c / "state.pt").is_file()]
    return ckpts[-1] if ckpts else None


def clip_per_expert(layers, max_norm: float, num_experts: int, r: int) -> None:
    """Clip each expert's gradient on its own, so that the batched warm-up equals ten separate runs
    (a global norm would couple the experts). Two kernels per tensor: its per-expert norms, then
    its per-expert scale (a step runs this over hundreds of small tensors)."""
    grads = [
        (g, dim)
        for layer in layers
        for g, dim in ((layer.lora_A.grad, 0), (layer.lora_B.grad, 1))  # dim: the experts' rank axis
        if g is not None
    ]
    if not grads:
        return
    if _is_dtensor(grads[0][0]):
        return _clip_per_expert_sharded(grads, max_norm, num_experts, r)
    views = [  # (gradient as [experts, ...] or [..., experts, r], the dims that belong to one expert)
        (g.view(num_experts, r, -1), (1, 2)) if dim == 0 else (g.view(-1, num_experts, r), (0, 2))
        for g, dim in grads
    ]
    norms = torch.stack([torch.linalg.vector_norm(g, dim=dims, dtype=torch.float32) for g, dims in views])
    scale = (max_norm / (norms.square().sum(0).sqrt() + 1e-6)).clamp(max=1.0)
    for g, dims in views:
        shape = [1, 1, 1]
        shape[1 if dims == (0, 2) else 0] = num_experts
        g.mul_(scale.view(shape).to(g.dtype))


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _clip_per_expert_sharded(grads, max_norm: float, num_experts: int, r: int) -> None:
    """The same under FSDP: each process holds a block of rows of every gradient (lora_A's rows are
    the experts' rank axis, lora_B's the output features); per-expert sums of squares are added up
    locally, summed over processes, and each local block is scaled in place."""
    import torch.distributed as dist

    sq = torch.zeros(num_experts, dtype=torch.float32, device=grads[0][0].to_local().device)
    blocks = []
    for g, dim in grads:
        local = g.to_local()
        offset = 0
        for mesh_dim, placement in enumerate(g.placements):
            if placement.is_shard(dim):  # torch.chunk layout: equal blocks, the last ones short
                size, n = g.shape[dim], g.device_mesh.size(mesh_dim)
                offset += min(g.device_mesh.get_local_rank(mesh_dim) * -(-size // n), size)
        experts = (torch.arange(local.shape[dim], device=local.device) + offset) // r
        other = tuple(d for d in range(local.dim()) if d != dim)
        sq.index_add_(0, experts, local.float().square().sum(other))
        blocks.append((local, dim, experts))
    dist.all_reduce(sq, group=grads[0][0].device_mesh.get_group())
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for local, dim, experts in blocks:
        shape = [1] * local.dim()
        shape[dim] = -1
        local.mul_(scale[experts].view(shape).to(local.dtype))


ENCODER_BACKBONE = "router.encoder.backbone."  # the pretrained part of the router (StageConfig.encoder_lr)


class _StageRun:
    """One stage's training state, set up as a torchtune recipe sets up: accelerator, float32
    master copies of half-precision trainables, the (possibly sharded) model, optimiser, schedule."""

    def __init__(self, name: str, sc: StageConfig, tc: TrainConfig, objective: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
        from transformers import get_scheduler

        if not trainable:
            raise ValueError(f"stage {name}: nothing to train")
        self.name, self.sc, self.objective, self.trainable = name, sc, objective, trainable
        self.acc = acc = engine.make_accelerator(tc.mixed_precision)
        self.main = acc.is_main_process  # files are written by one process; every process reads them
        if self.main:  # where the stage computes (benchmarks/gpu_e2e.sh reads it from the grid's log)
            tqdm.write(f"{name}: {engine.describe(acc)}")
        for p in objective.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        # Trainable tensors of a half-precision model train as float32 master weights (a bf16 weight
        # cannot take an update 1e-4 of its size: the joint stage's lr of 1e-5 would mostly vanish).
        # Compute stays in the model's dtype through autocast; the dtypes are restored at the end.
        self.original_dtypes = {k: p.dtype for k, p in trainable.items()}
        half = next((d for d in self.original_dtypes.values() if d in (torch.float16, torch.bfloat16)), None)
        for p in trainable.values():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        _drop_inference_packs(objective)  # new storage: packs must not alias the old one
        model, live, paths = objective, trainable, None  # what trains: the objective, or its sharded copy
        if engine.is_fsdp(acc):
            model, paths = engine.shard_copy(objective, trainable)
            live = engine.params_by_path(model, paths)
        self.autocast = (
            torch.autocast(acc.device.type, dtype=half) if half is not None and acc.mixed_precision == "no" else contextlib.nullcontext()
        )
        optimizer = _optimizer(name, sc, live)
        scheduler = get_scheduler(
            sc.scheduler, optimizer, num_warmup_steps=math.ceil(sc.warmup_ratio * sc.steps), num_training_steps=sc.steps
        )
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        # fully_shard replaced the parameters with sharded ones: find them again
        self.live = engine.params_by_path(self.model, paths) if paths is not None else live

    def resume_from(self, out_dir: Path, resume: bool) -> int:
        """The step to start from: the latest checkpoint's (its log lines past it dropped), else 0."""
        log_path = out_dir / "losses.jsonl"
        ckpt = latest_checkpoint(out_dir) if resume else None
        start = 0
        if ckpt is not None:
            state = torch.load(ckpt / "state.pt", weights_only=False, map_location="cpu")
            engine.load_checkpoint_state(self.acc, self.model, self.live, self.optimizer, self.scheduler, state, str(ckpt / "state.pt"))
            start = state["step"]
            if self.main and log_path.exists():
                kept = [e for e in _read_log(log_path) if e["step"] <= start]
                atomic_write(log_path, "".join(json.dumps(e) + "\n" for e in kept))
        elif self.main and log_path.exists():
            log_path.unlink()
        self.acc.wait_for_everyone()
        return start

    def step(self, step: int, plan: Callable[[int], list[Row]], step_fn: Callable[..., dict[str, float]], clip_fn: Any) -> dict[str, float]:
        with self.autocast:
            stats = step_fn(self.acc, self.model, plan(step), step)
        if self.sc.max_grad_norm:
            if clip_fn is not None:
                clip_fn(self.model, self.sc.max_grad_norm)
            else:
                self.acc.clip_grad_norm_(list(self.live.values()), self.sc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def checkpoint(self, out_dir: Path, done: int) -> None:
        state = engine.checkpoint_state(self.acc, self.model, self.live, self.optimizer, self.scheduler, done)  # every process
        if self.main:
            _save_checkpoint(out_dir, state)

    def finish(self) -> None:
        """Hand the trained values back to ``trainable`` in their original dtypes."""
        if self.live is not self.trainable:
            engine.hand_back(self.model, self.live, self.trainable)
            self.acc.free_memory()  # the sharded copy, its optimiser state and gradients
        _restore_dtypes(self.trainable, self.original_dtypes)
        _drop_inference_packs(self.objective)


def _optimizer(name: str, sc: StageConfig, live: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [{"params": list(live.values())}]
    if sc.encoder_lr is not None:
        enc = [p for n, p in live.items() if n.startswith(ENCODER_BACKBONE)]
        rest = [p for n, p in live.items() if not n.startswith(ENCODER_BACKBONE)]
        groups = [g for g in ({"params": rest}, {"params": enc, "lr": sc.encoder_lr}) if g["params"]]
    if sc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=sc.lr, weight_decay=sc.weight_decay)
    if sc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=sc.lr, weight_decay=sc.weight_decay)
    raise ValueError(f"stage {name}: unknown optimizer {sc.optimizer!r}; expected adamw or sgd")


class _StageLog:
    """losses.jsonl (one line per step, flushed), TensorBoard scalars and the progress bar."""

    def __init__(self, name: str, out_dir: Path, steps: int, start: int, main: bool) -> None:
        self.name, self.main = name, main
        self.writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
            except ImportError:  # tensorboard is optional
                self.writer = None
        self.bar = tqdm(total=steps, initial=start, desc=name, disable=not main, dynamic_ncols=True)
        self.file = (out_dir / "losses.jsonl").open("a") if main else None

    def __enter__(self) -> _StageLog:
        return self

    def write(self, step: int, lr: float, stats: dict[str, float], dt: float) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "lr": lr, "seconds": dt, **stats}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"{self.name}/{k}", v, step)
        postfix = {k: f"{v:.4f}" for k, v in stats.items() if k.startswith("loss")}
        if "tokens" in stats:
            postfix["tok/s"] = f"{stats['tokens'] / dt:.0f}"
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def train_loop(
    name: str,
    sc: StageConfig,
    tc: TrainConfig,
    objective: nn.Module,
    step_fn: Callable[..., dict[str, float]],
    plan: Callable[[int], list[Row]],
    out_dir: Path,
    *,
    resume: bool = False,
    clip_fn: Callable[[nn.Module, float], None] | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """Run ``sc.steps`` optimiser steps of one stage, with checkpoints and logs under ``out_dir``:
    set up, resume, loop (step, log, checkpoint), hand back.

    ``objective.trainable()`` (name -> parameter of ``objective``: what the stage trains) ends the
    stage holding the trained values, whole and in their original dtypes, whatever the engine (see
    :mod:`personafuse.training.engine`)."""
    run = _StageRun(name, sc, tc, objective, objective.trainable())  # refuses a bad engine before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if run.main:
        tc.save(out_dir / "train_config.json")
    start = done = run.resume_from(out_dir, resume)
    if start < sc.steps:
        run.model.train()
        with _StageLog(name, out_dir, sc.steps, start, run.main) as log:
            for step in range(start, sc.steps):
                t0 = time.perf_counter()
                stats = run.step(step, plan, step_fn, clip_fn)
                done = step + 1
                log.write(done, run.scheduler.get_last_lr()[0], stats, time.perf_counter() - t0)
                if done % tc.save_every == 0 or done == sc.steps or done == stop_after:
                    run.checkpoint(out_dir, done)
                if stop_after is not None and done >= stop_after:
                    break
    run.finish()
    run.acc.wait_for_everyone()
    losses = _read_log(out_dir / "losses.jsonl")
    if run.main and done > start:
        plot_losses(losses, out_dir / "loss.png", title=name)
    return StageResult(name, out_dir, done, losses)


def mixture_layers(module: nn.Module) -> list[MixtureLinear]:
    return [m for m in module.modules() if isinstance(m, MixtureLinear)]


def _drop_inference_packs(module: nn.Module) -> None:
    states = {id(m.state): m.state for m in module.modules() if isinstance(m, MixtureLinear)}
    for state in states.values():
        state.invalidate_packs()


def _restore_dtypes(trainable: dict[str, nn.Parameter], dtypes: dict[str, torch.dtype]) -> None:
    for k, p in trainable.items():
        if p.dtype != dtypes[k]:
            p.data = p.data.to(dtypes[k])


def _save_checkpoint(out_dir: Path, state: dict[str, Any], keep: int = 2) -> None:
    step = state["step"]
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic: a crash leaves either the old or the new checkpoint
    for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _read_log(path: Path) -> list[dict[str, float]]:
    """The stage's log lines (:func:`personafuse.fileio.read_jsonl`: a torn last line, a crash
    mid-write, is dropped, as the evaluation runner and the data store drop theirs)."""
    if not path.exists():
        return []
    return [entry for _, entry in read_jsonl(path, hint="; delete the line to go on")]


def plot_losses(losses: list[dict[str, float]], path: Path, title: str = "") -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in losses[0] if k.startswith("loss")]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [e["step"] for e in losses]
    for k in keys:
        ax.plot(steps, [e.get(k, float("nan")) for e in losses], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
