"""The three training stages (paper §4.3) and the single-LoRA baselines, on one accelerate loop.

    stage 1  warmup  experts learn L_lm on their own records; all ten in one batched job
    stage 2  router  experts frozen; encoder + projection + expert embeddings learn L_router
    stage 3  joint   mixture live; experts + router learn L_lm + gamma * L_router
    sft      baseline: one peft LoRA, plain SFT (Direct / Human-Like / Persona-CoT finetuned)

Every step's batch is a pure function of (seed, step), so ``--resume`` continues exactly where a
run stopped: the checkpoint holds the trainable tensors, optimiser, scheduler and RNG states.
Each step's loss is normalised by token counts of the whole step, so splitting a step into
micro-batches (or processes) changes nothing but rounding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from personafuse.fileio import atomic_write, read_jsonl
from personafuse.moe.mixture import MixtureLinear
from personafuse.moe.model import PersonaFuseModel
from personafuse.moe.router import router_inputs
from personafuse.moe.routing import Routing
from personafuse.training import engine
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.losses import causal_lm_loss_sums, router_loss
from personafuse.training.records import Record, encode_record
from personafuse.traits import NUM_POLES

Row = tuple[int, int]  # (record index, expert index or -1)


# --------------------------------------------------------------------------- batch plans
class ShuffledStream:
    """An endless stream over ``indices``, reshuffled every epoch; position -> item is pure."""

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        self.indices = list(indices)
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def take(self, start: int, count: int) -> list[int]:
        n = len(self.indices)
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, n)
            perm = self._perms.get(epoch)
            if perm is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g).tolist()
                self._perms = {epoch: perm}  # epochs are visited in order; keep one
            out.append(self.indices[perm[i]])
        return out


def warmup_plan(
    records: Sequence[Record], rows_per_expert: int, seed: int, experts: Sequence[int] | None = None
) -> Callable[[int], list[Row]]:
    """Stage 1: each step takes ``rows_per_expert`` records of every expert i from its own stream
    over ``{r | p_i = 1}``: the same rows expert i would see in a run of its own."""
    experts = list(range(NUM_POLES)) if experts is None else list(experts)
    streams = {}
    for i in experts:
        idx = [k for k, r in enumerate(records) if r.p and r.p[i]]
        if idx:
            streams[i] = ShuffledStream(idx, seed + 7919 * (i + 1))

    def plan(step: int) -> list[Row]:
        return [(k, i) for i, s in streams.items() for k in s.take(step * rows_per_expert, rows_per_expert)]

    return plan


def same_p_plan(
    records: Sequence[Record], batch: int, steps: int, seed: int, min_group: int = 2
) -> Callable[[int], list[Row]]:
    """Stage 2: every batch holds queries that share one activation vector (for L_trait). Groups are
    drawn in proportion to their size; vectors with fewer than ``min_group`` records are pooled into
    one mixed group, where L_trait only counts pairs that do share a vector."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, r in enumerate(records):
        groups.setdefault(r.p or (), []).append(k)
    pooled = [k for g in groups.values() if len(g) < min_group for k in g]
    members = [g for g in groups.values() if len(g) >= min_group] + ([pooled] if pooled else [])
    streams = [ShuffledStream(g, seed + 104729 * j) for j, g in enumerate(members)]
    sizes = np.array([len(g) for g in members], dtype=float)
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(members), size=steps, p=sizes / sizes.sum()).tolist()
    offsets, seen = [], [0] * len(members)
    for c in choices:  # how far into its group's stream each step starts
        size = min(batch, len(members[c]))
        offsets.append((c, seen[c], size))
        seen[c] += size

    def plan(step: int) -> list[Row]:
        c, start, size = offsets[step]
        return [(k, -1) for k in streams[c].take(start, size)]

    return plan


def uniform_plan(records: Sequence[Record], batch: int, seed: int) -> Callable[[int], list[Row]]:
    stream = ShuffledStream(range(len(records)), seed)
    return lambda step: [(k, -1) for k in stream.take(step * batch, batch)]


# --------------------------------------------------------------------------- objectives
# nn.Modules so that DDP / FSDP (through accelerate) see every parameter used in forward.
class WarmupObjective(nn.Module):
    def __init__(self, pf: PersonaFuseModel) -> None:
        super().__init__()
        self.pf = pf

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.pf.expert_parameters()

    def forward(self, input_ids, attention_mask, labels, experts):
        # set_experts(), not use(): the experts must stay in place for activation-checkpointing
        # recompute during backward. One expert per row: only its rank-r adapter runs.
        self.pf.state.set_experts(experts)
        return causal_lm_loss_sums(self.pf.base_model, input_ids, attention_mask, labels)


class RouterObjective(nn.Module):
    def __init__(self, pf: PersonaFuseModel, beta: float, margin: float) -> None:
        super().__init__()
        self.pf, self.beta, self.margin = pf, beta, margin

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.pf.router_parameters()

    def forward(self, enc_ids, enc_mask, p):
        h = self.pf.router.encoder(enc_ids, enc_mask)
        return router_loss(h, self.pf.router.expert_embeddings, p, self.beta, self.margin)


class JointObjective(nn.Module):
    def __init__(self, pf: PersonaFuseModel, beta: float, margin: float) -> None:
        super().__init__()
        self.pf, self.beta, self.margin = pf, beta, margin

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**self.pf.expert_parameters(), **self.pf.router_parameters()}

    def forward(self, input_ids, attention_mask, labels, enc_ids, enc_mask, p):
        w, h = self.pf.router(enc_ids, enc_mask)
        # The LM loss reaches the router through w (tests/test_safety_net.py); kept set for
        # activation-checkpointing recompute (see WarmupObjective).
        self.pf.state.set(w)
        sums, counts = causal_lm_loss_sums(self.pf.base_model, input_ids, attention_mask, labels)
        lr_, parts = router_loss(h, self.pf.router.expert_embeddings, p, self.beta, self.margin)
        return sums, counts, lr_, parts


class RandomRouteObjective(nn.Module):
    """The joint stage of the Random Route k baseline: the LM loss under k experts drawn at random
    per sequence (weights from :func:`random_route_weights`) in place of the router's; only the
    experts train."""

    def __init__(self, pf: PersonaFuseModel) -> None:
        super().__init__()
        self.pf = pf

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.pf.expert_parameters()

    def forward(self, input_ids, attention_mask, labels, weights):
        self.pf.state.set(weights)  # kept set for activation-checkpointing recompute
        return causal_lm_loss_sums(self.pf.base_model, input_ids, attention_mask, labels)


def random_route_weights(k: int, seed: int, step: int, rows: Sequence[int]) -> torch.Tensor:
    """[len(rows), 10]: k distinct experts at 1/k for each record of this step, drawn as inference's
    ``Routing("random", k, seed)`` draws them, keyed by (step, record): the same however the step
    is split into micro-batches or processes, and after a resume."""
    return Routing("random", k=k, seed=seed).resolve(len(rows), keys=[f"step{step}:record{r}" for r in rows])


class SFTObjective(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def trainable(self) -> dict[str, nn.Parameter]:
        # peft marks its adapter trainable and freezes the rest (get_peft_model)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def forward(self, input_ids, attention_mask, labels):
        return causal_lm_loss_sums(self.model, input_ids, attention_mask, labels)


# --------------------------------------------------------------------------- the loop
@dataclass
class StageResult:
    stage: str
    out_dir: Path
    steps_done: int
    losses: list[dict[str, float]]


class Featurizer:
    """Tokenises records once (LM side and router side) and pads micro-batches."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        encoder_tokenizer: Any,
        max_length: int,
        encoder_max_length: int,
    ) -> None:
        self.records, self.tok, self.enc_tok = records, tokenizer, encoder_tokenizer
        self.max_length, self.encoder_max_length = max_length, encoder_max_length
        self._lm: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def for_model(cls, records: Sequence[Record], pf: PersonaFuseModel, tc: TrainConfig) -> Featurizer:
        return cls(records, pf.tokenizer, pf.encoder_tokenizer, tc.max_length, pf.config.encoder_max_length)

    def lm(self, k: int) -> tuple[list[int], list[int]]:
        if k not in self._lm:
            r = self.records[k]
            self._lm[k] = encode_record(self.tok, r.query, r.response, self.max_length)
        return self._lm[k]

    def lm_batch(self, ks: Sequence[int], device) -> dict[str, torch.Tensor]:
        pairs = [self.lm(k) for k in ks]
        width = max(len(ids) for ids, _ in pairs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(ks), width), pad, dtype=torch.long)
        labels = torch.full((len(ks), width), -100, dtype=torch.long)
        mask = torch.zeros((len(ks), width), dtype=torch.long)
        for row, (i, lab) in enumerate(pairs):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def response_tokens(self, k: int) -> int:
        return sum(1 for x in self.lm(k)[1][1:] if x != -100)

    def enc_batch(self, ks: Sequence[int], device) -> dict[str, torch.Tensor]:
        # The router's own input format (router_inputs), as PersonaFuseModel.route reads queries.
        enc = router_inputs(self.enc_tok, [self.records[k].query for k in ks], self.encoder_max_length)
        return {"enc_ids": enc["input_ids"].to(device), "enc_mask": enc["attention_mask"].to(device)}

    def p_batch(self, ks: Sequence[int], device) -> torch.Tensor:
        return torch.tensor(
            [list(self.records[k].p or (0,) * NUM_POLES) for k in ks], dtype=torch.float32, device=device
        )


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
            engine.hand_back(self.live, self.trainable)
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


def _mixture_layers(module: nn.Module) -> list[MixtureLinear]:
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


def _chunks(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), max(size, 1))]


def _by_length(feats: Featurizer, rows: list[Row]) -> list[Row]:
    """Rows sorted by token length, so micro-batches pad little. Only for losses that are sums of
    per-row terms (warm-up, SFT): there the grouping changes nothing but rounding."""
    return sorted(rows, key=lambda row: len(feats.lm(row[0])[0]))


def _sync_last(acc, objective: nn.Module, chunk: int, n_chunks: int):
    """Skip DDP's gradient all-reduce on every micro-batch but a step's last."""
    return acc.no_sync(objective) if chunk < n_chunks - 1 else contextlib.nullcontext()


def _shard(acc, rows: list[Row]) -> list[Row]:
    return rows[acc.process_index :: acc.num_processes]


def micro_batches(
    acc, objective: nn.Module, rows: list[Row], size: int, order: Callable[[list[Row]], list[Row]] | None = None
) -> Iterator[tuple[list[Row], float]]:
    """The one micro-batch / accumulation pattern of every stage: this process's share of a step's
    rows (``order`` may sort it), in chunks of ``size``, each with its fraction of that share; the
    caller's forward and backward run inside DDP's ``no_sync`` for every chunk but the last, so
    gradients are all-reduced once per step."""
    mine = _shard(acc, rows)
    if order is not None:
        mine = order(mine)
    chunks = _chunks(mine, size)
    for c, chunk in enumerate(chunks):
        with _sync_last(acc, objective, c, len(chunks)):
            yield chunk, len(chunk) / max(len(mine), 1)


def _add_router_parts(totals: dict[str, float], parts: dict[str, float], frac: float) -> None:
    """Add one micro-batch's router-loss parts (losses.router_loss), weighted by its share of the
    step, to the step's ``loss_router`` / ``loss_contrastive`` / ``loss_trait``."""
    for k in ("router", "contrastive", "trait"):
        totals[f"loss_{k}"] = totals.get(f"loss_{k}", 0.0) + parts[k] * frac


# --------------------------------------------------------------------------- stages
def _stage_dir(tc: TrainConfig, name: str) -> Path:
    return Path(tc.out) / name


def run_warmup(
    pf: PersonaFuseModel,
    records: Sequence[Record],
    tc: TrainConfig,
    *,
    resume: bool = False,
    experts: Sequence[int] | None = None,
    stop_after: int | None = None,
    out_dir: Path | None = None,
) -> StageResult:
    sc = tc.warmup
    feats = Featurizer.for_model(records, pf, tc)
    plan = warmup_plan(records, sc.batch_size * sc.grad_accum, tc.seed, experts)
    objective = WarmupObjective(pf)
    E, r = pf.config.num_experts, pf.config.r

    def step_fn(acc, model, rows, step):
        # Loss = sum over experts of (token-mean LM loss over that expert's rows of this step).
        norms = [0] * E
        for k, i in rows:
            norms[i] += feats.response_tokens(k)
        total = torch.zeros((), device=acc.device)
        for chunk, _ in micro_batches(acc, model, rows, sc.micro_batch_size, functools.partial(_by_length, feats)):
            b = feats.lm_batch([k for k, _ in chunk], acc.device)
            experts = torch.tensor([i for _, i in chunk], device=acc.device)
            denom = torch.tensor([norms[i] for _, i in chunk], dtype=torch.float32, device=acc.device)
            sums, _ = model(b["input_ids"], b["attention_mask"], b["labels"], experts)
            loss = (sums / denom.clamp(min=1)).sum() * acc.num_processes
            acc.backward(loss)
            total += loss.detach() / acc.num_processes
        total = acc.reduce(total, reduction="sum")
        active = sum(1 for n in norms if n)
        return {"loss_lm": float(total) / max(active, 1), "experts": float(active), "tokens": float(sum(norms))}

    return train_loop(
        "warmup",
        sc,
        tc,
        objective,
        step_fn,
        plan,
        out_dir or _stage_dir(tc, "warmup"),
        resume=resume,
        clip_fn=lambda model, m: clip_per_expert(_mixture_layers(model), m, E, r),
        stop_after=stop_after,
    )


def run_router(
    pf: PersonaFuseModel,
    records: Sequence[Record],
    tc: TrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> StageResult:
    sc = tc.router
    feats = Featurizer.for_model(records, pf, tc)
    plan = same_p_plan(records, sc.batch_size * sc.grad_accum, sc.steps, tc.seed)
    objective = RouterObjective(pf, tc.beta, tc.margin)

    def step_fn(acc, model, rows, step):
        totals: dict[str, float] = {}
        for chunk, frac in micro_batches(acc, model, rows, sc.micro_batch_size):
            ks = [k for k, _ in chunk]
            enc = feats.enc_batch(ks, acc.device)
            loss, parts = model(enc["enc_ids"], enc["enc_mask"], feats.p_batch(ks, acc.device))
            acc.backward(loss * frac)
            _add_router_parts(totals, parts, frac)
        return {**totals, "batch": float(len(rows))}

    return train_loop(
        "router",
        sc,
        tc,
        objective,
        step_fn,
        plan,
        _stage_dir(tc, "router"),
        resume=resume,
        stop_after=stop_after,
    )


def run_joint(
    pf: PersonaFuseModel,
    records: Sequence[Record],
    tc: TrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> StageResult:
    """Stage 3: experts and router learn ``L_lm + gamma * L_router`` with the router's weights live.
    With ``tc.random_route`` = k (the Random Route k baseline) the same data, batches and schedule run
    under k random experts per sequence instead of the router, and only the experts learn, from
    ``L_lm`` alone."""
    sc = tc.joint
    feats = Featurizer.for_model(records, pf, tc)
    plan = uniform_plan(records, sc.batch_size * sc.grad_accum, tc.seed)
    random_k = tc.random_route
    objective = RandomRouteObjective(pf) if random_k else JointObjective(pf, tc.beta, tc.margin)

    def chunk_losses(acc, model, ks, frac, step, totals):
        """One micro-batch's LM loss sums, and its router loss (None for Random Route)."""
        b = feats.lm_batch(ks, acc.device)
        if random_k:
            w = random_route_weights(random_k, tc.seed, step, ks).to(acc.device)
            sums, _ = model(b["input_ids"], b["attention_mask"], b["labels"], w)
            return sums, None
        enc = feats.enc_batch(ks, acc.device)
        p = feats.p_batch(ks, acc.device)
        sums, _, lr_, parts = model(b["input_ids"], b["attention_mask"], b["labels"], enc["enc_ids"], enc["enc_mask"], p)
        _add_router_parts(totals, parts, frac)
        return sums, lr_

    def step_fn(acc, model, rows, step):
        norm = sum(feats.response_tokens(k) for k, _ in rows)
        lm_tot = 0.0
        totals: dict[str, float] = {}
        for chunk, frac in micro_batches(acc, model, rows, sc.micro_batch_size):
            sums, lr_ = chunk_losses(acc, model, [k for k, _ in chunk], frac, step, totals)
            lm = sums.sum() / max(norm, 1) * acc.num_processes
            acc.backward(lm if lr_ is None else lm + tc.gamma * lr_ * frac)
            lm_tot += float(lm.detach()) / acc.num_processes
        router = tc.gamma * totals["loss_router"] if totals else 0.0
        return {"loss": lm_tot + router, "loss_lm": lm_tot, **totals, "tokens": float(norm)}

    return train_loop("joint", sc, tc, objective, step_fn, plan, _stage_dir(tc, "joint"), resume=resume, stop_after=stop_after)


def run_sft(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    tc: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> StageResult:
    """One LoRA, plain SFT on (query, response): the paper's finetuned baselines."""
    sc = tc.sft
    feats = Featurizer(records, tokenizer, tokenizer, tc.max_length, tc.max_length)
    plan = uniform_plan(records, sc.batch_size * sc.grad_accum, tc.seed)
    objective = SFTObjective(model)

    def step_fn(acc, model_, rows, step):
        norm = sum(feats.response_tokens(k) for k, _ in rows)
        total = 0.0
        for chunk, _ in micro_batches(acc, model_, rows, sc.micro_batch_size, functools.partial(_by_length, feats)):
            b = feats.lm_batch([k for k, _ in chunk], acc.device)
            sums, _ = model_(b["input_ids"], b["attention_mask"], b["labels"])
            loss = sums.sum() / max(norm, 1) * acc.num_processes
            acc.backward(loss)
            total += float(loss.detach()) / acc.num_processes
        return {"loss_lm": total, "tokens": float(norm)}

    return train_loop(
        "sft",
        sc,
        tc,
        objective,
        step_fn,
        plan,
        out_dir,
        resume=resume,
        stop_after=stop_after,
    )




# --------------------------------------------------------------------------- pipelines
def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recent transformers call it activation checkpointing (the gradient_* names warn); older
    releases only have the gradient_* spelling."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _prepare(pf: PersonaFuseModel, tc: TrainConfig) -> PersonaFuseModel:
    if tc.gradient_checkpointing:
        set_activation_checkpointing(pf.base_model, True)
    return pf


def stage_model_dir(tc: TrainConfig, stage: str) -> Path:
    return _stage_dir(tc, stage) / "model"


def train(
    tc: TrainConfig, stage: str = "all", *, resume: bool = False, records: Sequence[Record] | None = None
) -> Path:
    """Run one stage or all three; each stage starts from the previous stage's saved model.
    Returns the directory of the last model saved (``OUT/joint/model`` after a full run)."""
    from personafuse.training.config import STAGES
    from personafuse.training.records import load_records

    if stage != "all" and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected warmup, router, joint or all")
    if stage not in ("all", *tc.stages):
        raise ValueError(f"Random Route ({tc.random_route} random experts, random_route in the config) has no {stage} stage; it trains {' and '.join(tc.stages)}")
    records = records if records is not None else load_records(tc.data, require_p=True)
    todo = list(tc.stages) if stage == "all" else [stage]
    # Read (and check) the router stage's own records before any stage trains: a bad file is
    # refused in seconds, not after the warm-up.
    router_records = load_records(tc.router_data, require_p=True) if tc.router_data and "router" in todo else records
    runners = {"warmup": run_warmup, "router": run_router, "joint": run_joint}
    last = None
    for name in todo:
        done_dir = stage_model_dir(tc, name)
        if resume and (done_dir / "personafuse_config.json").is_file():
            last = done_dir  # finished earlier
            continue
        prev = tc.stages[tc.stages.index(name) - 1] if name != "warmup" else None
        if prev is None:
            pf = PersonaFuseModel.from_config(tc.model)
        else:
            prev_dir = stage_model_dir(tc, prev)
            if not (prev_dir / "personafuse_config.json").is_file():
                raise FileNotFoundError(
                    f"stage {name} starts from the {prev} stage's model, but {prev_dir} does not exist; run --stage {prev} first"
                )
            pf = PersonaFuseModel.from_pretrained(prev_dir)
        stage_records = router_records if name == "router" else records
        runners[name](_prepare(pf, tc), stage_records, tc, resume=resume)
        if tc.gradient_checkpointing:
            set_activation_checkpointing(pf.base_model, False)
        _on_main(functools.partial(pf.save_pretrained, done_dir))
        last = done_dir
    assert last is not None
    return last


BASELINE_KINDS = ("direct", "human_like", "cot_sft")


def train_baseline(tc: TrainConfig, kind: str, *, resume: bool = False) -> Path:
    """A single LoRA (rank r, alpha as the experts) fitted by SFT: Direct-, Human-Like- or
    Persona-CoT-finetuned depending on which records ``tc.data`` holds. Saved as a peft adapter."""
    from peft import LoraConfig, get_peft_model

    from personafuse import embedded
    from personafuse.training.records import load_records

    if kind not in BASELINE_KINDS:
        raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(BASELINE_KINDS)}")
    records = load_records(tc.data, require_p=False)
    src = embedded.resolve(tc.model.base_model, tc.model.base_gguf_file)
    base = embedded.load_causal_lm(src, tc.model.dtype)
    tok = embedded.load_tokenizer(src)
    torch.manual_seed(tc.seed)
    cfg = LoraConfig(
        r=tc.model.r,
        lora_alpha=tc.model.alpha,
        lora_dropout=tc.model.dropout,
        target_modules=list(tc.model.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    out = Path(tc.out) / f"baseline-{kind}"
    adapter_dir = out / "adapter"
    if resume and (adapter_dir / "adapter_config.json").is_file():
        return adapter_dir
    run_sft(model, tok, records, tc, out, resume=resume)
    def save() -> None:
        model.save_pretrained(str(adapter_dir))
        tok.save_pretrained(str(adapter_dir))
        (adapter_dir / "personafuse_baseline.json").write_text(
            json.dumps({"kind": kind, "base_model": tc.model.base_model, "data": tc.data}, indent=2) + "\n"
        )

    _on_main(save)
    return adapter_dir


def _on_main(fn: Callable[[], object]) -> None:
    """Run ``fn`` on the main process only (under DDP every process holds the same model), then
    let every process wait until it is written."""
    from accelerate import PartialState

    state = PartialState(cpu=engine.cpu_only())
    if state.is_main_process:
        fn()
    state.wait_for_everyone()
