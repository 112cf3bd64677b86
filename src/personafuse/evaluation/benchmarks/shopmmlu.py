"""Shop-MMLU / Shopping MMLU (Jin et al. 2024) generation tasks, scored by cosine similarity of
all-MiniLM-L6-v2 sentence embeddings (paper Table 16's "Reviews & QA").

Reference: KL4805/ShoppingMMLU@7b118da15635e0d61c45fe1713420a344ac5b738. Its README presents two
harnesses side by side; we follow the skill-wise one (``skill_wise_eval/``), which scores a skill
"as a whole" (the form of the paper's Table 16), and note where the task-wise one differs:

* Prompt (``hf_skill_inference.py``): the official system prompt (the module constant
  ``system_prompt``, READ at run time from that file, parsed with ``ast``, never executed) followed
  directly by the item's ``input_field``. They send it as a raw completion, and so do we
  (``chat_template = False``; ``-o shopmmlu.chat_template=true`` sends it as one user message). Zero-shot, greedy.
* Generation length: 100 new tokens for non-multiple-choice items (``hf_skill_inference.py``; the
  task-wise ``hf_generation.py`` uses 128).
* Item score (``skill_wise_eval/metrics.py:sent_transformer``): cosine similarity of the reply's and
  the reference's all-MiniLM-L6-v2 embeddings; a list target averages over its references; a
  negative value is clamped to 0. ``cosine`` keeps the unclamped value (``hf_generation.py``'s).
* Aggregation (``skill_evaluation.py``): the mean per task, then ``task_mean`` = the mean of the
  per-task scores (their ``track_wise``), with its standard error. ``score`` is the paper's number:
  the mean item similarity over the loaded (review/QA) tasks; ``score_unclamped`` beside it.

Data: either ``generation/<task>_dataset.json`` (JSON lines, ``input_field``/``target_field``; the
metric follows the task name as in ``hf_generation.py``: ``*extraction*`` ROUGE-L, ``*translation*``
BLEU, ``*multilingual*`` the multilingual MiniLM — those are not scored here and are skipped unless
named, which is an error) or a skill file ``skills/<skill>.json`` (``input_field``, ``output_field``,
``task_name``, ``task_type``, ``metric``; ``-o shopmmlu.skill=NAME``), of which the
``sent-transformer`` rows are kept. ``-o shopmmlu.tasks=a,b`` selects tasks.

Online source: Shopping MMLU is not on the Hugging Face Hub; its ``data.zip`` is in the authors'
repository. Without local data that zip is fetched at the pinned commit and unpacked into the
cache; ``--data`` may also point at the zip itself.
"""

from __future__ import annotations

import ast
import hashlib
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, Reference, ScoreContext, mean, stderr
from personafuse.evaluation.benchmarks.choice import weighted_stderr
from personafuse.evaluation.data import DataError, Remote, cache_dir, fetch, field, read_json_or_jsonl

COMMIT = "7b118da15635e0d61c45fe1713420a344ac5b738"
REMOTE = Remote("github", "KL4805/ShoppingMMLU", COMMIT)
PROMPT_FILE = "skill_wise_eval/hf_skill_inference.py"
PROMPT_NAMES = ("hf_skill_inference.py.txt", "hf_skill_inference.py")  # a renamed copy, the repository's name
EMBEDDING_METRIC = "sent-transformer"


def task_metric(task: str) -> str:
    """hf_generation.py's metric for a generation task, chosen by its name."""
    if "extraction" in task:
        return "rougel"
    if "translation" in task:
        return "bleu"
    if "multilingual" in task:
        return "multilingual-sent-transformer"
    return EMBEDDING_METRIC


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


def read_system_prompt(path: Path) -> str:
    """The module-level ``system_prompt = "..."`` of hf_skill_inference.py, read with ``ast``."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise DataError(f"{path}:{e.lineno}: not Shopping MMLU's hf_skill_inference.py ({e.msg})") from None
    for node in tree.body:
        named = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "system_prompt" for t in node.targets)
        if named and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node.value.value
    raise DataError(f"{path}: no string constant system_prompt (the official hf_skill_inference.py defines it)")


def sent_transformer(sims: Sequence[float]) -> float:
    """metrics.py:sent_transformer given the cosines to each reference: their mean, clamped at 0."""
    m = sum(sims) / len(sims)
    return m if m > 0 else 0.0


class ShopMMLU(Benchmark):
    # The reference prompts a raw completion (no chat template); -o shopmmlu.chat_template=true for a chat model.
    chat_template = False
    name = "shopmmlu"
    title = "Shop-MMLU"
    aliases = ("shop-mmlu", "shop")
    score_variants = ("task_mean",)
    group = "Applications"
    order = 80
    folder = "shopmmlu"
    max_new_tokens = 100  # hf_skill_inference.py, non-multiple-choice items
    needs_embedder = True
    reference = Reference(
        repo="KL4805/ShoppingMMLU",
        commit=COMMIT,
        files=(PROMPT_FILE, "skill_wise_eval/skill_evaluation.py", "skill_wise_eval/metrics.py", "task_wise_eval/hf_generation.py"),
        note="skill-wise harness; system_prompt + input_field; sent_transformer (clamped at 0); mean per task, then over tasks",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.system_prompt: str | None = None
        self.prompt_source = ""
        wanted = self.options.get("tasks")
        self.tasks = [w.strip() for w in (wanted.split(",") if isinstance(wanted, str) else wanted)] if wanted else None

    # ---- data -------------------------------------------------------------------------
    def load_items(self, source: Path | None) -> list[Item]:
        origin = source
        if source is None:
            source = unpack(fetch(REMOTE, "data.zip", bench=self.name))
        elif source.suffix == ".zip":
            source = unpack(source)
        skill = self._skill_file(source)
        if skill is None:
            self._files(source)  # no data here is what to say first, before looking for the prompt file
        self._load_prompt(origin)
        items = self._skill_items(skill) if skill else self._generation_items(source)
        if not items:
            raise DataError(f"shopmmlu: no {EMBEDDING_METRIC} items in {skill or source} (tasks={self.tasks})")
        return items

    def _load_prompt(self, origin: Path | None) -> None:
        path = self._prompt_path(origin)
        self.system_prompt = read_system_prompt(path)
        self.prompt_source = f"{path.name}:system_prompt"

    def _prompt_path(self, origin: Path | None) -> Path:
        if self.options.get("prompts"):
            p = Path(str(self.options["prompts"]))
            if not p.is_file():
                raise DataError(f"shopmmlu: prompts file {p} not found (given as -o shopmmlu.prompts)")
            return p
        if origin is not None:
            # data/ (or data.zip) inside a checkout of the repository, or a benchdata-like folder.
            start = origin if origin.is_dir() else origin.parent
            for d in [start, *list(start.parents)[:3]]:
                for sub in ("", "skill_wise_eval"):
                    for n in PROMPT_NAMES:
                        if (d / sub / n).is_file():
                            return d / sub / n
        try:
            return fetch(REMOTE, PROMPT_FILE, bench=self.name)
        except DataError as e:
            raise DataError(f"shopmmlu: no hf_skill_inference.py(.txt) near {origin}, and {e}; pass -o shopmmlu.prompts=PATH") from None

    def _skill_file(self, source: Path) -> Path | None:
        skill = self.options.get("skill")
        if skill:
            p = source / "skills" / f"{skill}.json" if source.is_dir() else source
            if not p.is_file():
                raise DataError(f"shopmmlu: skill file {p} not found (given as -o shopmmlu.skill={skill})")
            return p
        if source.is_file() and source.parent.name == "skills":
            return source
        return None

    def _skill_items(self, path: Path) -> list[Item]:
        items = []
        skill = path.stem
        for row in read_json_or_jsonl(path):
            task = field(row, "task_name", path, kind=str)
            if field(row, "metric", path, kind=str) != EMBEDDING_METRIC or (self.tasks and task not in self.tasks):
                continue  # other metrics need their own scorer and generation length
            inp = field(row, "input_field", path, kind=str)
            tgt = field(row, "output_field", path, kind=(str, list))
            items.append(self._item(f"{skill}-{row['__line__']}", inp, tgt, {"task": task, "skill": skill}))
        return items

    def _generation_items(self, source: Path) -> list[Item]:
        items = []
        for path in self._files(source):
            task = path.stem.removesuffix("_dataset")
            for row in read_json_or_jsonl(path):
                inp = field(row, "input_field", path, kind=str)
                tgt = field(row, "target_field", path, kind=(str, list))
                items.append(self._item(f"{task}-{row['__line__']}", inp, tgt, {"task": task}))
        return items

    def _item(self, qid: str, inp: str, tgt: str | list[Any], cats: dict[str, str]) -> Item:
        if isinstance(tgt, list) and not tgt:
            raise DataError(f"shopmmlu: item {qid}: empty list of references")
        return Item(id=qid, prompt=f"{self.system_prompt}{inp}", reference=tgt, categories=cats)

    def _files(self, source: Path) -> list[Path]:
        if source.is_file():
            return [source]
        gen = source / "generation" if (source / "generation").is_dir() else source
        files = sorted(gen.glob("*_dataset.json")) or sorted(gen.glob("*.json")) + sorted(gen.glob("*.jsonl"))
        if self.tasks:
            files = [f for f in files if f.stem.removesuffix("_dataset") in self.tasks]
            other = [f.stem for f in files if task_metric(f.stem) != EMBEDDING_METRIC]
            if other:
                raise DataError(f"shopmmlu: {', '.join(other)}: the reference scores these with another metric ({task_metric(other[0])}), not {EMBEDDING_METRIC}")
        else:
            files = [f for f in files if task_metric(f.stem) == EMBEDDING_METRIC]
        if not files:
            raise DataError(
                f"shopmmlu: no generation *_dataset.json files in {gen} (Shopping MMLU is not on the Hub: pass --data "
                "with the official data.zip, its unpacked folder or a folder holding shopmmlu/)"
            )
        return files

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "prompt_source": self.prompt_source,
            "shots": 0,
            "temperature": 0.0,
            "embedder": "all-MiniLM-L6-v2",
            "item_score": "metrics.py:sent_transformer (mean cosine over references, clamped at 0)",
            "aggregation": "score = mean item similarity (paper Table 16); task_mean = mean of per-task means (skill_evaluation.py)",
        }

    # ---- scoring ----------------------------------------------------------------------
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
            out.append({"parsed": gens[i], "score": round(sent_transformer(sims), 6), "cosine": round(sum(sims) / len(sims), 6)})
        return out

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        xs = [float(r.get("score") or 0.0) for r in records]
        raw = [float(r.get("cosine", r.get("score")) or 0.0) for r in records]
        tasks = [str((r.get("categories") or {}).get("task", "")) for r in records]
        groups: dict[str, list[float]] = defaultdict(list)
        for x, t in zip(xs, tasks, strict=True):
            groups[t].append(x)
        ws = [1.0 / (len(groups) * len(groups[t])) for t in tasks]
        return {
            "score": mean(xs),
            "stderr": stderr(xs),
            "score_unclamped": mean(raw),
            "stderr_unclamped": stderr(raw),
            "task_mean": mean([mean(v) for v in groups.values()]),
            "task_mean_stderr": weighted_stderr(xs, ws),
            "by_task": {t: round(mean(v), 6) for t, v in sorted(groups.items())},
            "by_task_stderr": {t: round(stderr(v), 6) for t, v in sorted(groups.items())},
            "n": len(records),
            "n_unparsed": sum(1 for r in records if not str(r.get("parsed") or "").strip()),
        }
