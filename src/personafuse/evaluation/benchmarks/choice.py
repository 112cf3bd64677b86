"""Multiple-choice helpers: lettered option lists and a tolerant letter parser.

The parser prefers explicit markers (``[[B]]``, ``Answer: B``, ``(B)``) and only then a bare
leading letter or a unique option text, so that prose like "A good friend would..." is not read as
option A.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def letter(i: int) -> str:
    return LETTERS[i]


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def parse_choice(text: str, n_options: int, options: Sequence[str] | None = None, *, label: str = "answer") -> int | None:
    """Index of the chosen option in ``text`` or ``None`` when it cannot be told.

    Order: ``[[X]]``; ``<label>: X`` / ``answer is X`` (last one wins: models often restate); ``(X)``
    or ``X.``/``X)`` at the start of the reply; a reply that is just ``X``; finally the one option whose
    full text appears in the reply (only when exactly one does).
    """
    if not text:
        return None
    valid = LETTERS[:n_options]
    t = text.strip().replace("*", "")

    def pick(matches: list[str]) -> int | None:
        matches = [m.upper() for m in matches if m.upper() in valid]
        return valid.index(matches[-1]) if matches else None

    m = re.findall(r"\[\[\s*([A-Za-z])\s*\]\]", t)
    if (r := pick(m)) is not None:
        return r
    lab = re.escape(label)
    m = re.findall(rf"(?i)(?:{lab}|answer|option|choice)\s*(?:is|:|=|-)?\s*[:\s]*\(?\s*([A-Z])\b(?![a-z'])", t)
    if (r := pick(m)) is not None:
        return r
    m = re.match(r"^\(?([A-Z])(?:[\).:\]]|$|\s*$|\s+[-–]\s)", t)
    if m and m.group(1) in valid:
        return valid.index(m.group(1))
    m = re.findall(r"\(([A-Z])\)", t)
    if len(set(m)) == 1 and m[0] in valid:
        return valid.index(m[0])
    if options:
        low = t.lower()
        hits = [i for i, o in enumerate(options) if o and str(o).strip().lower() in low]
        if len(hits) == 1:
            return hits[0]
        # The longest matching option wins when one contains another ("Sad" vs "Sadness").
        if len(hits) > 1:
            hits.sort(key=lambda i: -len(str(options[i])))
            longest = hits[0]
            if all(str(options[h]).strip().lower() in str(options[longest]).strip().lower() for h in hits[1:]):
                return longest
    return None
