"""A second labeller for the records' activation vectors: the paper's Trait Activation Theory table
(Table 1: the Big Five traits that help or hurt five kinds of task), matched to each query with a
sentence encoder.

A teacher as small as the embedded 135M one names poles noisily. This labeller gives a
theory-grounded alternative that needs no teacher: embed the query and a short description of each
Table 1 task with all-MiniLM-L6-v2 (the embedded sentence encoder), take the most similar task, and
set ``p`` to that task's poles (:data:`personafuse.traits.TAT_PRIOR`). ``personafuse data relabel``
writes the relabelled records to a new folder, keeping the teacher's vector and the similarities in
each record's ``raw`` so both labellings can be compared (and the router and joint stages retrained
on either).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse.data.schema import make_record
from personafuse.data.store import iter_lines
from personafuse.fileio import atomic_write
from personafuse.traits import TRAIT_POLES, tat_prior

# One description per Table 1 task, written for a sentence encoder: what such a query is about.
TASK_DESCRIPTIONS: dict[str, str] = {
    "creativity": "A creative request: brainstorm ideas, invent names, write a story, a poem or a slogan.",
    "math": "A maths or logic problem: solve an equation, calculate a number, prove a statement step by step.",
    "social_cognition": "Understanding people: what a friend, partner or colleague thinks, feels or means, and how to handle it.",
    "customer_service": "A customer problem: an order, a delivery, a refund, a bill or a product that does not work.",
    "therapist": "Emotional distress: someone anxious, grieving, lonely or overwhelmed who needs support.",
}


@dataclass(frozen=True)
class TATLabel:
    task: str
    p: list[int]
    similarity: dict[str, float]  # cosine to every task's description


class TATLabeller:
    """``label(queries)``: the Table 1 task each query is most like, and that task's poles."""

    name = "tat"

    def __init__(self, embedder: Any | None = None) -> None:
        if embedder is None:
            from personafuse.evaluation.embedding import SentenceEmbedder

            embedder = SentenceEmbedder.from_pretrained()  # the embedded all-MiniLM-L6-v2
        self.embedder = embedder
        self.tasks = list(TASK_DESCRIPTIONS)  # the keys of TAT_PRIOR (tests/data/test_tat_labeller.py)
        self._task_vecs = embedder.encode([TASK_DESCRIPTIONS[t] for t in self.tasks])

    def label(self, queries: Sequence[str]) -> list[TATLabel]:
        if not queries:
            return []
        sims = self.embedder.encode(list(queries)) @ self._task_vecs.T
        out = []
        for row in sims.tolist():
            best = max(range(len(self.tasks)), key=row.__getitem__)
            out.append(TATLabel(self.tasks[best], tat_prior(self.tasks[best]), {t: round(s, 4) for t, s in zip(self.tasks, row, strict=True)}))
        return out


def relabel_records(src: Path, out: Path, labeller: TATLabeller, *, min_similarity: float = 0.0) -> dict[str, Any]:
    """Write every record of ``src`` (a records folder or file) to ``out/records-00000.jsonl`` with
    ``p`` (and ``traits``, ``trait_reasons``) from ``labeller``; the teacher's vector and the
    similarities go to ``raw``. A query whose best cosine is below ``min_similarity`` resembles no
    Table 1 task: it keeps the teacher's labels (``raw.tat_task`` is then null). ``out`` must not
    hold records already (nothing written is ever replaced); the file appears whole or not at all.
    Returns a summary (records, tasks, changed, kept_teacher)."""
    files = sorted(src.glob("records-*.jsonl")) if src.is_dir() else [src]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{src}: no records-*.jsonl to relabel")
    target = out / "records-00000.jsonl"
    if out.exists() and any(out.glob("records-*.jsonl")):
        raise FileExistsError(f"{out} already holds records; relabel into a new folder")
    rows = [(f"{f}:{n}", row) for f in files for n, row in iter_lines(f)]
    labels = labeller.label([str(row.get("query", "")) for _, row in rows])  # the encoder batches
    lines, changed, kept = [], 0, 0
    for (where, row), lab in zip(rows, labels, strict=True):
        use = lab.similarity[lab.task] >= min_similarity
        raw = {**(row.get("raw") or {}), "teacher_p": row.get("p"), "teacher_traits": row.get("traits"),
               "tat_task": lab.task if use else None, "tat_similarity": lab.similarity}
        fields = {**row, "raw": raw}
        if use:
            poles = [TRAIT_POLES[i] for i, v in enumerate(lab.p) if v]
            reason = f"TAT Table 1: {lab.task} (cosine {lab.similarity[lab.task]:.2f})"
            fields.update(p=lab.p, traits=poles, trait_reasons=[{"cue": "tat", "pole": p, "reason": reason} for p in poles])
        kept += not use
        try:
            lines.append(json.dumps(make_record(**fields), ensure_ascii=False))
        except TypeError as e:  # not a line `data generate` wrote
            raise ValueError(f"{where}: not a generated record ({e})") from None
        changed += row.get("p") != fields["p"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(target, "".join(line + "\n" for line in lines))
    tasks = Counter(lab.task for lab in labels if lab.similarity[lab.task] >= min_similarity)
    return {"records": len(lines), "changed": changed, "kept_teacher": kept, "tasks": dict(tasks), "out": str(target)}
