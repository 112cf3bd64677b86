"""Where a model runs and in which precision: the one reading of ``--device`` and ``--dtype`` that
every model-loading command (eval, serve, chat, route, probe, routing, export, data generate, the
reproduce grid's cells) and the Python loaders share.

``--device``: ``auto`` (the first accelerator: CUDA, then Apple's MPS, else the CPU) | ``cpu`` |
``cuda`` | ``cuda:N`` | ``mps``. A device this machine does not have is refused before anything
loads.

``--dtype``: ``auto`` | ``bfloat16`` | ``float16`` | ``float32``. Precedence: the flag; then the
checkpoint's own dtype (a PersonaFuse checkpoint's ``dtype`` field, a transformers checkpoint's
``config.json``); then ``auto``: bfloat16 on a CUDA GPU that supports it (float16 on one that does
not, and on MPS), float32 on the CPU. A GGUF file has no dtype of its own (its tensors are
quantised): it is de-quantised and converted to the resolved dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICE_HELP = "auto (the first accelerator, else the CPU) | cpu | cuda | cuda:N | mps"
DTYPE_HELP = ("auto (the checkpoint's own, else bfloat16 on a GPU that supports it, float32 on the CPU) "
              "| bfloat16 | float16 | float32")  # fmt: skip
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
DtypeOpt = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]


class DeviceError(ValueError):
    """A ``--device`` or ``--dtype`` this machine cannot honour; ``option`` names the flag."""

    def __init__(self, message: str, option: str = "--device") -> None:
        super().__init__(message)
        self.option = option


def resolve_device(requested: str | None = "auto") -> str:
    """The torch device string for a ``--device`` value (``auto`` resolved), or :class:`DeviceError`
    naming what this machine lacks."""
    import torch

    text = (requested or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "mps":
        if not _mps_available():
            raise DeviceError("mps: this machine has no Apple MPS device; use auto or cpu")
        return "mps"
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise DeviceError(f"{requested!r} is not a device; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(f"{text}: this machine has no CUDA device (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use auto or cpu")  # fmt: skip
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise DeviceError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")  # fmt: skip
    return text


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_dtype(requested: str | None) -> str:
    text = (requested or "auto").strip().lower()
    if text not in DTYPES:
        raise DeviceError(f"{requested!r} is not a dtype; use {' | '.join(DTYPES)}", option="--dtype")
    return text


def auto_dtype(device: str) -> str:
    """``--dtype auto`` where the checkpoint names none: bfloat16 on a CUDA GPU that supports it,
    float16 on one that does not and on MPS, float32 on the CPU."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        with torch.cuda.device(torch.device(device)):
            # native bfloat16 only (Ampere and later): emulated it is slower than float16
            return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float16" if kind == "mps" else "float32"


def resolve_dtype(requested: str | None, device: str, own: str | None = None) -> str:
    """The dtype to load in: the request, else the checkpoint's ``own`` dtype, else :func:`auto_dtype`."""
    text = check_dtype(requested)
    if text != "auto":
        return text
    if own in DTYPES[1:]:
        return str(own)
    return auto_dtype(device)


def source_dtype(path: str, gguf_file: str | None = None) -> str | None:
    """The dtype a transformers checkpoint was saved in (its config's ``dtype``, formerly
    ``torch_dtype``); None for a GGUF file (quantised: no dtype of its own), a float64 checkpoint
    or one that names none. A Hub id's config is read from the Hub cache (or fetched, as loading
    it would)."""
    if gguf_file:
        return None
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8")) if (p / "config.json").is_file() else {}
        elif p.exists():
            return None
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path).to_dict()
    except Exception:  # unreadable or unreachable: the load itself will say why
        return None
    own = cfg.get("dtype") or cfg.get("torch_dtype")
    own = str(own).removeprefix("torch.") if own else None
    return own if own in DTYPES[1:] else None


def placement(module: Any) -> tuple[str, str]:
    """(device, dtype) of a module's first floating-point parameter: where it really computes."""
    import torch

    for p in module.parameters():
        if torch.is_floating_point(p):
            return str(p.device), str(p.dtype).removeprefix("torch.")
    return "none", "none"


def placement_line(model: Any, name: str | None = None) -> str:
    """The line a command prints first: the loaded model's device and dtype, read from its
    parameters (for a PersonaFuse model the base's, and the router encoder's where they differ)."""
    base = getattr(model, "base_model", model)
    dev, dt = placement(base)
    text = f"{name + ': ' if name else ''}device {dev}, dtype {dt}"
    router = getattr(model, "router", None)
    if router is not None and hasattr(router, "encoder"):
        edev, edt = placement(router.encoder)
        if (edev, edt) != (dev, dt):
            text += f" (router encoder: device {edev}, dtype {edt})"
    return text


def cli_placement(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(resolved device, checked dtype request) for a command's ``--device`` / ``--dtype``; a
    device this machine lacks or an unknown dtype is a usage error (exit 2) naming the flag, before
    any model loads."""
    try:
        return resolve_device(device), check_dtype(dtype)
    except DeviceError as e:
        raise typer.BadParameter(str(e), param_hint=e.option) from None
