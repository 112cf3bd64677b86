"""The package layout: every module imports, and module paths from before the move to ``moe/`` and
``training/`` still import (one release) as the new module itself, with a warning naming it."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import subprocess
import sys

import pytest

import personafuse
from personafuse import MOVED_MODULES


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(personafuse.__path__, "personafuse.")]
    assert "personafuse.moe.mixture" in names and "personafuse.training.stages" in names
    for name in names:
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_path_is_the_new_module(old: str) -> None:
    new = importlib.import_module(MOVED_MODULES[old])
    # a fresh interpreter: the old path must import on its own, warn, and be the new module
    code = (
        "import warnings, importlib\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new.__name__!r})\n"
        "assert old is new, (old, new)\n"
        f"assert any({new.__name__!r} in str(x.message) and x.category is DeprecationWarning for x in w), [str(x.message) for x in w]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)




def test_objects_pickled_under_an_old_path_load() -> None:
    """A checkpoint written before the move names its classes by their old module."""
    from personafuse.training.config import StageConfig

    blob = pickle.dumps(StageConfig(steps=3, batch_size=2), protocol=0)  # protocol 0: names as text lines
    blob = blob.replace(b"personafuse.training.config", b"personafuse.train_config")
    assert b"personafuse.train_config" in blob
    with pytest.warns(DeprecationWarning, match="personafuse.training.config"):
        sys.modules.pop("personafuse.train_config", None)
        loaded = pickle.loads(blob)
    assert loaded == StageConfig(steps=3, batch_size=2)
