"""Pairwise human evaluation (paper §7): annotators compare two systems' replies to one prompt.

Input: JSONL files of responses, one line per prompt with ``id`` (or ``prompt_id``), ``prompt``
(or ``query``), ``response`` and optionally ``task`` (task type, e.g. ``emotion``/``reasoning``)
and ``system`` (defaults to the file's stem). Every prompt answered by two or more systems gives
one pair per system pair (or only pairs with ``reference`` when given).

Three parts, one module each: :mod:`.store` (pairs, participants and judgements in SQLite, and
who sees which pair next), :mod:`.results` (majority votes, win rates with bootstrap intervals,
the exported tables and chart) and :mod:`.app` (the annotation page and its HTTP API). Their public
names are importable from here.
"""

from personafuse.evaluation.annotation.app import MAX_BODY_BYTES, Refused, create_annotation_app
from personafuse.evaluation.annotation.results import export, pair_outcomes, win_rates
from personafuse.evaluation.annotation.store import (
    CRITERIA,
    CRITERION_LABEL,
    MIN_TOKEN_CHARS,
    RESERVATION_S,
    SCHEMA,
    SCHEMA_VERSION,
    AnnotationError,
    AnnotationStore,
)

__all__ = [
    "CRITERIA", "CRITERION_LABEL", "MAX_BODY_BYTES", "MIN_TOKEN_CHARS", "RESERVATION_S", "SCHEMA",
    "SCHEMA_VERSION", "AnnotationError", "AnnotationStore", "Refused", "create_annotation_app", "export",
    "pair_outcomes", "win_rates",
]
