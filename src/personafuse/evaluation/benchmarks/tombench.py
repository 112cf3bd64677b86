"""ToMBench (Chen et al. 2024): theory-of-mind multiple choice, 20 files (8 classic tasks plus the
ability-oriented ATOMS files), bilingual fields.

Reference: zhchen18/ToMBench@4f491f0784ed31ef93a8837615fbc48f885cf78d — ``prompts.py`` (system and
user prompts), ``run_api.py`` / ``run_huggingface.py`` (``format_prompt_4``, ``format_prompt_2``, the
five tries) and ``get_results.py`` (``extract_answer``, ``most_common_element``, the per-task and
per-ability accuracies). The default protocol is theirs:

* Language: English by default, where their scripts default to ``--language zh`` (run_api.py,
  run_huggingface.py argparse): PersonaFuse's models and training data are English, and the English
  fields are the benchmark's own (bilingual) release; ``-o tombench.language=zh`` runs theirs.
* Prompt: a chat of the official system prompt (``SystemEvaluatePrompt_{en,zh}``, or the ``_cot``
  one with ``-o tombench.cot=true``) and the official user prompt
  (``UserEvaluatePrompt{4,2}Choices_{en,zh}``), both read at run time from the benchmark's own
  ``prompts.py`` (``prompts.py.txt`` in a benchdata folder, else the repository's file), parsed with
  ``ast`` — never executed. Zero-shot, chat template, greedy (their API run uses temperature 0).
* Options: each option with its own "A. " ... "D. " removed (``str.replace``, as theirs), shuffled
  five times per item; an item is a two-option item when ``选项C`` is missing (their
  ``d['选项C'] != None``, with the file's NaN read as missing), and gets the two-option prompt.
* Extraction (``extract_answer``): ``[[A]]``..``[[D]]`` (checked in that order), then ``[A]``..``[D]``,
  then the last capital A–D anywhere in the reply, else "A" — an unparsed reply counts as the
  shown option A. The shown letter is mapped back to the original one by option text (the first
  original option with that text); on a two-option item a shown C/D maps to nothing (wrong).
* Vote: the most common mapped answer of the five, a tie going to the one seen first.
* Aggregation: accuracy per task file (all 20, the reference's ``tasks``) and per raw ABILITY cell
  (the reference's ``abilities``). The paper (Table 13) reports task-oriented (mean over the 8
  classic task files), ability-oriented (mean over the 6 ability dimensions; a cell naming two
  abilities counts for both) and their average, which is ``score``.

Beside it, ``*_freetext`` keys score the same replies with our free-text parser (:func:`parse_choice`).

Known differences: one official answer reads "A. " (``Knowledge-Attention Links.jsonl`` line 11);
their string comparison can never match it, we read its letter. Their shuffles come from one
``random.seed(42)`` stream in ``os.listdir`` order (not reproducible across machines); ours are
seeded per item. Their HF run caps prompt + reply at 4096 tokens, ours the reply at 4096.

Online source: ToMBench is not on the Hugging Face Hub in its official form, so without local data
the 20 files and ``prompts.py`` are fetched from the authors' repository at the pinned commit.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, Reference, ScoreContext, mean
from personafuse.evaluation.benchmarks.choice import LETTERS, parse_choice, weighted_stderr
from personafuse.evaluation.data import DataError, Remote, fetch, is_missing, read_jsonl, stable_rng

COMMIT = "4f491f0784ed31ef93a8837615fbc48f885cf78d"
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
REMOTE = Remote("github", "zhchen18/ToMBench", COMMIT)
PROMPT_FILES = ("prompts.py.txt", "prompts.py")  # benchdata's renamed copy, the repository's own name
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


def read_prompts(path: Path) -> dict[str, str]:
    """The string constants of the official ``prompts.py`` (``NAME = \"\"\"...\"\"\"``), read with
    ``ast`` so nothing in the file runs."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise DataError(f"{path}:{e.lineno}: not a Python file of prompt constants ({e.msg})") from None
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def extract_answer(text: str) -> str:
    """The shown letter as get_results.py:extract_answer reads it (zhchen18/ToMBench@4f491f0):
    ``[[A]]``..``[[D]]`` in that order, then ``[A]``..``[D]``, then the last capital A-D, else "A"."""
    for pattern in ("[[{}]]", "[{}]"):
        for x in "ABCD":
            if pattern.format(x) in text:
                return x
    for ch in reversed(text):
        if ch in "ABCD":
            return ch
    return "A"


def fell_back(text: str) -> bool:
    """True when extract_answer found no letter at all and answered its default "A"."""
    return not any(ch in "ABCD" for ch in text)


def most_common(votes: Sequence[str]) -> str:
    """get_results.py:most_common_element: the most frequent vote, a tie going to the first seen."""
    counts = Counter(votes)
    return max(counts, key=lambda v: counts[v])


def majority_vote(votes: Sequence[int | None]) -> int | None:
    """Most common non-None vote; a tie goes to the vote seen first. ``None`` if all are None."""
    valid = [v for v in votes if v is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(v for v in valid if counts[v] == best)


def letter_map(shown: Sequence[tuple[str, str]], original: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Shown letter → original letter, by text as format_prompt_4/_2 build ``map`` (first original
    option with the same text); letters not shown (C/D of a two-option item) map to ""."""
    out = dict.fromkeys("ABCD", "")
    for k, (_, text) in enumerate(shown):
        out[LETTERS[k]] = next(o for o, t in original if t == text)
    return out


class ToMBench(Benchmark):
    name = "tombench"
    title = "ToMBench"
    subscores = ("score", "task_oriented", "ability_oriented")
    score_variants = ("accuracy", "score_freetext")
    group = "Social-emotional intelligence"
    order = 30
    grid_default = True
    generations_per_item = 5  # five shuffles of the options (-o tombench.shuffles=N)
    folder = "tombench"
    # run_huggingface.py generates with max_length=4096 (prompt + reply); we cap the reply alone.
    max_new_tokens = 4096
    reference = Reference(
        repo="zhchen18/ToMBench",
        commit=COMMIT,
        files=("prompts.py", "run_api.py", "run_huggingface.py", "get_results.py"),
        note="5 shuffled tries per item, majority vote; extract_answer with its default 'A'",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.n_shuffles = int(self.options.get("shuffles", self.generations_per_item))
        self.language = str(self.options.get("language", "en"))
        self.cot = str(self.options.get("cot", "false")).lower() in ("1", "true", "yes")
        if self.language not in FIELDS:
            raise DataError(f"tombench: language must be 'en' or 'zh', got {self.language!r}")
        self.templates: dict[str, str] | None = None
        self.prompts_source = ""

    # ---- data -------------------------------------------------------------------------
    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            files = [fetch(REMOTE, f"data/{name}.jsonl", bench=self.name) for name in sorted(TASK_FILES + ABILITY_FILES)]
        else:
            files = [source] if source.is_file() else sorted(source.glob("*.jsonl"))
        if not files:
            raise DataError(f"tombench: no .jsonl files in {source}")
        self._load_templates(source)
        return self._items(files)

    def _template_names(self) -> tuple[str, str, str]:
        lang = self.language
        return (f"SystemEvaluatePrompt_{lang}{'_cot' if self.cot else ''}", f"UserEvaluatePrompt4Choices_{lang}", f"UserEvaluatePrompt2Choices_{lang}")

    def _load_templates(self, source: Path | None) -> None:
        path = self._prompts_path(source)
        consts = read_prompts(path)
        names = self._template_names()
        missing = [n for n in names if n not in consts]
        if missing:
            raise DataError(f"{path}: no string constant {', '.join(missing)} (the official prompts.py defines them)")
        self.templates = {"system": consts[names[0]], "user4": consts[names[1]], "user2": consts[names[2]]}
        self.prompts_source = f"{path.name}:{names[0]},{names[1]},{names[2]}"

    def _prompts_path(self, source: Path | None) -> Path:
        if self.options.get("prompts"):
            p = Path(str(self.options["prompts"]))
            if not p.is_file():
                raise DataError(f"tombench: prompts file {p} not found (given as -o tombench.prompts)")
            return p
        if source is not None:
            folder = source if source.is_dir() else source.parent
            for d in (folder, folder.parent):  # a benchdata folder, or the repository's data/
                for name in PROMPT_FILES:
                    if (d / name).is_file():
                        return d / name
        try:
            return fetch(REMOTE, "prompts.py", bench=self.name)
        except DataError as e:
            raise DataError(f"tombench: no prompts.py(.txt) beside {source}, and {e}; pass -o tombench.prompts=PATH") from None

    def _items(self, files: Sequence[Path]) -> list[Item]:
        items: list[Item] = []
        for path in files:
            for row in read_jsonl(path):
                items.append(self._item(path, row))
        return items

    def _item(self, path: Path, row: Mapping[str, Any]) -> Item:
        f = FIELDS[self.language]
        line = row["__line__"]
        loc = f"{path}:{line}"
        for k in (f["story"], f["question"]):
            if k not in row or is_missing(row[k]):
                raise DataError(f"{loc}: missing field {k!r}")
        ans_key = next((k for k in ANSWER_KEYS if k in row), None)
        if ans_key is None:
            raise DataError(f"{loc}: missing field 'ANSWER'")
        # One official answer reads "A. "; their string comparison would count it always wrong.
        answer = str(row[ans_key]).strip()[:1].upper()
        # Two options when 选项C is missing, whatever the language (their d['选项C'] != None).
        n = 2 if is_missing(row.get("选项C")) else 4
        options = []
        for i, k in enumerate(f["options"][:n]):
            v = row.get(k)
            if is_missing(v):
                raise DataError(f"{loc}: missing field {k!r} (a {n}-option item)")
            options.append((LETTERS[i], str(v).replace(f"{LETTERS[i]}. ", "")))
        if answer not in [o[0] for o in options]:
            raise DataError(f"{loc}: answer {row[ans_key]!r} is not among the present options")
        ab_key = next((k for k in ABILITY_KEYS if k in row), None)
        raw_ability = str(row[ab_key]) if ab_key else ""
        abilities = split_abilities(raw_ability) if ab_key else []
        return Item(
            id=f"{path.stem}-{line}",  # INDEX repeats within some files; the line is unique
            prompt="",
            reference={"answer": answer, "options": options},
            categories={
                "task": path.stem,
                "ability": abilities,
                "dimension": sorted({a.split(":")[0] for a in abilities}),
                "ability_raw": raw_ability,
            },
            meta={"story": row[f["story"]], "question": row[f["question"]]},
        )

    # ---- generation -------------------------------------------------------------------
    def shuffles(self, item: Item, seed: int) -> list[list[tuple[str, str]]]:
        """``n_shuffles`` orderings of the options, fixed by ``seed`` and the item id (theirs draw
        from one global ``random.seed(42)`` stream in ``os.listdir`` order, which no run can replay)."""
        rng = stable_rng(seed, "tombench", item.id)
        out = []
        for _ in range(self.n_shuffles):
            opts = list(item.reference["options"])
            rng.shuffle(opts)
            out.append(opts)
        return out

    def _prompt(self, item: Item, opts: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        if self.templates is None:
            raise RuntimeError("tombench: load() the items first (it reads the official prompts)")
        texts = [o[1] for o in opts]
        fields = {f"choice_{x}": t for x, t in zip("abcd", texts, strict=False)}
        template = self.templates["user4" if len(texts) == 4 else "user2"]
        user = template.format(story=item.meta["story"], question=item.meta["question"], **fields)
        return [{"role": "system", "content": self.templates["system"]}, {"role": "user", "content": user}]

    def prompts(self, item: Item) -> list[list[dict[str, str]]]:
        seed = int(self.options.get("seed", 0))
        return [self._prompt(item, opts) for opts in self.shuffles(item, seed)]

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "prompt_source": self.prompts_source,
            "chat_template": True,
            "shots": 0,
            "cot": self.cot,
            "language": self.language,
            "language_default_reason": "reference scripts default to zh (run_api.py --language); en here: "
            "PersonaFuse's models and data are English, the English fields are the official release's",
            "temperature": 0.0,
            "tries": self.n_shuffles,
            "shuffle": "options shuffled per try, seeded by (seed, item id)",
            "reference_max_length": 4096,
            "answer_extraction": "get_results.py:extract_answer ([[X]], [X], last capital A-D, else 'A')",
            "unparsed": "counts as the shown option A (extract_answer's default)",
            "aggregation": "majority of 5; accuracy per task file and ability; score = mean(task_oriented, ability_oriented)",
        }

    # ---- scoring ----------------------------------------------------------------------
    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        seed = int(self.options.get("seed", 0))
        original = item.reference["options"]
        letters = [o[0] for o in original]
        votes: list[str] = []
        free: list[int | None] = []
        for opts, resp in zip(self.shuffles(item, seed), responses, strict=True):
            votes.append(letter_map(opts, original)[extract_answer(resp)])
            k = parse_choice(resp, len(opts), [o[1] for o in opts])
            free.append(None if k is None else letters.index(letter_map(opts, original)[LETTERS[k]]))
        win = most_common(votes)
        free_win = majority_vote(free)
        gold = item.reference["answer"]
        return {
            "parsed": win or None,
            "votes": [v or None for v in votes],
            "n_fallback": sum(fell_back(r) for r in responses),
            "gold": gold,
            "score": float(win == gold),
            "parsed_freetext": None if free_win is None else letters[free_win],
            "score_freetext": float(free_win is not None and letters[free_win] == gold),
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, suffix in (("score", ""), ("score_freetext", "_freetext")):
            part = _oriented(records, key)
            out.update({k + suffix: v for k, v in part.items()})
        by_raw: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_raw[str((r.get("categories") or {}).get("ability_raw", ""))].append(_x(r, "score"))
        return {
            **out,
            "n": len(records),
            "n_unparsed": sum(1 for r in records if r.get("parsed") is None),
            "n_fallback_replies": sum(int(r.get("n_fallback") or 0) for r in records),
            **self.breakdowns(records),
            "by_ability_raw": {k: round(mean(v), 6) for k, v in sorted(by_raw.items())},
        }


def _x(r: Mapping[str, Any], key: str) -> float:
    return float(r.get(key) or 0.0)


def _oriented(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Task-oriented, ability-oriented, their mean (``score``) and the micro ``accuracy``, each with
    its standard error (items weighted by the groups they count in; see weighted_stderr)."""
    xs = [_x(r, key) for r in records]
    cats = [r.get("categories") or {} for r in records]
    tasks: dict[str, list[int]] = defaultdict(list)
    dims: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cats):
        if c.get("task") in TASK_FILES:
            tasks[str(c["task"])].append(i)
        for d in c.get("dimension") or []:
            if d in DIMENSIONS:
                dims[d].append(i)
    parts, values = [], []
    out: dict[str, Any] = {}
    for name, groups in (("task_oriented", tasks), ("ability_oriented", dims)):
        w = [0.0] * len(xs)
        for idx in groups.values():
            for i in idx:
                w[i] += 1.0 / (len(groups) * len(idx))
        value = mean([mean([xs[i] for i in idx]) for idx in groups.values()]) if groups else None
        out[name] = value
        out[f"{name}_stderr"] = weighted_stderr(xs, w) if groups else None
        if groups:
            parts.append(w)
            values.append(value)
    n = max(len(xs), 1)
    score_w = [sum(p[i] for p in parts) / len(parts) for i in range(len(xs))] if parts else [1.0 / n] * len(xs)
    out["score"] = mean(values) if values else mean(xs)
    out["stderr"] = weighted_stderr(xs, score_w)
    out["accuracy"] = mean(xs)
    out["accuracy_stderr"] = weighted_stderr(xs, [1.0 / n] * len(xs))
    return out
