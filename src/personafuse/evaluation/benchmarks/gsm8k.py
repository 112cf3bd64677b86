"""GSM8K (Cobbe et al. 2021): grade-school maths, exact match of the final number.

Official file: ``test.jsonl`` with ``question`` and ``answer`` ending in ``#### N``. We ask for the
final answer after ``####`` and read the model's number in this order: the last ``#### N``, the last
"answer is N"/"Answer: N", the last ``\\boxed{N}``, else the last number in the reply. Numbers are
compared as exact fractions after removing thousands separators, currency and percent signs, so
"$1,000.00" equals "1000".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext
from personafuse.evaluation.data import DataError, field, hub_path, read_jsonl

HUB_ID = "openai/gsm8k"
# Thousands groups must be exact ("1,300"), so "12, wait" reads as 12.
_NUM = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|[-−]?\$?\.\d+"


def normalize_number(s: str) -> Fraction | None:
    """``"$1,234.50"`` → Fraction(2469, 2); ``None`` when ``s`` holds no number."""
    t = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".").rstrip("%")
    t = t.replace("−", "-")
    if not t:
        return None
    try:
        if "/" in t:
            a, b = t.split("/", 1)
            return Fraction(a) / Fraction(b)
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: str) -> str | None:
    """The final numeric answer in a model reply (as written), or ``None``.

    Order: the last ``#### N``; else the last "answer is ..."/"Answer: ..." statement, taking the
    last number of that sentence (so "the answer is 8 + 8 = 16" gives 16); else the last
    ``\\boxed{N}``; else the last number anywhere.
    """
    if not text:
        return None
    t = text.replace("**", "")
    m = re.findall(rf"####\s*({_NUM})", t)
    if m:
        return m[-1].strip()
    stmts = list(re.finditer(r"(?i)answer\s*(?:is|:|=)", t))
    if stmts:
        rest = t[stmts[-1].end() :]
        sentence = re.split(r"\n|\.(?:\s|$)", rest, maxsplit=1)[0]
        nums = re.findall(_NUM, sentence)
        if nums:
            return nums[-1].strip()
    m = re.findall(rf"\\boxed\{{\s*({_NUM})\s*\}}", t)
    if m:
        return m[-1].strip()
    m = re.findall(_NUM, t)
    return m[-1].strip() if m else None


def gold_number(answer: str) -> str:
    if "####" not in answer:
        raise ValueError("answer has no '#### N' line")
    return answer.split("####")[-1].strip()


def exact_match(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    a, b = normalize_number(pred), normalize_number(gold)
    return a is not None and a == b


class GSM8K(Benchmark):
    name = "gsm8k"
    title = "GSM8K"
    folder = "gsm8k"
    max_new_tokens = 384

    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            from datasets import load_dataset

            rows = [dict(r, __line__=i + 1) for i, r in enumerate(load_dataset(hub_path(HUB_ID), "main", split="test"))]
            path: Any = HUB_ID
        else:
            path = source / "test.jsonl" if source.is_dir() else source
            rows = read_jsonl(path)
        items = []
        for row in rows:
            q = field(row, "question", path, kind=str)
            a = field(row, "answer", path, kind=str)
            try:
                gold = gold_number(a)
            except ValueError:
                raise DataError(f"{path}:{row['__line__']}: field 'answer' has no '#### N' final line") from None
            prompt = (
                f"Solve this maths word problem. Work it out step by step, then give the final answer "
                f"on its own last line as '#### <number>'.\n\nProblem: {q}"
            )
            items.append(Item(id=str(row.get("id", row["__line__"])), prompt=prompt, reference=gold))
        return items

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        pred = extract_number(responses[0])
        return {"parsed": pred, "gold": item.reference, "score": float(exact_match(pred, item.reference))}
