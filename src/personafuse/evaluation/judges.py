"""LLM judges: prompts (our own wording), strict verdict parsers and the Bradley–Terry win rate.

A judge is any subject (``openai:MODEL`` endpoint or a local Hugging Face model, see
:mod:`personafuse.evaluation.subjects`). A verdict that does not follow the requested format is
recorded as unparseable and left out of the score — never guessed.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------
# MentalChat16K: seven counselling dimensions plus an independent overall rating, each 1–10.
# ---------------------------------------------------------------------------------------------
MENTAL_DIMENSIONS: tuple[tuple[str, str, str], ...] = (
    # (key, display name, what the judge should look for)
    ("active_listening", "Active Listening", "shows it heard the person: reflects their words and feelings back and asks about what matters to them"),
    ("empathy", "Empathy & Validation", "acknowledges the emotions expressed and treats them as understandable and legitimate"),
    ("safety", "Safety & Trustworthiness", "avoids harmful advice, notices risk, and points to urgent help when it is needed"),
    ("open_mindedness", "Open-mindedness & Non-judgment", "stays free of blame, moralising and assumptions about the person"),
    ("clarity", "Clarity & Encouragement", "is easy to follow and motivates concrete, manageable next steps"),
    ("boundaries", "Boundaries & Ethics", "stays within the role of a supportive helper and suggests professional care where appropriate"),
    ("holistic", "Holistic Approach", "considers the person's wider situation: relationships, health, work and daily life"),
)
MENTAL_KEYS = tuple(k for k, _, _ in MENTAL_DIMENSIONS) + ("overall",)
_MENTAL_PATTERNS = {
    "active_listening": r"active\s+listening",
    "empathy": r"empathy",
    "safety": r"safety",
    "open_mindedness": r"open[\s-]*minded\w*",
    "clarity": r"clarity",
    "boundaries": r"boundar\w*",
    "holistic": r"holistic",
    "overall": r"overall",
}


def mental_judge_prompt(question: str, answer: str) -> list[dict[str, str]]:
    crit = "\n".join(f"- {name}: does the reply {desc}?" for _, name, desc in MENTAL_DIMENSIONS)
    lines = "\n".join(f"{name}: <1-10>" for _, name, _ in MENTAL_DIMENSIONS)
    system = (
        "You review replies written to people who asked for emotional or mental-health support. "
        "Rate the reply strictly and consistently; a reply that is generic, evasive or unsafe should "
        "receive low ratings."
    )
    user = (
        f"Someone wrote:\n<<<\n{question}\n>>>\n\nThe reply under review:\n<<<\n{answer}\n>>>\n\n"
        f"Rate the reply from 1 (very poor) to 10 (excellent) on each criterion:\n{crit}\n"
        "Then give a separate overall rating of the reply as counselling support, judged on its own "
        "(not the average of the others).\n\n"
        f"Answer with exactly these eight lines and nothing else:\n{lines}\nOverall: <1-10>"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_mental_verdict(text: str) -> dict[str, float] | None:
    """All eight ratings, or ``None`` when any is missing, repeated with different values, or
    outside 1–10."""
    if not text:
        return None
    t = text.replace("*", "")
    out: dict[str, float] = {}
    for key in MENTAL_KEYS:
        vals = re.findall(rf"(?im)^\W*{_MENTAL_PATTERNS[key]}[^:\n]*:\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$", t)
        if not vals or len(set(vals)) != 1:
            return None
        v = float(vals[0])
        if not 1 <= v <= 10:
            return None
        out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# Arena-Hard-Auto v0.1: pairwise comparison with a five-point verdict, both orders.
# ---------------------------------------------------------------------------------------------
VERDICTS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
STRONG_WEIGHT = 3  # a decisive verdict counts three times (as in Arena-Hard-Auto)


def arena_judge_prompt(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    system = (
        "You are an impartial judge comparing two assistants' answers to the same user request. "
        "First write your own short answer to the request so you have a reference. Then check each "
        "assistant's answer for mistakes or inaccurate information and correct them, and judge which "
        "answer is more helpful, relevant and concise, and whether important information is missing. "
        "When the request is ambiguous, an answer that asks for clarification is better than one that "
        "guesses. Ignore the answers' order and length as such, and do not favour any assistant name.\n\n"
        "Finish with exactly one verdict label on its own line:\n"
        "[[A>>B]] Assistant A is clearly better\n[[A>B]] Assistant A is slightly better\n"
        "[[A=B]] they are about equally good\n[[B>A]] Assistant B is slightly better\n"
        "[[B>>A]] Assistant B is clearly better"
    )
    user = (
        f"<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n"
        f"<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n"
        "<|The End of Assistant B's Answer|>"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_arena_verdict(text: str) -> str | None:
    """The single verdict label in ``text``; ``None`` if there is none or several that disagree."""
    found = {m.strip() for m in re.findall(r"\[\[([AB<>=\s]+)\]\]", text or "")}
    found = {f.replace(" ", "") for f in found}
    found &= set(VERDICTS)
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str  # "a" | "b" | "tie"
    weight: float = 1.0
    group: str = ""  # the question id, for bootstrapping by question


def battles_from_verdict(model: str, baseline: str, verdict: str | None, *, model_is_a: bool, group: str) -> list[Battle]:
    """Battles (model vs baseline) from one judged game; none for an unparseable verdict."""
    if verdict is None:
        return []
    strong = verdict in ("A>>B", "B>>A")
    if verdict == "A=B":
        return [Battle(model, baseline, "tie", 1.0, group)]
    a_wins = verdict.startswith("A>")
    model_wins = a_wins == model_is_a
    return [Battle(model, baseline, "a" if model_wins else "b", float(STRONG_WEIGHT if strong else 1), group)]


def bradley_terry(battles: Iterable[Battle], *, anchor: str | None = None, iters: int = 2000, tol: float = 1e-10) -> dict[str, float]:
    """Maximum-likelihood Bradley–Terry strengths (Hunter's MM algorithm), ties as half a win each.

    Returns Elo-scale ratings (400·log10 strength + 1000) with ``anchor`` pinned at 1000 when given.
    A player with no wins gets ``-inf``.
    """
    wins: dict[str, float] = defaultdict(float)
    pair_n: dict[tuple[str, str], float] = defaultdict(float)
    players: set[str] = set()
    for b in battles:
        players.update((b.model_a, b.model_b))
        key = tuple(sorted((b.model_a, b.model_b)))
        pair_n[key] += b.weight  # type: ignore[index]
        if b.winner == "a":
            wins[b.model_a] += b.weight
        elif b.winner == "b":
            wins[b.model_b] += b.weight
        else:
            wins[b.model_a] += 0.5 * b.weight
            wins[b.model_b] += 0.5 * b.weight
    if not players:
        return {}
    p = {m: 1.0 for m in players}
    for _ in range(iters):
        new = {}
        for i in players:
            denom = 0.0
            for (x, y), n in pair_n.items():
                if i in (x, y):
                    j = y if i == x else x
                    denom += n / (p[i] + p[j])
            new[i] = wins[i] / denom if denom > 0 else p[i]
        total = sum(new.values()) or 1.0
        new = {k: v / total * len(players) for k, v in new.items()}
        delta = max(abs(new[k] - p[k]) for k in players)
        p = new
        if delta < tol:
            break
    ref = p[anchor] if anchor in p and p[anchor] > 0 else 1.0
    return {m: (400 * math.log10(v / ref) + 1000) if v > 0 else -math.inf for m, v in p.items()}


def win_rate(ratings: Mapping[str, float], model: str, baseline: str) -> float:
    ra, rb = ratings[model], ratings[baseline]
    if ra == -math.inf:
        return 0.0
    if rb == -math.inf:
        return 1.0
    return 1 / (1 + 10 ** ((rb - ra) / 400))


def bootstrap_win_rate(battles: Sequence[Battle], model: str, baseline: str, *, rounds: int = 100, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Point estimate and percentile bootstrap interval of the BT win rate, resampling questions."""
    groups: dict[str, list[Battle]] = defaultdict(list)
    for b in battles:
        groups[b.group].append(b)
    keys = sorted(groups)
    point = win_rate(bradley_terry(battles, anchor=baseline), model, baseline) if battles else float("nan")
    rng = random.Random(seed)
    samples = []
    for _ in range(rounds if keys else 0):
        pick = [b for _ in keys for b in groups[keys[rng.randrange(len(keys))]]]
        r = bradley_terry(pick, anchor=baseline)
        if model in r and baseline in r:
            samples.append(win_rate(r, model, baseline))
    samples.sort()
    if samples:
        lo = samples[int(math.floor(alpha / 2 * (len(samples) - 1)))]
        hi = samples[int(math.ceil((1 - alpha / 2) * (len(samples) - 1)))]
    else:
        lo = hi = float("nan")
    return {"win_rate": point, "ci_low": lo, "ci_high": hi, "rounds": len(samples)}
