"""Shop-MMLU / Shopping MMLU (Jin et al. 2024) generation tasks, scored by cosine similarity of
all-MiniLM-L6-v2 sentence embeddings (paper Table 16's "Reviews & QA").

Official layout (``data.zip`` of the Shopping MMLU repository): ``generation/<task>_dataset.json``,
JSON lines with ``input_field`` (the full instruction) and ``target_field`` (a string, or a list of
strings whose similarities are averaged). Tasks scored by ROUGE/BLEU (``*extraction*``,
``*translation*``) and the multilingual ones are skipped unless named explicitly with ``tasks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext
from personafuse.evaluation.data import DataError, field, read_json_or_jsonl

SKIP = ("extraction", "translation", "multilingual")


class ShopMMLU(Benchmark):
    name = "shopmmlu"
    title = "Shop-MMLU"
    folder = "shopmmlu"
    max_new_tokens = 128
    needs_embedder = True

    def _files(self, source: Path) -> list[Path]:
        if source.is_file():
            return [source]
        gen = source / "generation" if (source / "generation").is_dir() else source
        files = sorted(gen.glob("*_dataset.json")) or sorted(gen.glob("*.json")) + sorted(gen.glob("*.jsonl"))
        wanted = self.options.get("tasks")
        if wanted:
            names = [w.strip() for w in (wanted.split(",") if isinstance(wanted, str) else wanted)]
            files = [f for f in files if f.stem.removesuffix("_dataset") in names]
        else:
            files = [f for f in files if not any(s in f.stem for s in SKIP)]
        if not files:
            raise DataError(f"shopmmlu: no generation *_dataset.json files in {gen}")
        return files

    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            raise DataError("shopmmlu: pass --data pointing at the unzipped Shopping MMLU data/ folder (or a generation file)")
        items = []
        for path in self._files(source):
            task = path.stem.removesuffix("_dataset")
            for row in read_json_or_jsonl(path):
                inp = field(row, "input_field", path, kind=str)
                tgt = field(row, "target_field", path, kind=(str, list))
                items.append(Item(id=f"{task}-{row['__line__']}", prompt=inp, reference=tgt, categories={"task": task}))
        return items

    def score_batch(self, items: Sequence[Item], responses: Sequence[Sequence[str]], ctx: ScoreContext) -> list[dict[str, Any]]:
        if ctx.embedder is None:
            raise RuntimeError("shopmmlu needs a sentence embedder (the runner creates all-MiniLM-L6-v2)")
        gens = [r[0].strip() for r in responses]
        # Embed every generation and every reference once, then score.
        refs: list[str] = []
        spans = []
        for it in items:
            tg = [it.reference] if isinstance(it.reference, str) else [str(x) for x in it.reference]
            spans.append((len(refs), len(refs) + len(tg)))
            refs.extend(tg)
        g = ctx.embedder.encode(gens)
        r = ctx.embedder.encode(refs)
        out = []
        for i, (a, b) in enumerate(spans):
            sims = (r[a:b] @ g[i]).tolist()  # both L2-normalised: dot = cosine
            score = sum(sims) / len(sims)
            out.append({"parsed": gens[i], "score": round(float(score), 6)})
        return out
