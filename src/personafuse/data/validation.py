"""Reject reasons and the checks that produce them.

Every rejected query ends up as one line in ``rejects*.jsonl`` with one of ``REJECT_REASONS`` and the
raw teacher text, so a run's losses are counted and can be inspected; nothing a teacher writes can
crash the pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from personafuse.endpoint import ENDPOINT_REASONS
from personafuse.traits import TRAIT_NAMES, both_poles, pole_name, vector_from_poles

UNPARSEABLE = "unparseable"
ALL_ZERO = "all_zero_p"
UNKNOWN_POLE = "unknown_pole"
BOTH_POLES = "both_poles"
EMPTY_RESPONSE = "empty_response"
TRUNCATED = "truncated_response"
DUPLICATE = "duplicate_query"
TEACHER_ERROR = "teacher_error"

REJECT_REASONS: tuple[str, ...] = (
    UNPARSEABLE,
    ALL_ZERO,
    UNKNOWN_POLE,
    BOTH_POLES,
    EMPTY_RESPONSE,
    TRUNCATED,
    DUPLICATE,
    TEACHER_ERROR,
    *ENDPOINT_REASONS,
)
# The endpoint's fault, not the teacher's writing: a plain rerun retries these. ``teacher_error``
# is what such failures were called before the endpoint_* reasons (and local teachers' crashes).
ENDPOINT_REJECTS: frozenset[str] = frozenset({*ENDPOINT_REASONS, TEACHER_ERROR})


class Rejection(Exception):
    """A query the pipeline gives up on, with a counted reason and a human-readable detail."""

    def __init__(self, reason: str, detail: str = "", step: str | None = None, ctx: Any = None):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.step = step
        self.ctx = ctx  # the pipeline attaches raw teacher text and timings here


def activation_from_poles(poles: Iterable[str], *, allow_both_poles: bool = False) -> list[int]:
    """``p`` from pole spellings; rejects unknown poles, an empty set and (unless
    ``allow_both_poles``: the paper does not state the rule) both poles of one trait."""
    canon: list[str] = []
    for pole in poles:
        try:
            canon.append(pole_name(pole))
        except ValueError:
            raise Rejection(UNKNOWN_POLE, f"teacher named {pole!r}") from None
    p = vector_from_poles(canon)
    if not any(p):
        raise Rejection(ALL_ZERO, "no pole activated")
    if not allow_both_poles and (both := both_poles(p)):
        raise Rejection(BOTH_POLES, f"both poles of {TRAIT_NAMES[both[0]]} activated")
    return p


_PLACEHOLDER = re.compile(r"^[\s.…\-_*#:\[\]()]*$")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


def check_response(text: str | None, *, what: str = "response") -> str:
    """The stripped response, or an ``empty_response`` rejection for empty or placeholder text."""
    s = (text or "").strip()
    if not s or _PLACEHOLDER.match(s):
        raise Rejection(EMPTY_RESPONSE, f"{what} is empty" if not s else f"{what} is only {s[:20]!r}")
    return s


def trim_to_sentence(text: str, *, min_chars: int = 20) -> str | None:
    """Cut a length-truncated text after its last complete sentence; ``None`` if too little is left."""
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return None
    cut = text[: ends[-1].end()].strip()
    return cut if len(cut) >= min_chars else None
