"""GPQA (Rein et al. 2024): graduate-level four-option questions, subsets diamond/main/extended.

Official files (gated on the Hub as ``Idavidrein/gpqa``, configs ``gpqa_diamond``/``gpqa_main``/
``gpqa_extended``; also in the dataset zip): CSVs ``gpqa_<subset>.csv`` with ``Question``,
``Correct Answer``, ``Incorrect Answer 1..3``, ``Record ID`` and ``High-level domain``. The four
answers are shuffled per item with the run's seed. The headline score is the mean of the subset
accuracies present (paper Table 14 averages the three).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext, _mean
from personafuse.evaluation.benchmarks.choice import LETTERS, format_options, parse_choice
from personafuse.evaluation.data import DataError, field, hub_path, is_missing, read_csv, stable_rng

HUB_ID = "Idavidrein/gpqa"
SUBSETS = ("diamond", "main", "extended")


class GPQA(Benchmark):
    name = "gpqa"
    title = "GPQA"
    folder = "gpqa"
    max_new_tokens = 512

    def _subsets(self) -> list[str]:
        s = self.options.get("subsets", SUBSETS)
        subs = [x.strip() for x in s.split(",")] if isinstance(s, str) else list(s)
        for x in subs:
            if x not in SUBSETS:
                raise DataError(f"gpqa: unknown subset {x!r}; expected some of {', '.join(SUBSETS)}")
        return subs

    def load_items(self, source: Path | None) -> list[Item]:
        seed = int(self.options.get("seed", 0))
        rows: list[tuple[str, Any, dict[str, Any]]] = []
        if source is None:
            from datasets import load_dataset

            for sub in self._subsets():
                ds = load_dataset(hub_path(HUB_ID), f"gpqa_{sub}", split="train")
                rows += [(sub, HUB_ID, dict(r, __line__=i + 2)) for i, r in enumerate(ds)]
        elif source.is_file():
            sub = next((s for s in SUBSETS if s in source.stem), "main")
            rows += [(sub, source, r) for r in read_csv(source)]
        else:
            found = False
            for sub in self._subsets():
                p = source / f"gpqa_{sub}.csv"
                if p.is_file():
                    found = True
                    rows += [(sub, p, r) for r in read_csv(p)]
            if not found:
                raise DataError(f"gpqa: none of gpqa_{{{','.join(self._subsets())}}}.csv in {source}")
        items = []
        for sub, path, row in rows:
            q = field(row, "Question", path)
            correct = field(row, "Correct Answer", path)
            wrong = [field(row, f"Incorrect Answer {i}", path) for i in (1, 2, 3)]
            if any(is_missing(x) for x in [q, correct, *wrong]):
                raise DataError(f"{path}:{row['__line__']}: empty question or answer field")
            rid = str(row.get("Record ID") or row["__line__"])
            opts = [str(correct).strip()] + [str(w).strip() for w in wrong]
            order = list(range(4))
            stable_rng(seed, "gpqa", sub, rid).shuffle(order)
            shown = [opts[i] for i in order]
            gold = order.index(0)
            prompt = (
                "Answer this multiple-choice question. Think it through briefly, then end with a line "
                f"'Answer: <letter>'.\n\nQuestion: {str(q).strip()}\n\n{format_options(shown)}"
            )
            items.append(
                Item(
                    id=f"{sub}-{rid}",
                    prompt=prompt,
                    reference=gold,
                    categories={"subset": sub, "domain": str(row.get("High-level domain", "") or "")},
                    meta={"options": shown},
                )
            )
        return items

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        k = parse_choice(responses[0], 4, item.meta["options"])
        return {"parsed": None if k is None else LETTERS[k], "gold": LETTERS[item.reference], "score": float(k == item.reference)}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(records)
        subs = out.get("by_subset", {})
        out["accuracy"] = out["score"]
        if subs:
            out["score"] = _mean(list(subs.values()))
        return out
