"""Uncertainty of a relative improvement over Direct-FT: a paired bootstrap over items.

Within each seed the same resampled items are scored for the variant and for Direct-FT (their runs
answer the same items: ``eval.item_seed`` picks them whatever the seed), and on every resample
each benchmark's *own* aggregate is recomputed from the item records (SafetyBench's category mean,
ToMBench's task/ability averages, EQ-Bench's revised-pass rule, Arena-Hard's Bradley-Terry win
rate), never a plain mean of item scores. The statistic is the relative change of the seed means,
as in the table; the interval is its 2.5th and 97.5th percentile (inverted-CDF quantiles, so a
discrete distribution's quantile is one of its values). Draws depend only on (benchmark, seed,
resample), so Direct-FT's resampled scores are computed once and shared by every variant.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESAMPLES = 1000
SEED = 0
Records = Sequence[Mapping[str, Any]]
Aggregate = Callable[[Records], float | None]


def relative(x: float | None, base: float | None) -> float | None:
    if x is None or base is None or base == 0 or not math.isfinite(x) or not math.isfinite(base):
        return None
    return 100.0 * (x - base) / abs(base)


def draws(n: int, resamples: int, seed: int, *key: object) -> list[list[int]]:
    """``resamples`` lists of ``n`` item indices drawn with replacement, seeded by ``seed`` and ``key``."""
    h = hashlib.sha256("|".join(map(str, (seed, *key))).encode()).hexdigest()
    rng = random.Random(int(h[:16], 16))
    return [[rng.randrange(n) for _ in range(n)] for _ in range(resamples)]


def resampled_scores(records: Records, aggregate: Aggregate, index_lists: Sequence[Sequence[int]]) -> list[float | None]:
    return [aggregate([records[i] for i in idx]) for idx in index_lists]


def relative_distribution(variant: Mapping[int, list[float | None]], base: Mapping[int, list[float | None]]) -> list[float]:
    """Per resample: the relative change of the variant's seed mean over the baseline's (seeds
    are the keys; a resample where a score is missing or the baseline's mean is 0 is dropped)."""
    seeds = sorted(variant)
    out = []
    for r in range(len(variant[seeds[0]])):
        xs = [variant[s][r] for s in seeds]
        bs = [base[s][r] for s in seeds]
        if any(x is None for x in xs + bs):
            continue
        rc = relative(statistics.fmean(xs), statistics.fmean(bs))  # type: ignore[arg-type]
        if rc is not None:
            out.append(rc)
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """The inverted-CDF quantile: the smallest value whose empirical CDF reaches ``q``."""
    xs = sorted(values)
    k = max(math.ceil(q * len(xs)) - 1, 0)
    return xs[min(k, len(xs) - 1)]


def interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    if not values:
        return None
    a = (1 - level) / 2
    return [quantile(values, a), quantile(values, 1 - a)]


def benchmark_aggregate(bench: str, options: Mapping[str, Any]) -> Aggregate:
    """The benchmark's own aggregate's headline score for a list of item records."""
    from personafuse.evaluation.benchmarks import get_benchmark

    b = get_benchmark(bench, options)

    def score(recs: Records) -> float | None:
        x = b.aggregate(recs).get("score")
        return float(x) if isinstance(x, int | float) and math.isfinite(x) else None

    return score


def run_records(run: Path, bench: str) -> dict[str, dict[str, Any]]:
    from personafuse.evaluation.runner import read_records

    return read_records(run / f"{bench}.jsonl")


def paired_intervals(runs: Mapping[str, Mapping[int, Path]], baseline: str, benches: Sequence[str], skip: Mapping[str, set[str]],
                     options: Callable[[Path, str], dict[str, Any]], *, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict[str, list[float]]]:
    """``{variant: {bench: [lo, hi]}}`` for every variant but ``baseline`` and every benchmark not
    in ``skip[variant]`` (failed cells). ``runs[variant][seed]`` is an evaluation run folder;
    ``options(run, bench)`` the benchmark options that run used."""
    out: dict[str, dict[str, list[float]]] = {}
    for b in benches:
        if b in skip.get(baseline, set()):
            continue
        base_recs = {s: run_records(p, b) for s, p in runs[baseline].items()}
        cache: dict[int, tuple[list[str], list[list[int]], list[float | None]]] = {}
        for v, seeds in runs.items():
            if v == baseline or b in skip.get(v, set()):
                continue
            dist_v, dist_b = {}, {}
            for s, p in seeds.items():
                recs = run_records(p, b)
                if s not in cache:
                    ids = sorted(base_recs[s])
                    idx = draws(len(ids), resamples, seed, b, s)
                    agg = benchmark_aggregate(b, options(runs[baseline][s], b))
                    cache[s] = (ids, idx, resampled_scores([base_recs[s][i] for i in ids], agg, idx))
                ids, idx, base_scores = cache[s]
                if not ids or set(ids) - set(recs):  # no item records, or not the same items: no paired interval
                    break
                dist_v[s] = resampled_scores([recs[i] for i in ids], benchmark_aggregate(b, options(p, b)), idx)
                dist_b[s] = base_scores
            else:
                ci = interval(relative_distribution(dist_v, dist_b)) if dist_v else None
                if ci is not None:
                    out.setdefault(v, {})[b] = ci
    return out
