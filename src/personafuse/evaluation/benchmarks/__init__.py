"""The paper's nine benchmarks, by name (``personafuse eval --benchmarks NAME,...``).

A benchmark is one module with one :class:`Benchmark` subclass that states its own facts (title,
aliases, reported sub-scores, figure group, requests per item, ...); everything else (the CLI's
help, ``personafuse report``, the grid's plan, estimate and report) reads them from
:data:`BENCHMARKS`. A module outside the package joins the registry through
``$PERSONAFUSE_BENCHMARKS`` (comma-separated module names, read at import, so the grid's child
processes see it too) or :func:`register`."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext
from personafuse.evaluation.benchmarks.emobench import EmoBench
from personafuse.evaluation.benchmarks.eqbench import EQBench
from personafuse.evaluation.benchmarks.gpqa import GPQA
from personafuse.evaluation.benchmarks.gsm8k import GSM8K
from personafuse.evaluation.benchmarks.judged import ArenaHard, MentalChat
from personafuse.evaluation.benchmarks.safetybench import SafetyBench
from personafuse.evaluation.benchmarks.shopmmlu import ShopMMLU
from personafuse.evaluation.benchmarks.tombench import ToMBench

PLUGINS_ENV = "PERSONAFUSE_BENCHMARKS"
BENCHMARKS: dict[str, type[Benchmark]] = {}
ALIASES: dict[str, str] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Adds ``cls`` under its ``name`` and ``aliases`` (also usable as a class decorator)."""
    if not cls.name or cls.name != cls.name.lower():
        raise ValueError(f"{cls.__name__}: a benchmark needs a lower-case name, got {cls.name!r}")
    BENCHMARKS[cls.name] = cls
    ALIASES.update(dict.fromkeys(cls.aliases, cls.name))
    return cls


def register_module(module: str) -> list[str]:
    """Imports ``module`` and registers every named Benchmark subclass it defines; their names."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"${PLUGINS_ENV}: cannot import benchmark module {module!r}: {e}") from e
    found = [obj for obj in vars(mod).values()
             if isinstance(obj, type) and issubclass(obj, Benchmark) and obj.__module__ == mod.__name__ and obj.name]
    return [register(cls).name for cls in found]


for _cls in (EmoBench, EQBench, ToMBench, GPQA, GSM8K, ArenaHard, SafetyBench, ShopMMLU, MentalChat):
    register(_cls)
for _module in os.environ.get(PLUGINS_ENV, "").split(","):
    if _module.strip():
        register_module(_module.strip())


def canonical_name(name: str) -> str:
    """The registry key a user's spelling of a benchmark means (``EQ-Bench`` -> ``eqbench``);
    unknown names come back lower-cased, not in :data:`BENCHMARKS`."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


def get_benchmark(name: str, options: Mapping[str, Any] | None = None) -> Benchmark:
    key = canonical_name(name)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key](options)


def report_order() -> list[str]:
    """Every registered benchmark in the report's order: by figure group (groups in the order of
    their first member), then by each benchmark's ``order``, then by registration."""
    rank = {name: (cls.order, i) for i, (name, cls) in enumerate(BENCHMARKS.items())}
    first: dict[str, tuple[int, int]] = {}
    for name, cls in BENCHMARKS.items():
        first[cls.group] = min(first.get(cls.group, rank[name]), rank[name])
    return sorted(BENCHMARKS, key=lambda n: (first[BENCHMARKS[n].group], rank[n]))


def groups() -> dict[str, list[str]]:
    """Figure group title -> its benchmarks, in the report's order (paper Figures 5-7)."""
    out: dict[str, list[str]] = {}
    for name in report_order():
        out.setdefault(BENCHMARKS[name].group, []).append(name)
    return out


__all__ = ["ALIASES", "BENCHMARKS", "PLUGINS_ENV", "Benchmark", "Item", "ScoreContext", "canonical_name", "get_benchmark",
           "groups", "register", "register_module", "report_order"]
