"""Training records: load Persona-CoT (or baseline) JSONL, validate every record before training,
and turn records into token ids with the prompt masked out of the labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse import chat
from personafuse.data.store import RECORDS, iter_lines, shard_paths
from personafuse.traits import NUM_POLES, TRAIT_POLES


class RecordError(ValueError):
    """Bad training data; the message names every offending record (file, line, id)."""


@dataclass(frozen=True)
class Record:
    id: str
    query: str
    response: str
    p: tuple[int, ...] | None
    source: str  # "file:line", for error messages


def _files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        # A generation folder's own shards first (data/store.py), else any JSONL the user put there.
        files = shard_paths(p, RECORDS) or sorted(p.glob("records*.jsonl")) or sorted(p.glob("*.jsonl"))
        if not files:
            raise RecordError(f"{p}: no records*.jsonl files in this directory")
        return files
    if p.is_file():
        return [p]
    raise RecordError(f"training data {str(p)!r} does not exist")


def load_records(path: str | Path, *, require_p: bool = True) -> list[Record]:
    """Read every record and check it; raise one :class:`RecordError` listing all problems.

    Lines are read with the generation store's own reader (:func:`personafuse.data.store.iter_lines`),
    so a folder left by a killed ``data generate`` run (a torn last line) trains as it is, and a
    record regenerated after a resume (same ``key``) replaces its earlier line as ``read_all`` does.
    Required per record: non-empty ``query`` and ``response``; with ``require_p`` also ``p``, ten 0/1
    entries, not all zero. ``id`` defaults to a hash of the query.
    """
    by_key: dict[str, Record] = {}
    problems: list[str] = []
    for f in _files(path):
        for lineno, row in iter_lines(f, errors=problems):
            rec, err = _check(row, f"{f}:{lineno}", require_p)
            if err:
                problems.append(err)
            else:
                by_key[str(row.get("key") or f"{f}:{lineno}")] = rec  # type: ignore[assignment]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RecordError(f"{len(problems)} bad training record(s):\n  {shown}{more}")
    if not by_key:
        raise RecordError(f"{path}: no training records")
    return list(by_key.values())


def _check(row: dict[str, Any], where: str, require_p: bool) -> tuple[Record | None, str | None]:
    query = row.get("query")
    rid = str(
        row.get("id") or (hashlib.sha256(query.encode()).hexdigest()[:16] if isinstance(query, str) else "?")
    )
    label = f"{where} (id {rid})"
    missing = [
        k for k in ("query", "response") + (("p",) if require_p else ()) if k not in row or row[k] is None
    ]
    if missing:
        return None, f"{label}: missing field(s) {', '.join(missing)}"
    if not isinstance(query, str) or not query.strip():
        return None, f"{label}: 'query' is empty"
    response = row["response"]
    if not isinstance(response, str) or not response.strip():
        return None, f"{label}: 'response' is empty"
    p = row.get("p")
    vec: tuple[int, ...] | None = None
    if p is not None:
        if not isinstance(p, list) or len(p) != NUM_POLES:
            n = len(p) if isinstance(p, list) else type(p).__name__
            return (
                None,
                f"{label}: 'p' must be a list of {NUM_POLES} entries ({', '.join(TRAIT_POLES)}), got {n}",
            )
        if any(v not in (0, 1) for v in p):
            return None, f"{label}: 'p' entries must be 0 or 1, got {p}"
        if not any(p):
            return None, f"{label}: 'p' is all zero (no active pole)"
        vec = tuple(int(v) for v in p)
    return Record(rid, query, response, vec, where), None


def encode_record(tokenizer: Any, query: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one chat turn; labels are -100 on the prompt (response tokens only)."""
    prompt_ids = chat.prompt_ids(tokenizer, query)  # the prompt generate() sends for this query
    resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Keep the whole response when possible; cut the prompt from the left first.
    room = max_length - len(resp_ids)
    if room < 8:
        resp_ids = resp_ids[: max(max_length // 2, 1)]
        room = max_length - len(resp_ids)
    prompt_ids = prompt_ids[-room:]
    return prompt_ids + resp_ids, [-100] * len(prompt_ids) + resp_ids
