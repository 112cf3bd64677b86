"""The training record, defined once: the line ``data generate`` writes to ``records-*.jsonl`` and
the fields training reads from it (docs/data.md, "Record schema").

The writer builds every line with :func:`make_record`, which checks the training part with the
reader's own :func:`read_record`, so generation cannot write a record that training refuses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from personafuse.traits import TraitError, validate_activation

# Every key of a written record, in the order it is written (docs/data.md documents each one).
RECORD_KEYS: tuple[str, ...] = (
    "id",
    "query",
    "situation",
    "source",
    "mode",
    "cues",
    "traits",
    "trait_reasons",
    "p",
    "response",
    "rationale",
    "teacher",
    "prompt_version",
    "constrained",
    "timings",
    "raw",
)
# What training reads: query and response always, p for the PersonaFuse stages (null in the
# baselines' records); id is optional in hand-written files (a hash of the query stands in).
TRAINING_KEYS: tuple[str, ...] = ("query", "response", "p")


class RecordError(ValueError):
    """Bad training data; the message names the offending record (file, line, id)."""


@dataclass(frozen=True)
class Record:
    """One training example as training sees it."""

    id: str
    query: str
    response: str
    p: tuple[int, ...] | None
    source: str  # "file:line", for error messages


def record_id(query: str) -> str:
    """The id of a record written without one: the first 16 hex digits of the query's SHA-256."""
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def read_record(row: dict[str, Any], where: str, *, require_p: bool) -> Record:
    """The training view of one line, checked: non-empty ``query`` and ``response``; ``p`` (required
    with ``require_p``) ten 0/1 entries, not all zero. A :class:`RecordError` names ``where`` and
    the record's id."""
    query = row.get("query")
    rid = str(row.get("id") or (record_id(query) if isinstance(query, str) else "?"))
    label = f"{where} (id {rid})"
    required = ("query", "response") + (("p",) if require_p else ())
    missing = [k for k in required if row.get(k) is None]
    if missing:
        raise RecordError(f"{label}: missing field(s) {', '.join(missing)}")
    for key in ("query", "response"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise RecordError(f"{label}: '{key}' is empty")
    p = row.get("p")
    vec = None
    if p is not None:
        if not isinstance(p, list):
            raise RecordError(f"{label}: 'p' must be a list of ten 0/1 entries, got {type(p).__name__}")
        try:
            vec = tuple(validate_activation(p, what="'p'"))
        except TraitError as e:
            raise RecordError(f"{label}: {e}") from None
    return Record(rid, query, row["response"], vec, where)  # type: ignore[arg-type]


def make_record(**fields: Any) -> dict[str, Any]:
    """A record line with every key of :data:`RECORD_KEYS`, in that order; a missing or unknown key
    is a programming error (TypeError), a record training would refuse a :class:`RecordError`."""
    missing = [k for k in RECORD_KEYS if k not in fields]
    unknown = [k for k in fields if k not in RECORD_KEYS]
    if missing or unknown:
        raise TypeError(f"record keys: missing {missing}, unknown {unknown}")
    read_record(fields, f"record {fields['id']!r}", require_p=fields["mode"] == "persona_cot")
    return {k: fields[k] for k in RECORD_KEYS}
