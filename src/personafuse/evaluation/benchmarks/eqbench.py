"""EQ-Bench (Paech 2023): rate the intensity of four named emotions of a dialogue character.

Official file: a JSON object ``{id: {"prompt", "reference_answer", "reference_answer_fullscale"}}``
(v1: 60 items, v2: 171). We reproduce the official rules:

* parse: strip ``*``/``#``, then every ``Word: <digits>`` pair; with revision on, the first-pass block
  (between "First pass scores:" and "Revised scores:") and the revised block are parsed separately;
* an answer is parseable only when exactly four pairs are found and all four name the reference's
  emotions (case-insensitive);
* v2 ("fullscale") per item: ``10 - 0.7477 * Σ f(|user - ref|)`` where f(0)=0, f(d)=6.5/(1+e^{-1.2(d-4)})
  for 0<d≤5 and f(d)=d above 5, on ``reference_answer_fullscale``;
* v1 per item: the user's scores are rescaled to sum to 10, then ``10 - Σ |user - ref|`` on
  ``reference_answer`` (an all-zero answer is unparseable);
* benchmark score: ``100 × mean(item score)/10`` over parseable items, with the percentage parseable
  reported beside it (official), plus ``score_all`` counting unparseable items as 0 (lm-eval's rule);
* retry: an unparseable answer is regenerated up to 5 attempts in all, temperature 0.01 then +0.15
  per attempt.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, ScoreContext, _mean
from personafuse.evaluation.data import DataError, hub_path, read_json

HUB_ID = "pbevan11/EQ-Bench"
ADJUST_CONST = 0.7477
FILES = ("eq_bench_v2_questions_171.json", "eq_bench_v1_questions_60.json")


def parse_answers(text: str, revise: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(first-pass, revised) ``{emotion: digits}`` dicts following the official parse rule."""
    text = text.replace("*", "").replace("#", "")
    pair = r"(\w+):\s+(\d+)"
    if not revise:
        return dict(re.findall(pair, text)), {}
    first: dict[str, str] = {}
    revised: dict[str, str] = {}
    m = re.search(r"First pass scores:(.*?)Revised scores:", text, re.DOTALL)
    if m:
        first = dict(re.findall(pair, m.group(1)))
    m = re.search(r"Revised scores:(.*?)$", text, re.DOTALL)
    if m:
        revised = dict(re.findall(pair, m.group(1)))
    return first, revised


def _reference(ref: Mapping[str, Any]) -> dict[str, float]:
    return {str(ref[f"emotion{i}"]).lower(): float(ref[f"emotion{i}_score"]) for i in range(1, 5)}


def _matches(ref: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, float] | None:
    if len(user) != 4:
        return None
    want = _reference(ref)
    got = {k.lower(): float(v) for k, v in user.items()}
    if set(got) != set(want):
        return None
    return got


def _sigmoid_diff(d: float) -> float:
    if d == 0:
        return 0.0
    if d <= 5:
        return 6.5 * (1 / (1 + math.e ** (-1.2 * (d - 4))))
    return d


def score_v2(reference_fullscale: Mapping[str, Any], user: Mapping[str, Any]) -> float | None:
    """Per-item v2 score on the 0–10 scale (can go below 0), or ``None`` when unparseable."""
    got = _matches(reference_fullscale, user)
    if got is None:
        return None
    want = _reference(reference_fullscale)
    tally = sum(_sigmoid_diff(abs(got[e] - want[e])) for e in want)
    return 10 - tally * ADJUST_CONST


def score_v1(reference: Mapping[str, Any], user: Mapping[str, Any]) -> float | None:
    """Per-item v1 score on the 0–10 scale (user scores rescaled to sum to 10), or ``None``."""
    got = _matches(reference, user)
    if got is None:
        return None
    total = sum(got.values())
    if total <= 0:
        return None
    got = {e: v / total * 10 for e, v in got.items()}
    want = _reference(reference)
    return 10 - sum(abs(got[e] - want[e]) for e in want)


def strip_revision(prompt: str) -> str:
    """The prompt without the critique-and-revise part (the official v2 default asks for one pass)."""
    p = prompt.replace(" Then critique your answer by thinking it through step by step. Finally, give your revised scores.", "")
    p = p.replace("First pass scores:\n", "")
    a, b = p.find("Critique: <your critique here>"), p.find("[End of answer]")
    if a != -1 and b != -1:
        p = p[:a] + "\n" + p[b:]
    return p + "\nYour answer:\n"


def _parse_ref(v: Any, where: str) -> dict[str, Any]:
    if isinstance(v, str):  # the Hub copy stores references as Python-literal strings
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: reference is not a mapping: {v[:60]!r}") from None
    if not isinstance(v, dict):
        raise DataError(f"{where}: reference should be an object, got {type(v).__name__}")
    for i in range(1, 5):
        for k in (f"emotion{i}", f"emotion{i}_score"):
            if k not in v:
                raise DataError(f"{where}: reference lacks {k!r}")
        try:
            float(v[f"emotion{i}_score"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: emotion{i}_score {v[f'emotion{i}_score']!r} is not a number") from None
    return v


class EQBench(Benchmark):
    name = "eqbench"
    title = "EQ-Bench"
    folder = "eq-bench"
    max_attempts = 5

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.revise = bool(self.options.get("revise", False))
        self.version = str(self.options.get("version", "v2"))
        if self.version not in ("v1", "v2"):
            raise DataError(f"eqbench: version must be v1 or v2, got {self.version!r}")
        self.max_new_tokens = int(self.options.get("max_new_tokens", 600 if self.revise else 80))

    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            from datasets import load_dataset

            ds = load_dataset(hub_path(HUB_ID), split="validation")
            raw = {str(r.get("id", i + 1)): dict(r) for i, r in enumerate(ds)}
            path = HUB_ID
        else:
            path = source
            if source.is_dir():
                found = next((source / f for f in FILES if (source / f).is_file()), None)
                if found is None:
                    found = next(iter(sorted(source.glob("eq_bench*questions*.json"))), None)
                if found is None:
                    raise DataError(f"eqbench: no eq_bench_*questions*.json in {source}")
                path = found
            raw = read_json(path)
            if not isinstance(raw, dict):
                raise DataError(f"{path}: expected an object {{id: question}}, got {type(raw).__name__}")
        items = []
        for qid, q in raw.items():
            where = f"{path}: question {qid}"
            if not isinstance(q, dict) or "prompt" not in q:
                raise DataError(f"{where}: missing field 'prompt'")
            ref1 = _parse_ref(q.get("reference_answer"), where + " reference_answer") if q.get("reference_answer") else None
            ref2 = _parse_ref(q["reference_answer_fullscale"], where + " reference_answer_fullscale") if q.get("reference_answer_fullscale") else None
            if self.version == "v2" and ref2 is None:
                raise DataError(f"{where}: v2 scoring needs 'reference_answer_fullscale'")
            if ref1 is None and ref2 is None:
                raise DataError(f"{where}: missing field 'reference_answer'")
            prompt = q["prompt"] if self.revise else strip_revision(q["prompt"])
            items.append(Item(id=str(qid), prompt=prompt, reference={"v1": ref1, "v2": ref2}))
        return items

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        first, revised = parse_answers(responses[0], self.revise)
        ref1, ref2 = item.reference["v1"], item.reference["v2"]
        res: dict[str, Any] = {}
        for tag, ans in (("first_pass", first), ("revised", revised)):
            if tag == "revised" and not self.revise:
                continue
            res[f"{tag}_v2"] = score_v2(ref2, ans) if ref2 else None
            res[f"{tag}_v1"] = score_v1(ref1, ans) if ref1 else None
        use = "revised" if self.revise and res.get(f"revised_{self.version}") is not None else "first_pass"
        parsed_ans = revised if use == "revised" else first
        main = res.get(f"{use}_{self.version}")
        return {
            "parsed": parsed_ans if main is not None else None,
            "score": main,
            "score_v2": res.get(f"{use}_v2"),
            "score_v1": res.get(f"{use}_v1"),
            **res,
        }

    def needs_retry(self, record: Mapping[str, Any]) -> bool:
        # Official rule: retry until the (first-pass, and with revision the revised) answer parses.
        if self.revise:
            return record.get(f"first_pass_{self.version}") is None or record.get(f"revised_{self.version}") is None
        return record.get("score") is None

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        n = len(records)
        out: dict[str, Any] = {}
        for ver in ("v2", "v1"):
            fp = [r[f"first_pass_{ver}"] for r in records if r.get(f"first_pass_{ver}") is not None]
            rv = [r[f"revised_{ver}"] for r in records if r.get(f"revised_{ver}") is not None]
            s_fp = 100 * _mean(fp) / 10 if fp else 0.0
            s_rv = 100 * _mean(rv) / 10 if rv else 0.0
            # Official choice: take the revised score when it is at least as good and (almost) as
            # parseable as the first pass.
            if self.revise and s_rv >= s_fp and len(rv) >= 0.95 * len(fp):
                score, parseable = s_rv, len(rv)
            else:
                score, parseable = s_fp, len(fp)
            out[f"score_{ver}"] = round(score, 4)
            out[f"percent_parseable_{ver}"] = round(100 * parseable / n, 2) if n else 0.0
            out[f"score_all_{ver}"] = round(100 * sum(fp) / 10 / n, 4) if n else 0.0
        out = {
            "score": out[f"score_{self.version}"],
            "percent_parseable": out[f"percent_parseable_{self.version}"],
            "score_all": out[f"score_all_{self.version}"],
            **out,
            "version": self.version,
            "revise": self.revise,
            "n": n,
            "n_unparsed": sum(1 for r in records if r.get("parsed") is None),
            "mean_attempts": round(_mean([float(r.get("attempts", 1)) for r in records]), 3),
        }
        return out
