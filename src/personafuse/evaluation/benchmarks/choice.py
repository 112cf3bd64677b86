"""Multiple-choice helpers: lettered option lists, a free-text letter parser and the standard error
of a weighted item mean.

:func:`parse_choice` is for benchmarks whose reference has no extraction of its own, or whose prompt
is not the reference's: it reads a reply as a person would. Option letters are capitals; a
lowercase "a" is an article, never option A ("the best option is a considerate one, so B" is B), and
a capital "A" that opens a phrase ("A good friend would...") is an article too. Only inside an
explicit marker (``[[b]]``, ``{"answer": "d"}``) is a lowercase letter read as an option.

Order (the first rule that finds a valid letter decides): a JSON answer key; ``[[X]]``; "answer" /
``<label>`` followed by a letter (the last one: models restate); a unique "option X" / "I choose X";
a reply that opens with ``X.`` ``(X)`` ``X)`` ``X -`` or is just ``X``; a reply that ends on a lone
letter ("..., so B"); the only lone capital letter in the reply; finally the one option whose text
appears in the reply. ``lenient=True`` (reported under its own key, never as ``score``) also
reads lowercase letters after "answer"/"option".
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# A letter is a lone token: not part of a word, a number or a contraction ("I'd").
_END = r"(?![A-Za-z0-9'’])"
_START = r"(?<![A-Za-z0-9'’])"
# Words after which a capital "A" is option A, not an article ("A is right", "A seems kind").
_A_VERBS = ("is", "was", "seems", "would", "looks", "fits", "and", "or", "because", "since", "as", "best")


def letter(i: int) -> str:
    return LETTERS[i]


def json_letter(text: str, keys: Sequence[str]) -> str | None:
    """The letter under one of ``keys`` in a JSON-like ``"key": "X"`` pair (the last such pair);
    the value may be ``"D"``, ``"(D)"``, ``"D. text"`` or lowercase."""
    names = "|".join(re.escape(k) for k in keys)
    found = re.findall(rf"""["'](?i:{names})["']\s*:\s*["']\s*[(\[]?([A-Za-z]){_END}""", text)
    return found[-1].upper() if found else None


def parse_choice(
    text: str, n_options: int, options: Sequence[str] | None = None, *, label: str = "answer", lenient: bool = False
) -> int | None:
    """Index of the chosen option in ``text``, or ``None`` when a reader could not tell."""
    if not text:
        return None
    valid = LETTERS[:n_options]
    t = text.strip().replace("*", "")
    keys = tuple(dict.fromkeys((label, "answer")))
    got = json_letter(t, keys)
    if got is None:
        got = _last(re.findall(r"\[\[\s*([A-Za-z])\s*\]\]", t), valid, upper=True)
    for rule in (_labelled, _chosen, _leading, _closing, _lone):
        if got is None:
            got = rule(t, valid, keys)
    if got is None and lenient:
        got = _labelled(t, valid, keys, letters="A-Za-z")
    if got is not None and got in valid:
        return valid.index(got)
    return _option_text(t, options) if options else None


def _last(found: Sequence[str], valid: str, *, upper: bool = False) -> str | None:
    found = [f.upper() if upper else f for f in found]
    found = [f for f in found if f in valid]
    return found[-1] if found else None


def _labelled(t: str, valid: str, keys: Sequence[str], letters: str = "A-Z") -> str | None:
    """"Answer: C", "the answer is (B)", "Final answer: option D" — the last one counts."""
    names = "|".join(re.escape(k).replace("_", "[_ ]") for k in keys)
    verb = r"(?:\s*(?i:is|would\s+be|should\s+be|will\s+be|[:=：-]))?"
    pat = rf"(?i:\b(?:{names})){verb}\s*[:：]?\s*(?i:(?:option|choice)\s+)?[(\[]?([{letters}]){_END}"
    return _last([m.upper() for m in re.findall(pat, t)], valid)


def _chosen(t: str, valid: str, keys: Sequence[str]) -> str | None:
    """"I choose B", "option B is the kindest": only when all such mentions agree."""
    pat = rf"(?i:\b(?:option|choice|choose|chose|pick|select|go\s+with|going\s+with))\s+[(\[]?([A-Z]){_END}"
    found = {m for m in re.findall(pat, t) if m in valid}
    return found.pop() if len(found) == 1 else None


def _leading(t: str, valid: str, keys: Sequence[str]) -> str | None:
    """A reply that opens with its letter: "B. text", "(C)", "D)", "A - text", "B\\n...", "A"."""
    listed = set(re.findall(r"(?m)^\s*[(\[]?([A-Z])[).:\]]", t))
    if len(listed) >= 3:  # the options repeated back ("A) ...\nB) ...\nC) ..."), not a choice
        return None
    m = re.match(r"^[(\[]?([A-Z])(?:[).:\]：]|\s*$|\s*\n|\s+[-–—]\s)", t)
    return m.group(1) if m and m.group(1) in valid else None


def _closing(t: str, valid: str, keys: Sequence[str]) -> str | None:
    """A reply that concludes on a lone letter: "..., so B", "my pick: (C)." (not "A or B")."""
    lead = r"(?:(?i:\b(?:so|thus|therefore|hence|then|is|be|pick|go\s+with))\s+|[:：=]\s*|[→⇒]\s*|=>\s*)"
    m = re.search(rf"{lead}[(\[]?([A-Z])[)\]]?[.!。]?\s*$", t)
    return m.group(1) if m and m.group(1) in valid else None


def _lone(t: str, valid: str, keys: Sequence[str]) -> str | None:
    """The only lone capital among the option letters; a phrase-opening "A" is an article."""
    found = set()
    for m in re.finditer(rf"{_START}([A-Z]){_END}", t):
        nxt = re.match(r"\s+([a-z]+)", t[m.end() :])
        if m.group(1) == "A" and nxt and nxt.group(1) not in _A_VERBS:
            continue
        if m.group(1) in valid:
            found.add(m.group(1))
    return found.pop() if len(found) == 1 else None


def _option_text(t: str, options: Sequence[str]) -> int | None:
    """The one option whose text the reply contains (whole words for Latin text); when one option's
    text contains another's ("Sad" / "Sadness"), the longer wins."""
    low = t.lower()
    hits = []
    for i, o in enumerate(options):
        s = str(o).strip().lower() if o is not None else ""
        if not s:
            continue
        pre = r"(?<!\w)" if s[0].isascii() and s[0].isalnum() else ""
        post = r"(?!\w)" if s[-1].isascii() and s[-1].isalnum() else ""
        if re.search(pre + re.escape(s) + post, low):
            hits.append(i)
    if len(hits) == 1:
        return hits[0]
    if hits:
        longest = max(hits, key=lambda i: len(str(options[i])))
        if all(str(options[h]).strip().lower() in str(options[longest]).strip().lower() for h in hits):
            return longest
    return None


def weighted_stderr(xs: Sequence[float], ws: Sequence[float]) -> float:
    """Standard error of ``sum(w * x)`` for independent items with one pooled variance (the sample
    variance of ``xs``). For ``w = 1/n`` this is lm-eval's ``mean_stderr``; a mean of group means
    (ToMBench's task average, EmoBench's EU/EA average) gives each item the weight of its groups."""
    if len(xs) < 2:
        return 0.0
    return statistics.stdev(xs) * math.sqrt(sum(w * w for w in ws))
