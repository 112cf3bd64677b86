"""Training records: load Persona-CoT (or baseline) JSONL, validate every record before training
(the record schema is :mod:`personafuse.data.schema`, shared with the writer), and turn records
into token ids with the prompt masked out of the labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from personafuse import chat
from personafuse.data.schema import Record, RecordError, read_record
from personafuse.data.store import RECORDS, iter_lines, shard_paths

__all__ = ["Record", "RecordError", "encode_record", "load_records"]

log = logging.getLogger(__name__)


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
    so a folder left by a killed ``data generate`` run (a torn last line) trains as it is. Records
    are keyed by ``key``, else ``id`` (lines with neither are all kept): a query written twice (a
    folder from an older ``data generate`` that redid done keys) trains once, its later line
    replacing the earlier one as ``read_all`` does, and the number dropped is logged.
    Each line is checked by the schema's own reader (:func:`personafuse.data.schema.read_record`:
    non-empty ``query`` and ``response``; with ``require_p`` also ``p``, ten 0/1 entries, not all
    zero; ``id`` defaults to a hash of the query).
    """
    by_key: dict[str, Record] = {}
    problems: list[str] = []
    duplicates = 0
    for f in _files(path):
        for lineno, row in iter_lines(f, errors=problems):
            try:
                rec = read_record(row, f"{f}:{lineno}", require_p=require_p)
            except RecordError as e:
                problems.append(str(e))
                continue
            key = str(row.get("key") or row.get("id") or f"{f}:{lineno}")
            duplicates += key in by_key
            by_key[key] = rec
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RecordError(f"{len(problems)} bad training record(s):\n  {shown}{more}")
    if not by_key:
        raise RecordError(f"{path}: no training records")
    if duplicates:
        log.warning("%s: %d duplicate record line(s) dropped (same key as a later line); %d records kept",
                    path, duplicates, len(by_key))
    return list(by_key.values())


def encode_record(tokenizer: Any, query: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one chat turn; labels are -100 on the prompt (response tokens only)."""
    prompt_ids = chat.prompt_ids(tokenizer, query)  # the prompt generate() sends for this query
    eos = chat.eos_token_ids(tokenizer)  # the reply ends as generation ends it: on the tokenizer's EOS
    if not eos:
        raise ValueError("the tokenizer has no EOS token, so a trained reply could never end; set tokenizer.eos_token")
    resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos[:1]
    # Keep the whole response when possible; cut the prompt from the left first.
    room = max_length - len(resp_ids)
    if room < 8:
        resp_ids = resp_ids[: max(max_length // 2, 1)]
        room = max_length - len(resp_ids)
    prompt_ids = prompt_ids[-room:]
    return prompt_ids + resp_ids, [-100] * len(prompt_ids) + resp_ids
