"""A :class:`~personafuse.moe.model.PersonaFuseModel` checkpoint on disk (``save_pretrained`` /
``from_pretrained``): the config, the experts, the router, and only those encoder tensors that
training changed. The base weights are never copied: the config references them by id or path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personafuse import embedded
from personafuse.moe.config import CONFIG_NAME, PersonaFuseConfig
from personafuse.traits import TRAIT_POLES

EXPERTS_FILE = "experts.safetensors"
ROUTER_FILE = "router.safetensors"
ENCODER_DELTA_FILE = "encoder_delta.safetensors"


def save(model: Any, directory: str | Path) -> Path:
    """Write config + experts + router + the encoder tensors that differ from its base model."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": "personafuse", "poles": ",".join(TRAIT_POLES)}
    save_file(model.experts_state_dict(), str(d / EXPERTS_FILE), metadata=meta)
    save_file(model.router_state_dict(), str(d / ROUTER_FILE), metadata=meta)
    delta = encoder_delta(model.router.encoder.backbone, model.encoder_digests)
    delta_path = d / ENCODER_DELTA_FILE
    if delta:
        save_file(delta, str(delta_path), metadata=meta)
    elif delta_path.exists():
        delta_path.unlink()
    model.config.save(d)
    return d


def encoder_delta(backbone: nn.Module, loaded: dict[str, str]) -> dict[str, torch.Tensor]:
    """The encoder tensors whose content differs from their fingerprint when loaded."""
    current = digests(backbone)
    state = backbone.state_dict()
    return {name: state[name].detach().cpu().contiguous() for name, d in current.items() if loaded.get(name) != d}


def pretrained_config(directory: str | Path, revision: str | None, cache_dir: str | Path | None,
                      device: str | torch.device | None, overrides: dict[str, Any]) -> tuple[Path, PersonaFuseConfig]:  # fmt: skip
    """The checkpoint folder (a Hub repo fetched, or read from the Hub cache offline) and its
    config with ``overrides`` applied and ``dtype="auto"`` resolved for ``device``."""
    d = Path(directory)
    if not d.is_dir():
        d = hub_checkpoint(str(directory), revision, cache_dir)
    config = PersonaFuseConfig.load(d)
    unknown = sorted(set(overrides) - set(config.to_dict()))
    if unknown:
        raise TypeError(f"from_pretrained: unknown config override(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(config.to_dict()))}")  # fmt: skip
    for k, v in overrides.items():
        setattr(config, k, v)
    config.validate()
    if device is not None and config.dtype == "auto":
        from personafuse import devices

        src = embedded.resolve(config.base_model, config.base_gguf_file)
        config.dtype = devices.resolve_dtype("auto", devices.resolve_device(str(device)),
                                             devices.source_dtype(src.path, src.gguf_file))  # fmt: skip
    return d, config


def load_weights(model: Any, directory: str | Path) -> None:
    """Copy a checkpoint's experts, router and encoder delta into ``model`` (shapes checked)."""
    d = Path(directory)
    for fname in (EXPERTS_FILE, ROUTER_FILE):
        if not (d / fname).is_file():
            raise FileNotFoundError(f"{d / fname} is missing from the checkpoint")
    experts = load_file(str(d / EXPERTS_FILE))
    layers = model.mixture_layers
    expected = {f"{n}.lora_{x}" for n in layers for x in "AB"}
    if set(experts) != expected:
        missing = sorted(expected - set(experts))[:3]
        extra = sorted(set(experts) - expected)[:3]
        raise ValueError(f"{d / EXPERTS_FILE}: tensors do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, layer in layers.items():
            for x in "AB":
                dst = getattr(layer, f"lora_{x}")
                src = experts[f"{name}.lora_{x}"]
                if src.shape != dst.shape:
                    raise ValueError(
                        f"{d / EXPERTS_FILE}: {name}.lora_{x} has shape {tuple(src.shape)}, model needs {tuple(dst.shape)}"
                    )
                dst.copy_(src)
        router = load_file(str(d / ROUTER_FILE))
        model.router.expert_embeddings.copy_(router["expert_embeddings"])
        model.router.encoder.proj.weight.copy_(router["proj.weight"])
        if "center" in router:  # absent from checkpoints saved before centring: zero, as they routed
            model.router.encoder.center.copy_(router["center"])
        if (d / ENCODER_DELTA_FILE).is_file():
            delta = load_file(str(d / ENCODER_DELTA_FILE))
            missing, unexpected = model.router.encoder.backbone.load_state_dict(delta, strict=False)
            if unexpected:
                raise ValueError(f"{d / ENCODER_DELTA_FILE}: unknown encoder tensors {unexpected[:3]}")


def hub_checkpoint(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """The local snapshot of a checkpoint on the Hub; a path that does not exist is named as such."""
    looks_local = repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"PersonaFuse checkpoint directory {repo_id!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[CONFIG_NAME, "*.safetensors"]))  # fmt: skip
    except Exception as e:  # offline and not cached, unknown repo, no access: say which and why
        raise FileNotFoundError(
            f"PersonaFuse checkpoint {repo_id!r} is neither a local directory nor a loadable Hub repo "
            f"({type(e).__name__}: {e})"
        ) from None


def digests(module: nn.Module) -> dict[str, str]:
    """A content hash per tensor (exact: any changed bit changes it)."""
    out = {}
    for name, t in module.state_dict().items():
        data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out[name] = f"{t.dtype}:{tuple(t.shape)}:" + hashlib.blake2b(data, digest_size=16).hexdigest()
    return out
