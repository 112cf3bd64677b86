"""Makes ``lm_eval --model personafuse`` work from lm-eval's own command line.

lm-eval (0.4.x) has no plugin discovery: a model class must be registered in the process before
``--model`` is looked up. ``personafuse_lm_eval.pth`` imports this module at interpreter start; it
only adds an import hook (no other imports, so every Python start stays as fast). When
``lm_eval.models`` finishes registering lm-eval's own models, the hook adds ``personafuse`` as a
lazy entry, imported only if someone asks for it.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "lm_eval.models"
_ENTRY = ("personafuse", "personafuse.evaluation.lm_eval_model:PersonaFuseLM")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into this finder
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            from lm_eval.api.registry import model_registry

            if _ENTRY[0] not in model_registry.keys():  # noqa: SIM118 (a Registry, not a dict)
                model_registry.register(_ENTRY[0], target=_ENTRY[1])
        except Exception:  # never break lm-eval itself
            pass


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
