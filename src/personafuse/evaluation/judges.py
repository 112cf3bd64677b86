"""LLM judges as the references run them: their prompts (read from the benchmarks' own files), their
verdict parsers and their aggregation.

* Arena-Hard-Auto v0.1 — lmarena/arena-hard-auto: ``config/judge_config.yaml`` of release
  ``7f1b7f5`` (judge system prompt, prompt template, label regex, temperature, max tokens) and the
  v0.1 code as last released before the v2.0 rewrite, ``3071ef9``: ``gen_judgment.py`` (``judgment``,
  ``get_score``), ``show_result.py`` (``get_battles_from_row``) and ``utils_math.py``
  (``compute_mle_elo``, ``get_bootstrap_result``, ``predict_win_rate``, ``get_win_rate_column``).
* MentalChat16K — ChiaPatricia/MentalChat16K_Main@9eb19df holds the judge's records
  (``data/eval_jsonl/newCombined_bench/model_judgment/gpt-4_single.jsonl``, judge
  ``["gpt-4", "single-mental-v1"]``) but no judge code: the records are FastChat llm_judge output, so
  the harness is lm-sys/FastChat@v0.2.32 (dd84d16, Nov 2023, the records' date) ``fastchat/llm_judge/
  common.py:run_judge_single`` and ``show_result.py:display_result_single``.

A judge is any subject (``openai:MODEL`` endpoint or a local Hugging Face model, see
:mod:`personafuse.evaluation.subjects`).
"""

from __future__ import annotations

import ast
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse.configs import config_class
from personafuse.evaluation.data import DataError
from personafuse.fileio import read_jsonl

# ---------------------------------------------------------------------------------------------
# Arena-Hard-Auto v0.1
# ---------------------------------------------------------------------------------------------
VERDICTS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")  # the labels show_result.py turns into battles
STRONG_WEIGHT = 3  # show_result.py --weight default: a decisive verdict is 3 battles
# gen_judgment.py:judgment, the user turn sent when a judgment has no label (short format line).
CONTINUE_PROMPT = "continue your judgment and finish by outputting a final verdict label"
DEFAULT_ATTEMPTS = 2  # release 7f1b7f5 hard-codes ``for _ in range(2)``; later configs name it
ELO_CLIP = 4800.0  # |rating gap| cap (a win rate of 1e-12 from 0 or 1): keeps a no-win side finite


@config_class(frozen=True)
class ArenaJudgeConfig:
    """What ``judge_config.yaml`` fixes for the judge (read, never restated in our code)."""

    system_prompt: str
    prompt_template: tuple[str, ...]
    regex_pattern: str
    temperature: float
    max_tokens: int
    attempts: int
    judge_model: str
    baseline_model: str
    source: str

    @classmethod
    def from_yaml(cls, path: str | Path) -> ArenaJudgeConfig:
        import yaml

        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"{p}: cannot read the Arena-Hard judge config: {e}") from e
        if not isinstance(raw, dict):
            raise DataError(f"{p}: the Arena-Hard judge config is not a mapping")
        for key in ("system_prompt", "prompt_template", "regex_pattern", "temperature", "max_tokens"):
            if raw.get(key) is None:
                raise DataError(f"{p}: missing field {key!r} (judge_config.yaml of lmarena/arena-hard-auto)")
        tmpl = raw["prompt_template"]
        tmpl = (tmpl,) if isinstance(tmpl, str) else tuple(str(t) for t in tmpl)
        for t in tmpl:
            if "{answer_1}" not in t or "{answer_2}" not in t or "{question_1}" not in t:
                raise DataError(f"{p}: field 'prompt_template' lacks {{question_1}}, {{answer_1}} or {{answer_2}}")
        try:
            re.compile(str(raw["regex_pattern"]))
        except re.error as e:
            raise DataError(f"{p}: field 'regex_pattern' is not a regular expression: {e}") from e
        return cls(
            system_prompt=str(raw["system_prompt"]),
            prompt_template=tmpl,
            regex_pattern=str(raw["regex_pattern"]),
            temperature=float(raw["temperature"]),
            max_tokens=int(raw["max_tokens"]),
            attempts=int(raw.get("number_of_judgment_attempts") or DEFAULT_ATTEMPTS),
            judge_model=str(raw.get("judge_model", "")),
            baseline_model=str(raw.get("baseline_model", "gpt-4-0314")),
            source=str(p),
        )

    def messages(self, question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
        """gen_judgment.py:judgment: the system prompt, then one user turn per template."""
        conv = [{"role": "system", "content": self.system_prompt}]
        for t in self.prompt_template:
            conv.append({"role": "user", "content": t.format(question_1=question, answer_1=answer_1, answer_2=answer_2)})
        return conv


def arena_get_score(judgment: str, pattern: str | re.Pattern[str]) -> tuple[str | None, bool]:
    """gen_judgment.py:get_score (pairwise): ``(label, try_again)``. No match: ``(None, True)``; one
    distinct match (however often repeated): ``(it, False)``; several distinct: ``(None, False)``."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    matches = [m for m in rx.findall(judgment) if m != ""]
    if len(set(matches)) == 0:
        return None, True
    if len(set(matches)) == 1:
        return matches[0].strip("\n"), False
    return None, False


def parse_arena_verdict(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """The label ``get_score`` reads from one judgment (``None``: none, or several that differ)."""
    return arena_get_score(text or "", pattern)[0]


def continue_messages(messages: Sequence[Mapping[str, str]], reply: str) -> list[dict[str, str]]:
    """The second attempt's conversation: the first reply and the reference's "continue" turn."""
    return [dict(m) for m in messages] + [{"role": "assistant", "content": reply}, {"role": "user", "content": CONTINUE_PROMPT}]


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str  # "a" | "b" | "tie"
    weight: float = 1.0
    group: str = ""  # the question id


def battles_from_verdict(model: str, baseline: str, verdict: str | None, *, model_is_a: bool, group: str, weight: int = STRONG_WEIGHT) -> list[Battle]:
    """show_result.py:get_battles_from_row for one game: a decisive label is ``weight`` identical
    battles (rows, so the bootstrap draws them one by one), a slight one or a tie one battle, and
    anything else (no label, several, ``A<B``, ``B=A``...) none."""
    if verdict not in VERDICTS:
        return []
    if verdict == "A=B":
        return [Battle(model, baseline, "tie", 1.0, group)]
    model_wins = verdict.startswith("A>") == model_is_a
    n = weight if verdict in ("A>>B", "B>>A") else 1
    return [Battle(model, baseline, "a" if model_wins else "b", 1.0, group)] * n


def bradley_terry(battles: Iterable[Battle], *, anchor: str | None = None, iters: int = 2000, tol: float = 1e-10) -> dict[str, float]:
    """Maximum-likelihood Bradley–Terry strengths (Hunter's MM algorithm), a tie half a win each —
    the optimum of utils_math.py:compute_mle_elo's logistic regression (each battle twice, a tie once
    won by each side). Elo scale (400·log10 strength + 1000), ``anchor`` at 1000; no wins: ``-inf``."""
    wins: dict[str, float] = defaultdict(float)
    pair_n: dict[tuple[str, str], float] = defaultdict(float)
    players: set[str] = set()
    for b in battles:
        players.update((b.model_a, b.model_b))
        x, y = sorted((b.model_a, b.model_b))
        pair_n[(x, y)] += b.weight
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
            denom = sum(n / (p[i] + p[y if i == x else x]) for (x, y), n in pair_n.items() if i in (x, y))
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
    """utils_math.py:predict_win_rate for the pair: ``1 / (1 + 10^((R_base - R_model)/400))``."""
    return _rate_of_gap(_gap(ratings, model, baseline))


def _gap(ratings: Mapping[str, float], model: str, baseline: str) -> float:
    d = ratings[model] - ratings[baseline] if math.isfinite(ratings[model]) or math.isfinite(ratings[baseline]) else 0.0
    return min(max(d, -ELO_CLIP), ELO_CLIP) if not math.isnan(d) else 0.0


def _rate_of_gap(d: float) -> float:
    if abs(d) >= ELO_CLIP:  # a side without wins: exactly 0 or 1, as the reference's rounding shows it
        return 0.0 if d < 0 else 1.0
    return 1 / (1 + 10 ** (-d / 400))


def bootstrap_win_rate(battles: Sequence[Battle], model: str, baseline: str, *, rounds: int = 100, seed: int = 42, alpha: float = 0.05) -> dict[str, Any]:
    """show_result.py's point estimate and interval: Bradley–Terry on every battle, then ``rounds``
    resamples of the battle rows with replacement (utils_math.py:get_bootstrap_result,
    ``battles.sample(frac=1.0, replace=True)``; numpy seeded 42 there), the 2.5/97.5 percentiles of
    the ratings (``np.percentile``), each as a win rate against the baseline. ``boot_std`` is the
    resampled win rates' standard deviation."""
    import numpy as np

    if not battles:
        return {"win_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "rounds": 0, "boot_std": float("nan")}
    point = _gap(bradley_terry(battles, anchor=baseline), model, baseline)
    rng = np.random.RandomState(seed)
    gaps = []
    for _ in range(rounds):
        pick = [battles[i] for i in rng.choice(len(battles), size=len(battles), replace=True)]
        r = bradley_terry(pick, anchor=baseline)
        if model in r and baseline in r:
            gaps.append(_gap(r, model, baseline))
    if not gaps:
        return {"win_rate": _rate_of_gap(point), "ci_low": float("nan"), "ci_high": float("nan"), "rounds": 0, "boot_std": float("nan")}
    lo, hi = np.percentile(gaps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    rates = [_rate_of_gap(g) for g in gaps]
    return {
        "win_rate": _rate_of_gap(point),
        "ci_low": _rate_of_gap(float(lo)),
        "ci_high": _rate_of_gap(float(hi)),
        "rounds": len(gaps),
        "boot_std": float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# MentalChat16K: FastChat's single-answer grading with the authors' ``single-mental-v1`` prompt.
# ---------------------------------------------------------------------------------------------
# Our result keys for the prompt's seven "Consultation Metrics", in the prompt's order, each with a
# stem its name must contain (a prompt file whose list differs is refused, not silently remapped).
MENTAL_METRIC_KEYS: tuple[tuple[str, str], ...] = (
    ("active_listening", "listening"),
    ("empathy", "empathy"),
    ("safety", "safety"),
    ("open_mindedness", "open"),
    ("clarity", "clarity"),
    ("boundaries", "boundaries"),
    ("holistic", "holistic"),
)
MENTAL_KEYS = tuple(k for k, _ in MENTAL_METRIC_KEYS) + ("overall",)
MENTAL_PROMPT_NAME = "single-mental-v1"
# FastChat v0.2.32 data/judge_prompts.jsonl ``single-v1``: the system prompt of the single-answer
# judge whose instruction layout single-mental-v1 follows (the records do not store it).
FASTCHAT_SINGLE_SYSTEM = "You are a helpful assistant."
FASTCHAT_JUDGE_MAX_TOKENS = 2048  # common.py:run_judge_single for gpt-4 (temperature 0)
# FastChat single-v1's layout around the question and answer (short format lines, as it writes them).
_Q_HEAD = "[Question]\n"
_A_HEAD = "\n\n[The Start of Assistant's Answer]\n"
_A_TAIL = "\n[The End of Assistant's Answer]"
# common.py: one_score_pattern and one_score_pattern_backup.
_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass(frozen=True)
class MentalJudgePrompt:
    """The ``single-mental-v1`` instruction, read from the authors' judgment records."""

    instruction: str  # the user prompt up to and including "[Question]\n"
    metrics: tuple[str, ...]  # the seven metric names as the prompt writes them
    source: str
    system_prompt: str = FASTCHAT_SINGLE_SYSTEM

    @classmethod
    def from_judgment_file(cls, path: str | Path) -> MentalJudgePrompt:
        p = Path(path)
        instr = None
        # the authors' records are input: a cut last line is an error, not skipped
        for n, rec in read_jsonl(p, error=DataError, strict=True):
            judge = rec.get("judge")
            if not (isinstance(judge, list) and len(judge) == 2 and judge[1] == MENTAL_PROMPT_NAME):
                continue
            up = rec.get("user_prompt")
            if not isinstance(up, str) or _Q_HEAD not in up or _A_HEAD not in up or not up.endswith(_A_TAIL):
                raise DataError(f"{p}:{n}: field 'user_prompt' is not laid out as FastChat's single-answer prompt ([Question] ... [The End of Assistant's Answer])")
            head = up[: up.index(_Q_HEAD) + len(_Q_HEAD)]
            if instr is not None and head != instr:
                raise DataError(f"{p}:{n}: field 'user_prompt' has another {MENTAL_PROMPT_NAME} instruction than the lines before")
            instr = head
        if instr is None:
            raise DataError(f"{p}: no record judged with {MENTAL_PROMPT_NAME!r} (field 'judge')")
        return cls(instruction=instr, metrics=_metric_names(instr, p), source=str(p))

    def messages(self, question: str, answer: str) -> list[dict[str, str]]:
        """run_judge_single: system prompt + the template filled with the first turn and answer."""
        user = self.instruction + question + _A_HEAD + answer + _A_TAIL
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]


def _metric_names(instruction: str, path: Path) -> tuple[str, ...]:
    part = instruction.split("Consultation Metrics:", 1)
    names = tuple(m.strip() for m in re.findall(r"(?m)^\d+\.\s*([^:\n]+):", part[1])) if len(part) == 2 else ()
    if len(names) != len(MENTAL_METRIC_KEYS) or any(stem not in n.lower() for n, (_, stem) in zip(names, MENTAL_METRIC_KEYS, strict=False)):
        raise DataError(f"{path}: the {MENTAL_PROMPT_NAME} prompt's 'Consultation Metrics' list is not the seven metrics expected ({names})")
    return names


def _number(s: str) -> float:
    # ast.literal_eval as common.py does ("7" -> 7, "7.5" -> 7.5, "7." -> 7.0); "07" (a SyntaxError there) reads 7.
    try:
        return float(ast.literal_eval(s))
    except (ValueError, SyntaxError):
        return float(s)


def fastchat_rating(text: str) -> float | None:
    """common.py:run_judge_single: the first ``[[n]]``, else the first ``[n]``; ``None`` where the
    reference stores -1 (left out of the mean by show_result.py)."""
    m = _ONE_SCORE.search(text or "") or _ONE_SCORE_BACKUP.search(text or "")
    return _number(m.group(1)) if m else None


def labelled_rating(text: str, label: str) -> float | None:
    """``label: [[n]]`` (or ``[n]``), markdown emphasis allowed around the label: the first one."""
    words = r"\s+".join(re.escape(w) for w in label.split())
    rx = re.compile(rf"(?i)(?<![a-z]){words}[\s*_]*:[\s*_]*\[\[?(\d+\.?\d*)\]")
    m = rx.search(text or "")
    return _number(m.group(1)) if m else None


def parse_mental_verdict(text: str, metrics: Sequence[str]) -> dict[str, float | None]:
    """``overall``: the reference's rating (``fastchat_rating``); each metric: ``Name: [[n]]`` (the
    reference records no metric, see labelled_rating); ``rating_labelled``: ``Rating: [[n]]``."""
    out: dict[str, float | None] = {key: labelled_rating(text, name) for (key, _), name in zip(MENTAL_METRIC_KEYS, metrics, strict=True)}
    out["overall"] = fastchat_rating(text)
    out["rating_labelled"] = labelled_rating(text, "Rating")
    return out
