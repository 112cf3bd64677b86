"""A :class:`~personafuse.moe.model.PersonaFuseModel`'s experts as standard peft LoRA folders:
one fixed mixture (``export_lora``, for peft, vLLM or LoRAX alone) or the ten experts unweighted
for the vLLM plugin (``export_stack``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from personafuse import embedded
from personafuse.moe.generation import Weights, weights_matrix
from personafuse.traits import TRAIT_POLES, TraitError, weights_dict

# The ranks vLLM's --max-lora-rank accepts (vllm-project/vllm, vllm/config.py, LoRAConfig.__post_init__:
# possible_max_ranks); an adapter of rank r loads only with max_lora_rank >= r
# (vllm/lora/peft_helper.py, PEFTHelper.validate_legal).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``vllm serve --max-lora-rank`` that loads an adapter of this rank."""
    for m in VLLM_MAX_LORA_RANKS:
        if rank <= m:
            return m
    raise ValueError(f"rank {rank} is above every max_lora_rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]})")


def export_lora(model: Any, weights: Weights, directory: str | Path) -> Path:
    """``PersonaFuseModel.export_lora``: one fixed mixture as one rank-10r peft LoRA."""
    w_rows = weights_matrix(weights)
    if w_rows.shape[0] != 1:
        raise TraitError(f"export_lora takes one mixture (ten weights), got {w_rows.shape[0]} rows")
    w = w_rows[0]
    return write_lora(model, directory, w, {"weights": weights_dict(w.tolist())})


def export_stack(model: Any, directory: str | Path) -> Path:
    """``PersonaFuseModel.export_stack``: the ten experts unweighted, marked ``"stack": true``."""
    cfg = model.config
    info = {"stack": True, "poles": list(TRAIT_POLES), "expert_rank": cfg.r, "num_experts": cfg.num_experts}
    return write_lora(model, directory, torch.ones(cfg.num_experts), info)


def write_lora(model: Any, directory: str | Path, w: torch.Tensor, info: dict[str, Any]) -> Path:
    """Scale each expert's A by its weight, stack the experts into one LoRA of rank 10r (its
    lora_alpha 10*alpha keeps the scale alpha/r) and write it with ``personafuse_mixture.json``."""
    from peft import LoraConfig

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    rank = cfg.r * cfg.num_experts
    w_rows = w.float().repeat_interleave(cfg.r)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in model.mixture_layers.items():
        a = layer.lora_A.detach().float().cpu() * w_rows[:, None]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(layer.lora_A.dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    try:
        base = embedded.resolve(cfg.base_model, cfg.base_gguf_file)
    except embedded.ModelNotFoundError:  # not here now (a moved path): keep the reference as written
        base = embedded.ModelSource(cfg.base_model, cfg.base_model, cfg.base_gguf_file)
    LoraConfig(
        r=rank,
        lora_alpha=cfg.alpha * cfg.num_experts,
        lora_dropout=0.0,
        target_modules=sorted(set(cfg.target_modules)),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base.path,
    ).save_pretrained(str(d))
    # A GGUF base (the embedded default) loads only with its file named:
    # AutoPeftModelForCausalLM.from_pretrained(dir, gguf_file=...) (docs/model.md). vLLM reads no
    # GGUF here: serve_model is the converted Hugging Face folder it loads.
    info |= {"base_model": base.path, "base_gguf_file": base.gguf_file, "serve_model": embedded.converted(base).path}
    (d / "personafuse_mixture.json").write_text(json.dumps(info, indent=2) + "\n")
    return d
