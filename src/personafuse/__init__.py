"""PersonaFuse: a frozen base LM, ten Big Five LoRA experts and a situation-aware router.

Heavy modules (torch, transformers) load lazily so that ``import personafuse`` and the CLI's
``--help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from personafuse.traits import NUM_POLES, TRAIT_POLES, TraitError

__version__ = "0.1.0"

_LAZY = {
    "PersonaFuseConfig": "personafuse.config",
    "PersonaFuseModel": "personafuse.model",
    "Generation": "personafuse.model",
    "Routing": "personafuse.routing",
    "MixtureLinear": "personafuse.mixture",
    "Router": "personafuse.router",
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
    from personafuse.config import PersonaFuseConfig
    from personafuse.mixture import MixtureLinear
    from personafuse.model import Generation, PersonaFuseModel
    from personafuse.router import Router
    from personafuse.routing import Routing


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'personafuse' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion sees the lazy names too
    return sorted(set(globals()) | set(_LAZY))
