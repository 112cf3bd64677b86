"""The distributed engine under the training loop: accelerate, plus what FSDP2 needs on top.

One process, DDP (``accelerate launch --multi_gpu`` or ``torchrun``) and FSDP2 (an accelerate
config with ``distributed_type: FSDP`` and ``fsdp_version: 2``) run the same loop. Under FSDP2:

- the stage trains a copy of the objective whose parameters start out sharing the caller's tensors;
  ``fully_shard`` moves the copy's parameters into shards, so the caller's model stays a plain model
  on its original device (the frozen base is not duplicated on the accelerator) and gets the trained
  tensors back, whole, when the stage ends (:func:`hand_back`);
- checkpoints hold whole tensors (gathered through torch's distributed-checkpoint state-dict API,
  trained tensors only, and written by the main process): the same
  ``state.pt`` layout as one process or DDP writes, except that an FSDP run's optimiser state is
  keyed by parameter path and resumes under FSDP only.

DeepSpeed is refused (see :func:`refuse_deepspeed`).
"""

from __future__ import annotations

import copy
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn


def cpu_only() -> bool:
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or has_mps or has_xpu)


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def refuse_deepspeed(acc: Any | None = None) -> None:
    if _env_flag("ACCELERATE_USE_DEEPSPEED") or (acc is not None and str(acc.distributed_type).endswith("DEEPSPEED")):
        raise NotImplementedError(
            "DeepSpeed is not supported by personafuse training (its engine owns the optimiser step "
            "and clips one global gradient norm, which would couple the ten experts of the warm-up): "
            "use FSDP2 to shard the frozen base (accelerate config `distributed_type: FSDP` with "
            "`fsdp_version: 2`, e.g. configs/accelerate/fsdp2.yaml) or DDP (`accelerate launch "
            "--multi_gpu`, `torchrun`) to replicate it."
        )


def make_accelerator(mixed_precision: str) -> Any:
    """An ``Accelerator`` for the launch at hand (environment or accelerate config).

    ``torchrun`` on a machine without accelerators means processes on CPU over gloo: DDP, or FSDP2
    when the environment asks for it (accelerate itself only turns FSDP on for accelerators; torch's
    FSDP2 runs on CPU, which is how the tests check it)."""
    from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin, PartialState

    refuse_deepspeed()  # before Accelerator: it fails on a missing deepspeed package first
    # step_scheduler_with_optimizer=False: every process runs every step (each on its share of the
    # step's rows), so the schedule advances once per step, not once per process.
    acc = Accelerator(
        mixed_precision=_mixed_precision(mixed_precision), cpu=cpu_only(), step_scheduler_with_optimizer=False
    )
    refuse_deepspeed(acc)
    if _env_flag("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        # Recorded where accelerate records its own choice: every later AcceleratorState() copies
        # PartialState's distributed_type over its own.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)  # as accelerate does for its own FSDP
        acc.state.fsdp_plugin = plugin
    if acc.distributed_type == DistributedType.FSDP:
        plugin = acc.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise NotImplementedError(
                "FSDP1 is not supported by personafuse training (its flat parameters hide the experts' "
                "tensors): set `fsdp_version: 2` under `fsdp_config` in the accelerate config "
                "(or FSDP_VERSION=2)."
            )
        # accelerate resolves the wrap policy against the first model it prepares and keeps the
        # result in the process-wide plugin; every stage prepares a model of its own (a baseline's
        # may hold other layer classes), so each starts from the configured policy again.
        pristine = getattr(plugin, "_personafuse_wrap", None)
        if pristine is None:
            names = plugin.transformer_cls_names_to_wrap
            plugin._personafuse_wrap = (plugin.auto_wrap_policy, None if names is None else list(names))
        else:
            plugin.auto_wrap_policy = pristine[0]
            plugin.transformer_cls_names_to_wrap = None if pristine[1] is None else list(pristine[1])
    return acc


def describe(acc: Any) -> str:
    """One line on how a stage runs, e.g. ``FSDP2, 2 processes (nccl) on cuda, mixed precision bf16``."""
    kind = "FSDP2" if is_fsdp(acc) else "DDP" if acc.num_processes > 1 else "one process"
    procs = f", {acc.num_processes} processes ({acc.state.backend})" if acc.num_processes > 1 else ""
    return f"{kind}{procs} on {acc.device.type}, mixed precision {acc.mixed_precision}"


def is_fsdp(acc: Any) -> bool:
    return bool(getattr(acc, "is_fsdp2", False))


# --------------------------------------------------------------------------- FSDP2 copy
def shard_copy(objective: nn.Module, trainable: dict[str, nn.Parameter]) -> tuple[nn.Module, dict[str, str]]:
    """A deep copy of ``objective`` for ``fully_shard``: its parameters are new ``Parameter``
    objects over the same tensors (so building it costs no memory, and sharding it leaves the
    originals in place). Returns the copy and each trainable name's path in it."""
    names = {id(p): n for n, p in objective.named_parameters()}
    missing = [k for k, p in trainable.items() if id(p) not in names]
    if missing:
        raise ValueError(f"trainable tensors not in the objective: {', '.join(missing[:5])}")
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in objective.parameters()}
    for m in objective.modules():  # tokenizers ride along by reference
        for attr in ("tokenizer", "encoder_tokenizer"):
            obj = m.__dict__.get(attr)
            if obj is not None and not isinstance(obj, nn.Module):
                memo[id(obj)] = obj
    shadow = copy.deepcopy(objective, memo)
    # accelerate's TRANSFORMER_BASED_WRAP without class names wraps the model's _no_split_modules:
    # the objective has none of its own, so it lists those of the transformers models inside it.
    wrap = sorted({c for m in shadow.modules() for c in (getattr(m, "_no_split_modules", None) or [])})
    shadow._no_split_modules = wrap
    return shadow, {k: names[id(p)] for k, p in trainable.items()}


def params_by_path(model: nn.Module, paths: dict[str, str]) -> dict[str, nn.Parameter]:
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    # accelerate's own activation checkpointing (fsdp_activation_checkpointing) or compile wrap
    # modules and add a level to the names; accelerate maps them back the same way.
    named = fsdp2_canonicalize_names(dict(model.named_parameters()))
    return {k: named[path] for k, path in paths.items()}


def _state_dict_keys(model: nn.Module, live: dict[str, nn.Parameter]) -> dict[str, str]:
    """Each trained tensor's key in torch DCP's model state dict: its path in ``model``, canonical
    as in :func:`params_by_path` (DCP's ``_get_fqns`` drops the same activation-checkpointing and
    compile levels)."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    names = {id(p): n for n, p in fsdp2_canonicalize_names(dict(model.named_parameters())).items()}
    missing = [k for k, p in live.items() if id(p) not in names]
    if missing:
        raise ValueError(f"trained tensors not in the sharded model: {', '.join(missing[:5])}")
    return {k: names[id(p)] for k, p in live.items()}


def _gather_trained(model: nn.Module, live: dict[str, nn.Parameter], *, cpu_offload: bool) -> dict[str, torch.Tensor]:
    """Whole tensors of an FSDP2 model's trained parameters, keyed as ``live``. Collective: every
    process calls it. torch DCP's get_model_state_dict (torch 2.13,
    torch/distributed/checkpoint/state_dict.py) with ignore_frozen_params drops the
    requires_grad=False parameters before it gathers, so the frozen base stays sharded (except a
    frozen tensor tied under a second name, e.g. tied input/output embeddings: DCP drops frozen
    tensors by named_parameters(), which names a shared tensor once). With cpu_offload, process 0
    alone receives the tensors (on the CPU) and the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = _state_dict_keys(model, live)
    frozen = [k for k, p in live.items() if not p.requires_grad]
    if frozen:  # DCP would leave them out: the stage's trained set is its requires_grad set
        raise ValueError(f"trained tensors marked frozen (requires_grad=False): {', '.join(frozen[:5])}")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=opts)
    return {k: full[key] for k, key in keys.items()} if full else {}


@torch.no_grad()
def hand_back(model: nn.Module, live: dict[str, nn.Parameter], trainable: dict[str, nn.Parameter]) -> None:
    """Copy the trained tensors of the sharded copy ``model`` into the caller's parameters, on
    every process. Collective under FSDP."""
    # every process keeps its caller's model, so every process needs the whole tensors: no cpu_offload
    for k, t in _gather_trained(model, live, cpu_offload=False).items():
        trainable[k].copy_(t.to(trainable[k].device))


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    acc: Any, model: nn.Module, live: dict[str, nn.Parameter], optimizer: Any, scheduler: Any, step: int
) -> dict[str, Any]:
    """Whole tensors of everything a resume needs. Collective under FSDP: every process calls it,
    the main process (rank 0, the only one that receives the tensors) writes the result."""
    if is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        params = _gather_trained(model, live, cpu_offload=True)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = {"format": "fsdp-full", "state": get_optimizer_state_dict(model, _inner(optimizer), options=opts)}
    else:  # one process or DDP: the parameters are whole already
        params = {k: p.detach().cpu().clone() for k, p in live.items()}
        optim = optimizer.state_dict()
    return {
        "step": step,
        "params": params,
        "optimizer": optim,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }


def load_checkpoint_state(
    acc: Any, model: nn.Module, live: dict[str, nn.Parameter], optimizer: Any, scheduler: Any, state: dict, where: str
) -> None:
    unknown = [k for k in state["params"] if k not in live]
    if unknown:
        raise ValueError(f"{where}: tensor {unknown[0]!r} is not trained by this stage")
    if is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # torch 2.13 DCP (torch/distributed/checkpoint/state_dict.py): with full_state_dict every
        # process passes the whole tensors (each read state.pt) and keeps its own shard of them;
        # strict=False as the checkpoint holds the trained tensors only.
        keys = _state_dict_keys(model, live)
        full = {keys[k]: t for k, t in state["params"].items()}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for k, t in state["params"].items():
                live[k].copy_(t)
    optim = state["optimizer"]
    sharded = isinstance(optim, dict) and optim.get("format") == "fsdp-full"
    if sharded != is_fsdp(acc):
        saved, now = ("FSDP", "a non-FSDP") if sharded else ("a non-FSDP engine", "FSDP")
        raise ValueError(f"{where}: the optimiser state was saved under {saved} and this run uses {now}")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model, _inner(optimizer), optim["state"], options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
