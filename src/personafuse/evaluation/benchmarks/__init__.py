"""The paper's nine benchmarks, by name (``personafuse eval --benchmarks NAME,...``)."""

from __future__ import annotations

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

BENCHMARKS: dict[str, type[Benchmark]] = {
    b.name: b for b in (EmoBench, EQBench, ToMBench, GPQA, GSM8K, ArenaHard, SafetyBench, ShopMMLU, MentalChat)
}
ALIASES = {"eq-bench": "eqbench", "eq_bench": "eqbench", "arena-hard": "arenahard", "mentalchat16k": "mentalchat", "shop-mmlu": "shopmmlu", "shop": "shopmmlu"}


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


__all__ = ["BENCHMARKS", "Benchmark", "Item", "ScoreContext", "canonical_name", "get_benchmark"]
