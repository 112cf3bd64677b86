"""ToMBench (Chen et al. 2024): theory-of-mind multiple choice, 20 files (8 classic tasks plus the
ability-oriented ATOMS files), bilingual fields.

Official fields: ``STORY``/``QUESTION``/``OPTION-A..D`` (English), ``故事``/``问题``/``选项A..D``
(Chinese), ``答案\\nANSWER`` and ``能力\\nABILITY``. Two-option items store C/D as NaN; one answer reads
"A. ". Each item is asked five times with its options shuffled by a fixed seed; the vote (mapped back
to the original letters) decides, ties going to the answer seen first.

Breakdowns (paper Table 13): accuracy per task file; per ability (an ABILITY cell can name two, e.g.
"Belief: Content false beliefs Belief: Second-order beliefs", and counts for both) and per ability
dimension (Emotion, Desire, Intention, Knowledge, Belief, Non-literal communication). ``task_oriented``
is the mean accuracy over the 8 classic task files, ``ability_oriented`` the mean over the six ability
dimensions, and the headline ``score`` their mean.

Online source: ToMBench is not on the Hugging Face Hub in its official form, so without local data
the 20 files are fetched from the authors' repository (``zhchen18/ToMBench``, ``data/*.jsonl``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext, _mean
from personafuse.evaluation.benchmarks.choice import LETTERS, format_options, parse_choice
from personafuse.evaluation.data import DataError, Remote, fetch, is_missing, read_jsonl, stable_rng

TASK_FILES = (
    "Unexpected Outcome Test",
    "Scalar Implicature Test",
    "Persuasion Story Task",
    "False Belief Task",
    "Ambiguous Story Task",
    "Hinting Task Test",
    "Strange Story Task",
    "Faux-pas Recognition Test",
)
# The ability-oriented (ATOMS) files; with TASK_FILES, the 20 files of the official data/ folder.
ABILITY_FILES = (
    "Completion of Failed Actions",
    "Discrepant Desires",
    "Discrepant Emotions",
    "Discrepant Intentions",
    "Emotion Regulation",
    "Hidden Emotions",
    "Knowledge-Attention Links",
    "Knowledge-Pretend Play Links",
    "Moral Emotions",
    "Multiple Desires",
    "Percepts-Knowledge Links",
    "Prediction of Actions",
)
REMOTE = Remote("github", "zhchen18/ToMBench", "main")
DIMENSIONS = ("Emotion", "Desire", "Intention", "Knowledge", "Belief", "Non-Literal Communication")
FIELDS = {
    "en": {"story": "STORY", "question": "QUESTION", "options": ["OPTION-A", "OPTION-B", "OPTION-C", "OPTION-D"]},
    "zh": {"story": "故事", "question": "问题", "options": ["选项A", "选项B", "选项C", "选项D"]},
}
ANSWER_KEYS = ("答案\nANSWER", "ANSWER", "答案")
ABILITY_KEYS = ("能力\nABILITY", "ABILITY", "能力")


def split_abilities(cell: str) -> list[str]:
    """"Belief: A Belief: B" → ["Belief: A", "Belief: B"], with dimension names normalised."""
    parts = re.split(r"\s+(?=(?:Emotion|Desire|Intention|Knowledge|Belief|Non-[Ll]iteral [Cc]ommunication):)", cell.strip())
    out = []
    for p in parts:
        dim, _, rest = p.partition(":")
        dim = _dimension(dim)
        out.append(f"{dim}: {rest.strip()}" if rest else dim)
    return out


def _dimension(name: str) -> str:
    n = name.strip().lower()
    for d in DIMENSIONS:
        if n == d.lower():
            return d
    return name.strip()


def majority_vote(votes: Sequence[int | None]) -> int | None:
    """Most common non-None vote; a tie goes to the vote seen first. ``None`` if all are None."""
    valid = [v for v in votes if v is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(v for v in valid if counts[v] == best)


class ToMBench(Benchmark):
    name = "tombench"
    title = "ToMBench"
    folder = "tombench"
    max_new_tokens = 16

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.n_shuffles = int(self.options.get("shuffles", 5))
        self.language = str(self.options.get("language", "en"))
        if self.language not in FIELDS:
            raise DataError(f"tombench: language must be 'en' or 'zh', got {self.language!r}")

    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            files = [fetch(REMOTE, f"data/{name}.jsonl", bench=self.name) for name in sorted(TASK_FILES + ABILITY_FILES)]
        else:
            files = [source] if source.is_file() else sorted(source.glob("*.jsonl"))
        if not files:
            raise DataError(f"tombench: no .jsonl files in {source}")
        return self._items(files)

    def _items(self, files: Sequence[Path]) -> list[Item]:
        f = FIELDS[self.language]
        items: list[Item] = []
        for path in files:
            task = path.stem
            for row in read_jsonl(path):
                line = row["__line__"]
                loc = f"{path}:{line}"
                for k in (f["story"], f["question"]):
                    if k not in row or is_missing(row[k]):
                        raise DataError(f"{loc}: missing field {k!r}")
                ans_key = next((k for k in ANSWER_KEYS if k in row), None)
                if ans_key is None:
                    raise DataError(f"{loc}: missing field 'ANSWER'")
                answer = str(row[ans_key]).strip()[:1].upper()  # "A. " → "A"
                options = []
                for i, k in enumerate(f["options"]):
                    v = row.get(k)
                    if not is_missing(v):
                        options.append((LETTERS[i], str(v).strip()))
                if len(options) < 2:
                    raise DataError(f"{loc}: fewer than two options")
                if answer not in [o[0] for o in options]:
                    raise DataError(f"{loc}: answer {row[ans_key]!r} is not among the present options")
                ab_key = next((k for k in ABILITY_KEYS if k in row), None)
                abilities = split_abilities(str(row[ab_key])) if ab_key else []
                dims = sorted({a.split(":")[0] for a in abilities})
                items.append(
                    Item(
                        id=f"{task}-{line}",  # INDEX repeats within some files; the line is unique
                        prompt="",
                        reference={"answer": answer, "options": options},
                        categories={"task": task, "ability": abilities, "dimension": dims},
                        meta={"story": str(row[f["story"]]).strip(), "question": str(row[f["question"]]).strip()},
                    )
                )
        return items

    def shuffles(self, item: Item, seed: int) -> list[list[tuple[str, str]]]:
        """``n_shuffles`` orderings of the options, fixed by ``seed`` and the item id."""
        rng = stable_rng(seed, "tombench", item.id)
        out = []
        for _ in range(self.n_shuffles):
            opts = list(item.reference["options"])
            rng.shuffle(opts)
            out.append(opts)
        return out

    def _prompt(self, item: Item, opts: list[tuple[str, str]]) -> str:
        listing = format_options([o[1] for o in opts])
        if self.language == "zh":
            return (
                f"阅读下面的故事并回答问题。\n\n故事：{item.meta['story']}\n\n问题：{item.meta['question']}\n{listing}\n\n"
                "请只输出你选择的字母，格式为 [[X]]。"
            )
        return (
            "Read the story and answer the question about what the people in it think, want or feel.\n\n"
            f"Story: {item.meta['story']}\n\nQuestion: {item.meta['question']}\n{listing}\n\n"
            "Give only the letter of your choice in the form [[X]]."
        )

    def prompts(self, item: Item) -> list[str]:
        seed = int(self.options.get("seed", 0))
        return [self._prompt(item, opts) for opts in self.shuffles(item, seed)]

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        seed = int(self.options.get("seed", 0))
        votes: list[int | None] = []
        original = [o[0] for o in item.reference["options"]]
        for opts, resp in zip(self.shuffles(item, seed), responses, strict=True):
            k = parse_choice(resp, len(opts), [o[1] for o in opts])
            # Map the shown letter back to the original option letter.
            votes.append(None if k is None else original.index(opts[k][0]))
        win = majority_vote(votes)
        vote_letters = [None if v is None else original[v] for v in votes]
        return {
            "parsed": None if win is None else original[win],
            "votes": vote_letters,
            "gold": item.reference["answer"],
            "score": float(win is not None and original[win] == item.reference["answer"]),
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        by = self.breakdowns(records)
        tasks = by.get("by_task", {})
        dims = by.get("by_dimension", {})
        task_acc = [tasks[t] for t in TASK_FILES if t in tasks]
        dim_acc = [dims[d] for d in DIMENSIONS if d in dims]
        to = _mean(task_acc) if task_acc else None
        ao = _mean(dim_acc) if dim_acc else None
        parts = [x for x in (to, ao) if x is not None]
        return {
            "score": _mean(parts) if parts else _mean([float(r.get("score") or 0) for r in records]),
            "task_oriented": to,
            "ability_oriented": ao,
            "accuracy": _mean([float(r.get("score") or 0) for r in records]),
            "n": len(records),
            "n_unparsed": sum(1 for r in records if r.get("parsed") is None),
            **by,
        }
