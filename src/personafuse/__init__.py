"""PersonaFuse: a frozen base LM, ten Big Five LoRA experts and a situation-aware router.

Heavy modules (torch, transformers) load lazily so that ``import personafuse`` and the CLI's
``--help`` stay fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import TYPE_CHECKING, Any

from personafuse.traits import NUM_POLES, TRAIT_POLES, TraitError

__version__ = "0.1.0"

_LAZY = {
    "PersonaFuseConfig": "personafuse.moe.config",
    "PersonaFuseModel": "personafuse.moe.model",
    "Generation": "personafuse.chat",
    "Routing": "personafuse.moe.routing",
    "MixtureLinear": "personafuse.moe.mixture",
    "Router": "personafuse.moe.router",
}

__all__ = [
    "NUM_POLES",
    "TRAIT_POLES",
    "Generation",
    "MixtureLinear",
    "PersonaFuseConfig",
    "PersonaFuseModel",
    "Router",
    "Routing",
    "TraitError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from personafuse.chat import Generation
    from personafuse.moe.config import PersonaFuseConfig
    from personafuse.moe.mixture import MixtureLinear
    from personafuse.moe.model import PersonaFuseModel
    from personafuse.moe.router import Router
    from personafuse.moe.routing import Routing


# Module paths before the model and training moved into subpackages (0.2). Importing one still
# works for one release: it is the new module itself (one object, so patches and isinstance checks
# hold), with a DeprecationWarning naming the new path.
MOVED_MODULES = {
    **{f"personafuse.{m}": f"personafuse.moe.{m}" for m in ("config", "mixture", "packing", "kernels", "router", "routing", "decoding", "model")},
    **{f"personafuse.{m}": f"personafuse.training.{m}" for m in ("losses", "engine", "records", "stages")},
    "personafuse.train_config": "personafuse.training.config",
    "personafuse.train_cli": "personafuse.training.cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in the next release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'personafuse' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion sees the lazy names too
    return sorted(set(globals()) | set(_LAZY))
