"""Shop-MMLU / Shopping MMLU (Jin et al. 2024) generation tasks, scored by cosine similarity of
all-MiniLM-L6-v2 sentence embeddings (paper Table 16's "Reviews & QA").

Official layout (``data.zip`` of the Shopping MMLU repository): ``generation/<task>_dataset.json``,
JSON lines with ``input_field`` (the full instruction) and ``target_field`` (a string, or a list of
strings whose similarities are averaged). Tasks scored by ROUGE/BLEU (``*extraction*``,
``*translation*``) and the multilingual ones are skipped unless named explicitly with ``tasks``.

Online source: Shopping MMLU is not on the Hugging Face Hub; its ``data.zip`` is in the authors'
repository (``KL4805/ShoppingMMLU``). Without local data that zip is fetched and unpacked into the
cache; ``--data`` may also point at the zip itself.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext
from personafuse.evaluation.data import DataError, Remote, cache_dir, fetch, field, read_json_or_jsonl

SKIP = ("extraction", "translation", "multilingual")
REMOTE = Remote("github", "KL4805/ShoppingMMLU", "main")


def unpack(zip_path: Path) -> Path:
    """The folder holding ``generation/`` inside the official ``data.zip``, unpacked once into the
    cache (keyed by the zip's content, so a new release unpacks afresh)."""
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()[:16]
    dest = cache_dir() / "unpacked" / f"shopmmlu-{digest}"
    if not (dest / ".complete").is_file():
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(dest)  # zipfile drops absolute and ".." parts of member names
        except zipfile.BadZipFile as e:
            raise DataError(f"shopmmlu: {zip_path} is not a readable zip ({e})") from None
        (dest / ".complete").touch()
    gens = sorted(d for d in dest.rglob("generation") if d.is_dir() and "__MACOSX" not in d.parts)
    if not gens:
        raise DataError(f"shopmmlu: {zip_path} holds no generation/ folder")
    return gens[0].parent


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
            source = unpack(fetch(REMOTE, "data.zip", bench=self.name))
        elif source.suffix == ".zip":
            source = unpack(source)
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
