"""Batch plans: which records each step of a stage trains on (paper §4.3).

A plan maps a step number to that step's rows, ``(record index, expert index or -1)``, as a pure
function of (seed, step): ``--resume`` needs no data-loader state, and every process and
micro-batch split of a step sees the same rows.

    stage 1  warmup_plan   rows_per_expert records of every expert i from its own stream over {r | p_i = 1}
    stage 2  same_p_plan   queries sharing one activation vector (L_trait compares them)
    stage 3  uniform_plan  a uniform stream over all records (also the SFT baselines)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from personafuse.training.records import Record
from personafuse.traits import NUM_POLES

Row = tuple[int, int]  # (record index, expert index or -1)


class ShuffledStream:
    """An endless stream over ``indices``, reshuffled every epoch; position -> item is pure."""

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        self.indices = list(indices)
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def take(self, start: int, count: int) -> list[int]:
        n = len(self.indices)
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, n)
            perm = self._perms.get(epoch)
            if perm is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g).tolist()
                self._perms = {epoch: perm}  # epochs are visited in order; keep one
            out.append(self.indices[perm[i]])
        return out


def warmup_plan(
    records: Sequence[Record], rows_per_expert: int, seed: int, experts: Sequence[int] | None = None
) -> Callable[[int], list[Row]]:
    """Stage 1: each step takes ``rows_per_expert`` records of every expert i from its own stream
    over ``{r | p_i = 1}``: the same rows expert i would see in a run of its own."""
    experts = list(range(NUM_POLES)) if experts is None else list(experts)
    streams = {}
    for i in experts:
        idx = [k for k, r in enumerate(records) if r.p and r.p[i]]
        if idx:
            streams[i] = ShuffledStream(idx, seed + 7919 * (i + 1))

    def plan(step: int) -> list[Row]:
        return [(k, i) for i, s in streams.items() for k in s.take(step * rows_per_expert, rows_per_expert)]

    return plan


def same_p_plan(
    records: Sequence[Record], batch: int, steps: int, seed: int, min_group: int = 2
) -> Callable[[int], list[Row]]:
    """Stage 2: every batch holds queries that share one activation vector (for L_trait). Groups are
    drawn in proportion to their size; vectors with fewer than ``min_group`` records are pooled into
    one mixed group, where L_trait only counts pairs that do share a vector."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, r in enumerate(records):
        groups.setdefault(r.p or (), []).append(k)
    pooled = [k for g in groups.values() if len(g) < min_group for k in g]
    members = [g for g in groups.values() if len(g) >= min_group] + ([pooled] if pooled else [])
    streams = [ShuffledStream(g, seed + 104729 * j) for j, g in enumerate(members)]
    sizes = np.array([len(g) for g in members], dtype=float)
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(members), size=steps, p=sizes / sizes.sum()).tolist()
    offsets, seen = [], [0] * len(members)
    for c in choices:  # how far into its group's stream each step starts
        size = min(batch, len(members[c]))
        offsets.append((c, seen[c], size))
        seen[c] += size

    def plan(step: int) -> list[Row]:
        c, start, size = offsets[step]
        return [(k, -1) for k in streams[c].take(start, size)]

    return plan


def uniform_plan(records: Sequence[Record], batch: int, seed: int) -> Callable[[int], list[Row]]:
    stream = ShuffledStream(range(len(records)), seed)
    return lambda step: [(k, -1) for k in stream.take(step * batch, batch)]
