"""The three training stages (paper §4.3) and the single-LoRA baselines: the recipes.

    stage 1  warmup  experts learn L_lm on their own records; all ten in one batched job
    stage 2  router  experts frozen; encoder + projection + expert embeddings learn L_router
    stage 3  joint   mixture live; experts + router learn L_lm + gamma * L_router
    sft      baseline: one peft LoRA, plain SFT (Direct / Human-Like / Persona-CoT finetuned)

Each runner joins its components: a plan (:mod:`.plans`: each step's rows, a pure function of seed
and step), an objective (:mod:`.objectives`: the loss and its normalisation), batching
(:mod:`.batching`: tokenised records, micro-batches) and the loop (:mod:`.loop`: optimiser,
clipping, logs, checkpoints that ``--resume`` continues from exactly). :func:`train` and
:func:`train_baseline` chain the stages into the pipelines that ``personafuse train`` runs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personafuse.moe.model import PersonaFuseModel
from personafuse.training import engine
from personafuse.training.batching import Featurizer, add_router_parts, by_length, micro_batches
from personafuse.training.config import TrainConfig
from personafuse.training.loop import StageResult, clip_per_expert, mixture_layers, train_loop
from personafuse.training.objectives import (
    JointObjective,
    RandomRouteObjective,
    RouterObjective,
    SFTObjective,
    WarmupObjective,
    random_route_weights,
)
from personafuse.training.plans import same_p_plan, uniform_plan, warmup_plan
from personafuse.training.records import Record


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
        norms = [0] * E  # each expert's response tokens in this step: its token-mean's denominator
        for k, i in rows:
            norms[i] += feats.response_tokens(k)
        total = torch.zeros((), device=acc.device)
        for chunk, _ in micro_batches(acc, model, rows, sc.micro_batch_size, functools.partial(by_length, feats)):
            b = feats.lm_batch([k for k, _ in chunk], acc.device)
            experts = torch.tensor([i for _, i in chunk], device=acc.device)
            loss = model(
                b["input_ids"], b["attention_mask"], b["labels"], experts,
                expert_tokens=[norms[i] for _, i in chunk], processes=acc.num_processes,
            )
            acc.backward(loss)
            total += loss.detach() / acc.num_processes
        active = sum(1 for n in norms if n)
        return {"loss_lm": _step_sum(acc, float(total)) / max(active, 1), "experts": float(active), "tokens": float(sum(norms))}

    return train_loop(
        "warmup",
        sc,
        tc,
        objective,
        step_fn,
        plan,
        out_dir or _stage_dir(tc, "warmup"),
        resume=resume,
        clip_fn=lambda model, m: clip_per_expert(mixture_layers(model), m, E, r),
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
            loss, parts = model(enc["enc_ids"], enc["enc_mask"], feats.p_batch(ks, acc.device), row_share=frac)
            acc.backward(loss)
            add_router_parts(totals, parts, frac)
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
    objective = RandomRouteObjective(pf) if random_k else JointObjective(pf, tc.beta, tc.margin, tc.gamma)

    def chunk_loss(acc, model, ks, frac, step, step_tokens, totals):
        """One micro-batch's part of the step's loss (JointObjective: L_lm + gamma * L_router, or
        RandomRouteObjective: L_lm) and its LM part; the router loss's parts go into ``totals``."""
        b = feats.lm_batch(ks, acc.device)
        lm_args = (b["input_ids"], b["attention_mask"], b["labels"])
        if random_k:
            w = random_route_weights(random_k, tc.seed, step, ks).to(acc.device)
            loss = model(*lm_args, w, step_tokens=step_tokens, processes=acc.num_processes)
            return loss, loss.detach()
        enc = feats.enc_batch(ks, acc.device)
        p = feats.p_batch(ks, acc.device)
        loss, l_lm, parts = model(
            *lm_args, enc["enc_ids"], enc["enc_mask"], p,
            step_tokens=step_tokens, row_share=frac, processes=acc.num_processes,
        )
        add_router_parts(totals, parts, frac)
        return loss, l_lm

    def step_fn(acc, model, rows, step):
        norm = sum(feats.response_tokens(k) for k, _ in rows)
        lm_tot = 0.0
        totals: dict[str, float] = {}
        for chunk, frac in micro_batches(acc, model, rows, sc.micro_batch_size):
            loss, l_lm = chunk_loss(acc, model, [k for k, _ in chunk], frac, step, norm, totals)
            acc.backward(loss)
            lm_tot += float(l_lm) / acc.num_processes
        lm_tot = _step_sum(acc, lm_tot)  # each process holds its rows' share of the step's token-mean
        router = tc.gamma * totals["loss_router"] if totals else 0.0  # the logged L_joint's router term
        return {"loss": lm_tot + router, "loss_lm": lm_tot, **totals, "tokens": float(norm)}

    return train_loop("joint", sc, tc, objective, step_fn, plan, _stage_dir(tc, "joint"), resume=resume, stop_after=stop_after)


def _step_sum(acc, share: float) -> float:
    """The whole step's logged loss from each process's share of it (one process: the share)."""
    if acc.num_processes == 1:
        return share
    return float(acc.reduce(torch.tensor(share, device=acc.device), reduction="sum"))


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
        for chunk, _ in micro_batches(acc, model_, rows, sc.micro_batch_size, functools.partial(by_length, feats)):
            b = feats.lm_batch([k for k, _ in chunk], acc.device)
            loss = model_(b["input_ids"], b["attention_mask"], b["labels"], step_tokens=norm, processes=acc.num_processes)
            acc.backward(loss)
            total += float(loss.detach()) / acc.num_processes
        return {"loss_lm": _step_sum(acc, total), "tokens": float(norm)}

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
