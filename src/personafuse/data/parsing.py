"""Tolerant parsers for teacher output.

Teachers answer in many shapes: the JSON we ask for (often wrapped in code fences, with trailing
commas or single quotes), headed sections (``Social Cue:``, ``## Response``), the paper's own layout
(Table 2 / Table 9: ``Based on social cue:`` bullets such as ``• High Agreeableness: (...)``,
``##Response:`` and ``##Persona Behavior Rationale:``), or pole names in plain prose. Each parser
returns a value or raises :class:`~personafuse.data.validation.Rejection`; none raises anything else.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from personafuse.data.validation import (
    ALL_ZERO,
    EMPTY_RESPONSE,
    UNKNOWN_POLE,
    UNPARSEABLE,
    Rejection,
    activation_from_poles,
)
from personafuse.traits import TRAIT_POLES, TraitError, pole_name

# ------------------------------------------------------------------------------------------ JSON

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_SMART = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})


def extract_json(text: str) -> dict[str, Any] | None:
    """The first JSON object found in ``text`` (tolerating fences, trailing commas, single quotes)."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        for start in (i for i, ch in enumerate(cand) if ch == "{"):
            obj = _decode_object(cand[start:])
            if obj is not None:
                return obj
    return None


def _decode_object(s: str) -> dict[str, Any] | None:
    dec = json.JSONDecoder()
    for attempt in (s, s.translate(_SMART)):
        try:
            obj, _ = dec.raw_decode(attempt)
            return obj if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            pass
    # Cut at the matching brace, then try the common repairs.
    body = _balanced(s.translate(_SMART))
    if body is None:
        return None
    fixed = re.sub(r",\s*([}\]])", r"\1", body)
    for attempt in (fixed,):
        try:
            obj = json.loads(attempt)
            return obj if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            pass
        try:  # single-quoted Python-style dicts
            obj = ast.literal_eval(attempt.replace("true", "True").replace("false", "False").replace("null", "None"))
            return obj if isinstance(obj, dict) else None
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            pass
    return None


def _balanced(s: str) -> str | None:
    depth, in_str, quote, esc = 0, False, "", False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
        elif ch in "\"'":
            in_str, quote = True, ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return s[: i + 1]
    return None


def _text_of(v: Any) -> str:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, dict):
        for k in ("cue", "description", "text", "summary", "value"):
            if isinstance(v.get(k), str):
                return v[k].strip()
        return " ".join(_text_of(x) for x in v.values()).strip()
    if isinstance(v, list):
        return " ".join(_text_of(x) for x in v).strip()
    return "" if v is None else str(v).strip()


# ------------------------------------------------------------------------------------ headings

_TRAIT_WORDS = (
    r"openness(?:\s+to\s+experience)?|conscientiousness|conscientious|extraversion|extroversion|"
    r"extraverted|extroverted|agreeableness|agreeable|neuroticism|neurotic"
)
_WORD_TO_CODE = {
    "open": "O", "conscientious": "C", "extraver": "E", "extrover": "E", "agreeable": "A", "neurotic": "N",
}
_POLE_IN_PROSE = re.compile(rf"\b(high|low)[\s_-]+({_TRAIT_WORDS})\b", re.I)
_BULLET_POLE = re.compile(r"^\s*(?:[-*•·●▪]|\d+[.)])\s*(?:\*\*)?\s*(high|low)[\s_-]+([A-Za-z]+)", re.I | re.M)

# A heading: optional markdown marks, a known name, then ':' (or a line end after '#'/'**').
_HEAD_PREFIX = r"^[ \t]*(?:[-*•]\s*)?(?:#{1,6}[ \t]*)?(?:\*\*)?[ \t]*(?:\(?\d\)?[.)]?\s*|step\s*\d+\s*[:.)-]?\s*)?"
_HEADS = {
    "social_cue": r"(?:analy[sz]e\s+the\s+)?social\s+cues?",
    "task_cue": r"(?:analy[sz]e\s+the\s+)?task\s+cues?",
    "social_traits": r"(?:based\s+on\s+(?:the\s+)?social\s+cues?|social(?:[\s-]+cue)?\s+traits)",
    "task_traits": r"(?:based\s+on\s+(?:the\s+)?task\s+cues?|task(?:[\s-]+cue)?\s+traits)",
    "traits": r"(?:identif(?:y|ied)\s+(?:personality\s+)?traits|identified\s+traits|traits)",
    "analysis": r"(?:analysis|reasoning|plan|formulate\s+the\s+response)",
    "response": r"(?:provide\s+the\s+)?(?:final\s+)?response",
    "rationale": r"(?:persona\s+behaviou?r\s+)?rationale",
}
_HEAD_RE = {
    name: re.compile(_HEAD_PREFIX + rf"({pat})[ \t]*(?:\*\*)?[ \t]*(:|：|\n|$)[ \t]*(?:\*\*)?[ \t]*", re.I | re.M)
    for name, pat in _HEADS.items()
}


@dataclass
class _Head:
    name: str
    start: int
    body_start: int


def _headings(text: str) -> list[_Head]:
    heads: list[_Head] = []
    for name, rx in _HEAD_RE.items():
        for m in rx.finditer(text):
            line = text[m.start(): text.find("\n", m.start()) if "\n" in text[m.start():] else len(text)]
            # A bare name without ':' counts only when it is marked up as a heading (# or **).
            if m.group(2) != ":" and m.group(2) != "：" and "#" not in line[:8] and "**" not in line[:8]:
                continue
            heads.append(_Head(name, m.start(), m.end()))
    heads.sort(key=lambda h: (h.start, -h.body_start))
    dedup: list[_Head] = []
    for h in heads:  # several patterns can match one line ("social cue traits"): keep the longest
        if dedup and dedup[-1].start == h.start:
            continue
        dedup.append(h)
    return dedup


def _sections(text: str) -> list[tuple[str, str]]:
    heads = _headings(text)
    out = []
    for i, h in enumerate(heads):
        end = heads[i + 1].start if i + 1 < len(heads) else len(text)
        out.append((h.name, text[h.body_start:end].strip()))
    return out


# ------------------------------------------------------------------------------------------ cues


@dataclass
class Cues:
    social: str
    task: str


def parse_cues(text: str) -> Cues:
    """Social and task cue from JSON (``social_cue``/``task_cue`` or similar keys) or headed text."""
    obj = extract_json(text or "")
    if obj is not None:
        social = next((_text_of(v) for k, v in obj.items() if "social" in str(k).lower()), "")
        task = next((_text_of(v) for k, v in obj.items() if "task" in str(k).lower()), "")
        if social and task:
            return Cues(social, task)
    secs = dict(reversed(_sections(text or "")))  # first occurrence wins
    social, task = _first_para(secs.get("social_cue", "")), _first_para(secs.get("task_cue", ""))
    if social and task:
        return Cues(social, task)
    raise Rejection(UNPARSEABLE, "no social cue and task cue found", step="cues")


def _first_para(s: str) -> str:
    s = re.sub(r"^[-*•\s]+", "", s.strip())
    return re.split(r"\n\s*\n", s, maxsplit=1)[0].strip().strip("*").strip()


# ---------------------------------------------------------------------------------------- traits


@dataclass
class TraitChoice:
    """Poles per cue with reasons; ``p`` is their union in TRAIT_POLES order."""

    social: list[tuple[str, str]] = field(default_factory=list)
    task: list[tuple[str, str]] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)  # named without saying which cue

    @property
    def poles(self) -> list[str]:
        named = {p for p, _ in self.social + self.task + self.other}
        return [p for p in TRAIT_POLES if p in named]

    @property
    def p(self) -> list[int]:
        return activation_from_poles(self.poles)

    def triples(self) -> list[tuple[str, str, str]]:
        return [("social", p, r) for p, r in self.social] + [("task", p, r) for p, r in self.task] + [
            ("overall", p, r) for p, r in self.other
        ]

    def as_json(self) -> list[dict[str, str]]:
        """Flat ``[{"cue", "pole", "reason"}]`` list (one stable shape for Arrow/datasets)."""
        return [{"cue": cue, "pole": p, "reason": r} for cue, p, r in self.triples()]


def _canon_pole(s: str) -> str:
    """Canonical pole from a teacher's spelling ('**High Agreeableness** (warm)', 'agreeable-high')."""
    raw = s
    s = re.sub(r"\(.*?\)", " ", str(s)).replace("*", " ").strip().strip(":-.•").strip()
    try:
        return pole_name(s)
    except TraitError:
        pass
    m = _POLE_IN_PROSE.search(s)
    if m and m.group(0).strip().lower() == s.lower():
        return _pole_from_match(m.group(1), m.group(2))
    raise Rejection(UNKNOWN_POLE, f"teacher named {raw!r}", step="traits")


def _pole_from_match(level: str, word: str) -> str:
    w = word.lower()
    code = next(c for stem, c in _WORD_TO_CODE.items() if w.startswith(stem))
    return f"{level.lower()}_{code}"


def _items_from_json(v: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(v, str):
        v = [x for x in re.split(r"[,;\n]", v) if x.strip()]
    if isinstance(v, dict):
        if any(k in v for k in ("pole", "trait", "name")):
            v = [v]
        else:  # {"High Agreeableness": "reason", ...}
            v = [{"pole": k, "reason": _text_of(r)} for k, r in v.items()]
    if not isinstance(v, list):
        raise Rejection(UNPARSEABLE, f"trait list is {type(v).__name__}", step="traits")
    for item in v:
        if isinstance(item, str):
            out.append((_canon_pole(item), ""))
        elif isinstance(item, dict):
            name = item.get("pole") or item.get("trait") or item.get("name")
            if name is None:
                raise Rejection(UNPARSEABLE, f"trait entry without a pole: {item!r}"[:200], step="traits")
            level = item.get("level")
            if isinstance(level, str) and level.lower() in ("high", "low"):
                name = f"{level} {name}"
            out.append((_canon_pole(str(name)), _text_of(item.get("reason") or item.get("why") or "")))
        else:
            raise Rejection(UNPARSEABLE, f"trait entry {item!r} is not a name"[:200], step="traits")
    return out


def _items_from_text(s: str) -> list[tuple[str, str]]:
    for m in _BULLET_POLE.finditer(s):  # a bullet that names a non-trait ("High Happiness") is an error
        word = m.group(2).lower()
        if not re.fullmatch(_TRAIT_WORDS, word, re.I) and word != "openness":
            raise Rejection(UNKNOWN_POLE, f"teacher named {m.group(1)} {m.group(2)!r}", step="traits")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in s.splitlines():
        for m in _POLE_IN_PROSE.finditer(line):
            pole = _pole_from_match(m.group(1), m.group(2))
            if pole in seen:
                continue
            seen.add(pole)
            reason = line[m.end():].strip(" :*-–—").strip()
            out.append((pole, reason))
    return out


def parse_traits(text: str) -> TraitChoice:
    """Poles per cue from JSON, ``Based on social cue:`` sections, bullets or prose."""
    text = text or ""
    obj = extract_json(text)
    if obj is not None:
        choice = TraitChoice()
        found = False
        for k, v in obj.items():
            key = str(k).lower()
            if key in ("p", "vector", "activation") and isinstance(v, list) and len(v) == len(TRAIT_POLES):
                choice.other += [(TRAIT_POLES[i], "") for i, x in enumerate(v) if x in (1, True, "1")]
                found = True
            elif "social" in key:
                choice.social += _items_from_json(v)
                found = True
            elif "task" in key:
                choice.task += _items_from_json(v)
                found = True
            elif key in ("traits", "poles", "identified_traits", "activated"):
                choice.other += _items_from_json(v)
                found = True
        if found:
            if not choice.poles:
                raise Rejection(ALL_ZERO, "teacher listed no poles", step="traits")
            return choice
    body = _before_response(text)
    secs = _sections(body)
    choice = TraitChoice()
    for name, content in secs:
        if name == "social_traits":
            choice.social += _items_from_text(content)
        elif name == "task_traits":
            choice.task += _items_from_text(content)
    if not choice.social and not choice.task:
        choice.other = _items_from_text(body)
    if choice.poles:
        return choice
    if secs or _BULLET_POLE.search(body) or re.search(_TRAIT_WORDS, body, re.I):
        raise Rejection(ALL_ZERO, "teacher named no high/low pole", step="traits")
    raise Rejection(UNPARSEABLE, "no traits found", step="traits")


def _before_response(text: str) -> str:
    for h in _headings(text):
        if h.name in ("response", "rationale"):
            return text[: h.start]
    return text


# -------------------------------------------------------------------------------------- response


@dataclass
class ResponseParts:
    response: str
    rationale: str | None
    analysis: str | None = None
    had_rationale_heading: bool = False


def parse_response(text: str, *, require_sections: bool = False) -> ResponseParts:
    """Final answer and rationale from ``## Response`` / ``## Rationale`` sections or JSON.

    Without a response heading the whole text is the answer, unless it looks like an unfinished
    chain of thought (step or cue headings but no answer), or ``require_sections`` is set.
    """
    text = text or ""
    obj = extract_json(text) if text.lstrip().startswith(("{", "```")) else None
    if obj is not None and any("response" in str(k).lower() for k in obj):
        resp = next(_text_of(v) for k, v in obj.items() if "response" in str(k).lower())
        rat = next((_text_of(v) for k, v in obj.items() if "rationale" in str(k).lower()), None)
        return ResponseParts(resp, rat or None, had_rationale_heading=rat is not None)
    heads = _headings(text)
    resp_heads = [i for i, h in enumerate(heads) if h.name == "response"]
    if resp_heads:
        i = resp_heads[-1]
        # A response section that is only a format echo ('##Response:...') does not count.
        for j in reversed(resp_heads):
            end = heads[j + 1].start if j + 1 < len(heads) else len(text)
            if text[heads[j].body_start:end].strip(" .…\n"):
                i = j
                break
        h = heads[i]
        rat_i = next((k for k in range(i + 1, len(heads)) if heads[k].name == "rationale"), None)
        end = heads[i + 1].start if i + 1 < len(heads) else len(text)
        # Other headings between response and rationale (a teacher's sub-headings) stay in the answer.
        if rat_i is not None:
            end = heads[rat_i].start
        response = text[h.body_start:end].strip()
        rationale = text[heads[rat_i].body_start:].strip() if rat_i is not None else None
        analysis = text[: h.start].strip() or None
        return ResponseParts(response, rationale or None, analysis, rat_i is not None)
    if not text.strip():
        raise Rejection(EMPTY_RESPONSE, "teacher returned no text", step="response")
    if require_sections or any(h.name in ("social_cue", "task_cue", "traits", "social_traits") for h in heads):
        raise Rejection(UNPARSEABLE, "no response section found", step="response")
    rat = [h for h in heads if h.name == "rationale"]
    if rat:
        return ResponseParts(text[: rat[0].start].strip(), text[rat[0].body_start:].strip() or None, None, True)
    return ResponseParts(text.strip(), None)


@dataclass
class FullParse:
    cues: Cues
    traits: TraitChoice
    parts: ResponseParts


def parse_full(text: str) -> FullParse:
    """A single reply carrying all three steps (the paper's layout or ``single_call_messages``)."""
    return FullParse(parse_cues(text), parse_traits(text), parse_response(text, require_sections=True))
