"""EmoBench (Sabour et al. 2024): emotional understanding (EU) and emotional application (EA).

Official files: ``EU.jsonl`` (scenario, subject, ``emotion_choices``/``emotion_label``,
``cause_choices``/``cause_label``) and ``EA.jsonl`` (scenario, subject, ``choices``/``label``), both
with ``language`` en/zh. Labels are the choice texts. An EU item counts as correct only when both the
emotion and the cause are right. The headline score is the mean of EU and EA accuracy (paper Table 13).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext, _mean
from personafuse.evaluation.benchmarks.choice import LETTERS, format_options, parse_choice
from personafuse.evaluation.data import DataError, Remote, fetch, field, read_jsonl

HUB_ID = "SahandSab/EmoBench"  # the dataset repo holds the same EU.jsonl / EA.jsonl files
REMOTE = Remote("hf", HUB_ID)


def _eu_prompt(row: Mapping[str, Any], lang: str) -> str:
    emo = format_options(row["emotion_choices"])
    cause = format_options(row["cause_choices"])
    if lang == "zh":
        return (
            f"阅读下面的情景，然后回答两个选择题。\n\n情景：{row['scenario']}\n\n"
            f"问题一：在这个情景结束时，{row['subject']}最可能的感受是什么？\n{emo}\n\n"
            f"问题二：{row['subject']}为什么会有这种感受？\n{cause}\n\n"
            "请只用两行作答，格式如下：\nEmotion: <字母>\nCause: <字母>"
        )
    return (
        "Read the situation below and answer two multiple-choice questions about it.\n\n"
        f"Situation: {row['scenario']}\n\n"
        f"Question 1. How does {row['subject']} most likely feel at the end of this situation?\n{emo}\n\n"
        f"Question 2. What is the main reason {row['subject']} feels that way?\n{cause}\n\n"
        "Reply with two lines and nothing else:\nEmotion: <letter>\nCause: <letter>"
    )


def _ea_prompt(row: Mapping[str, Any], lang: str) -> str:
    opts = format_options(row["choices"])
    if lang == "zh":
        return (
            f"阅读下面的情景，选出最有效的做法。\n\n情景：{row['scenario']}\n\n"
            f"问题：在这种情况下，{row['subject']}最应该怎么做？\n{opts}\n\n请只回答格式：Answer: <字母>"
        )
    return (
        "Read the situation below and pick the most effective response.\n\n"
        f"Situation: {row['scenario']}\n\n"
        f"Question: In this situation, what is the most effective thing for {row['subject']} to do?\n{opts}\n\n"
        "Reply with one line and nothing else: Answer: <letter>"
    )


def _label_index(row: Mapping[str, Any], choices_key: str, label_key: str, path: Path) -> int:
    choices = field(row, choices_key, path, kind=list)
    label = field(row, label_key, path, kind=str)
    norm = [str(c).strip() for c in choices]
    if label.strip() not in norm:
        raise DataError(f"{path}:{row.get('__line__')}: {label_key} {label!r} is not one of {choices_key}")
    return norm.index(label.strip())


class EmoBench(Benchmark):
    name = "emobench"
    title = "EmoBench"
    folder = "emobench"
    max_new_tokens = 24

    def load_items(self, source: Path | None) -> list[Item]:
        lang = str(self.options.get("language", "en"))
        if lang not in ("en", "zh"):
            raise DataError(f"emobench: language must be 'en' or 'zh', got {lang!r}")
        tasks = self.options.get("tasks", ("EU", "EA"))
        rows: list[tuple[str, Path | None, dict[str, Any]]] = []
        if source is None:
            for task in tasks:
                p = fetch(REMOTE, f"{task}.jsonl", bench=self.name)
                rows += [(task, p, r) for r in read_jsonl(p)]
        elif source.is_file():
            task = "EU" if source.stem.upper().startswith("EU") else "EA"
            rows += [(task, source, r) for r in read_jsonl(source)]
        else:
            for task in tasks:
                p = source / f"{task}.jsonl"
                if not p.is_file():
                    raise DataError(f"emobench: {p} not found")
                rows += [(task, p, r) for r in read_jsonl(p)]
        items: list[Item] = []
        for task, path, row in rows:
            if field(row, "language", path) != lang:
                continue
            qid = str(field(row, "qid", path))
            for k in ("scenario", "subject"):
                field(row, k, path, kind=str)
            if task == "EU":
                emo = _label_index(row, "emotion_choices", "emotion_label", path)
                cause = _label_index(row, "cause_choices", "cause_label", path)
                items.append(
                    Item(
                        id=f"EU-{qid}",
                        prompt=_eu_prompt(row, lang),
                        reference={"emotion": emo, "cause": cause},
                        categories={"task": "EU", "category": str(row.get("coarse_category", ""))},
                        meta={"emotion_choices": row["emotion_choices"], "cause_choices": row["cause_choices"]},
                    )
                )
            else:
                ans = _label_index(row, "choices", "label", path)
                items.append(
                    Item(
                        id=f"EA-{qid}",
                        prompt=_ea_prompt(row, lang),
                        reference={"answer": ans},
                        categories={"task": "EA", "category": str(row.get("category", ""))},
                        meta={"choices": row["choices"]},
                    )
                )
        return items

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        text = responses[0]
        if item.categories["task"] == "EU":
            return score_eu(text, item.reference, item.meta["emotion_choices"], item.meta["cause_choices"])
        idx = parse_choice(text, len(item.meta["choices"]), item.meta["choices"])
        return {
            "parsed": None if idx is None else LETTERS[idx],
            "gold": LETTERS[item.reference["answer"]],
            "score": float(idx == item.reference["answer"]),
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        eu = [r for r in records if (r.get("categories") or {}).get("task") == "EU"]
        ea = [r for r in records if (r.get("categories") or {}).get("task") == "EA"]
        out: dict[str, Any] = {}
        if eu:
            out["EU"] = _mean([float(r["score"] or 0) for r in eu])
            out["EU_emotion"] = _mean([float(r.get("emotion_correct") or 0) for r in eu])
            out["EU_cause"] = _mean([float(r.get("cause_correct") or 0) for r in eu])
        if ea:
            out["EA"] = _mean([float(r["score"] or 0) for r in ea])
        parts = [out[k] for k in ("EU", "EA") if k in out]
        out = {"score": _mean(parts), **out, "n": len(records)}
        out["n_unparsed"] = sum(1 for r in records if r.get("parsed") is None)
        out.update(self.breakdowns(records))
        return out


def score_eu(text: str, reference: Mapping[str, int], emotion_choices: Sequence[str], cause_choices: Sequence[str]) -> dict[str, Any]:
    """Parse ``Emotion: X`` and ``Cause: Y``; correct only when both match."""
    emo_part, cause_part = _split_eu(text)
    e = parse_choice(emo_part, len(emotion_choices), emotion_choices, label="emotion") if emo_part else None
    c = parse_choice(cause_part, len(cause_choices), cause_choices, label="cause") if cause_part else None
    e_ok = e == reference["emotion"]
    c_ok = c == reference["cause"]
    parsed = None if e is None and c is None else {
        "emotion": None if e is None else LETTERS[e],
        "cause": None if c is None else LETTERS[c],
    }
    return {
        "parsed": parsed,
        "gold": {"emotion": LETTERS[reference["emotion"]], "cause": LETTERS[reference["cause"]]},
        "emotion_correct": e_ok,
        "cause_correct": c_ok,
        "score": float(e_ok and c_ok),
    }


def _split_eu(text: str) -> tuple[str, str]:
    """The emotion part and the cause part of an EU answer. With explicit ``Emotion:``/``Cause:``
    labels we split on them; otherwise we take the first two lettered answers in order."""
    t = text.replace("*", "")
    m_e = re.search(r"(?i)(emotion|question\s*1|情绪|问题一)\s*[:：]", t)
    m_c = re.search(r"(?i)(cause|reason|question\s*2|原因|问题二)\s*[:：]", t)
    if m_e and m_c:
        if m_e.start() < m_c.start():
            return "Emotion: " + t[m_e.end() : m_c.start()], "Cause: " + t[m_c.end() :]
        return "Emotion: " + t[m_e.end() :], "Cause: " + t[m_c.end() : m_e.start()]
    letters = re.findall(r"(?:^|[\s(\[])([A-F])(?:[\s).:\]]|$)", t)
    if len(letters) >= 2:
        return f"[[{letters[0]}]]", f"[[{letters[1]}]]"
    return (t, "") if m_e or not m_c else ("", t)
