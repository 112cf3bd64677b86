"""GPQA (Rein et al. 2024): graduate-level four-option questions, subsets diamond/main/extended.

Reference: lm-evaluation-harness v0.4.13, tasks ``gpqa_{diamond,main,extended}_cot_zeroshot``
(``lm_eval/tasks/gpqa/cot_zeroshot/_gpqa_cot_zeroshot_yaml`` and ``utils.py``, metadata.version
2.2): the zero-shot generative variant, the one a generate-then-parse harness and the paper's
zero-shot chat setting can run (``gpqa_*_zeroshot`` scores option log-likelihoods instead; run it
through ``lm_eval --model personafuse``). Its prompt template, stop strings, filters and metric
settings are READ from the installed lm-eval's yaml at run time:

* choices: ``utils.py:preprocess`` of [Incorrect 1, Incorrect 2, Incorrect 3, Correct], shuffled;
  lm-eval shuffles with the process-global ``random`` (its run seed and load order), we with a
  per-item seeded RNG, so the options' order differs from an lm-eval run (the set does not);
* ``score`` = flexible-extract (``MultiChoiceRegexFilter``, ``lm_eval/filters/extraction.py``: the
  last ``(X)``, else the last option text, else ``: X``; ``[invalid]`` = wrong) - the prompt asks for
  no answer phrase, so the strict filter measures whether the model happens to write "The answer is";
* ``score_strict`` = strict-match (``(?<=The answer is )(.*)(?=.)``, first match) beside it;
* both then exact_match against ``(X)`` ignoring case and punctuation.

Official files (gated on the Hub as ``Idavidrein/gpqa``, configs ``gpqa_diamond``/``gpqa_main``/
``gpqa_extended``; also in the dataset zip): CSVs ``gpqa_<subset>.csv`` with ``Question``,
``Correct Answer``, ``Incorrect Answer 1..3``, ``Record ID`` and ``High-level domain``. The headline
is the mean of the subset accuracies present (the paper's Table 14 averages the three; lm-eval reports
each task on its own), ``accuracy`` the pooled mean.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import Benchmark, Item, Reference, ScoreContext, mean, stderr
from personafuse.evaluation.benchmarks.gsm8k import (
    INVALID,
    LM_EVAL_VERSION,
    check_task_version,
    cut_at_stops,
    exact_match,
    installed_lm_eval,
    read_lm_eval_task,
    regex_filter,
    render,
)
from personafuse.evaluation.data import DataError, field, hub_path, is_missing, read_csv, stable_rng

HUB_ID = "Idavidrein/gpqa"
SUBSETS = ("diamond", "main", "extended")
TASK_VERSION = 2.2


def preprocess(text: Any) -> str:
    """lm_eval/tasks/gpqa/cot_zeroshot/utils.py ``preprocess`` (v0.4.13)."""
    if text is None:
        return " "
    text = str(text).strip().replace(" [title]", ". ")
    return text.replace("  ", " ")


@cache
def _punct_table() -> dict[int, None]:
    return dict.fromkeys(i for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P"))


def _find(regex: re.Pattern[str], resp: str, group_select: int, convert: Mapping[str, str]) -> str:
    found = regex.findall(resp)
    if not found:
        return ""
    match = found[group_select]
    if isinstance(match, tuple):
        nonempty = [m for m in match if m]
        if not nonempty:
            return ""
        match = nonempty[0]
    match = match.strip()
    return convert.get(match, match) if match else match


def multi_choice_regex(resp: str, choices: Sequence[str], pattern: str, *, group_select: int = 0, ignore_case: bool = False, ignore_punctuation: bool = False, fallback: str = INVALID) -> str:
    """lm_eval/filters/extraction.py ``MultiChoiceRegexFilter.apply`` for one reply (v0.4.13)."""

    def ignores(s: str) -> str:
        s = s.lower() if ignore_case else s
        return s.translate(_punct_table()) if ignore_punctuation else s

    to_letter, letters = {}, []
    for i, c in enumerate(choices):
        to_letter[ignores(c.strip())] = f"({chr(65 + i)})"
        letters.append(chr(65 + i))
    # Longest alternatives first, so an option that is a prefix of another cannot shadow it.
    text_re = re.compile("|".join(sorted((re.escape(m) for m in to_letter), key=len, reverse=True)))
    colon_re = re.compile(rf":[\s]*({'|'.join(letters)})")
    match = _find(re.compile(pattern), resp, group_select, {})
    if not match:
        match = _find(text_re, ignores(resp), group_select, to_letter)
        if not match:
            match = _find(colon_re, resp, group_select, {k: f"({k})" for k in letters})
    return match or fallback


class GPQA(Benchmark):
    # The reference prompts a raw completion (no chat template); -o gpqa.chat_template=true for a chat model.
    chat_template = False
    name = "gpqa"
    title = "GPQA"
    score_variants = ("score_strict",)
    group = "General intelligence and safety"
    order = 40
    folder = "gpqa"
    gated = HUB_ID  # the authors ask users to accept terms (no plain-text copies online)
    max_new_tokens = 256  # lm-eval's generate_until default max_gen_toks (the yaml sets none)
    reference = Reference(
        repo="EleutherAI/lm-evaluation-harness",
        commit=f"v{LM_EVAL_VERSION}",
        files=("lm_eval/tasks/gpqa/cot_zeroshot/_gpqa_cot_zeroshot_yaml", "lm_eval/tasks/gpqa/cot_zeroshot/utils.py", "lm_eval/filters/extraction.py", "lm_eval/api/metrics.py"),
        task="gpqa_{diamond,main,extended}_cot_zeroshot@2.2",
        note="score=flexible-extract (mean of subset accuracies, the paper's average), score_strict=strict-match",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.cfg = read_lm_eval_task("gpqa/cot_zeroshot/gpqa_diamond_cot_zeroshot.yaml")
        check_task_version(self.cfg, TASK_VERSION)
        filters = {f["name"]: f["filter"][0] for f in self.cfg["filter_list"]}
        self.strict, self.flexible = filters["strict-match"], filters["flexible-extract"]
        m = next(m for m in self.cfg["metric_list"] if m["metric"] == "exact_match")
        self.metric = {k: m[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation") if k in m}
        self.until = list((self.cfg.get("generation_kwargs") or {}).get("until") or [])

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "lm_eval_task_file": self.cfg["__path__"],
            "lm_eval_installed": installed_lm_eval(),
            "task_version": self.cfg["metadata"]["version"],
            "subsets": self._subsets(),
            "num_fewshot": 0,
            "prompt_template": self.cfg["doc_to_text"],
            "until": self.until,
            "filters": {"strict-match": self.strict, "flexible-extract": self.flexible},
            "metric": self.metric,
            "option_order": "per-item seeded shuffle (lm-eval: process-global random.shuffle)",
            "system_prompt": None,
            "temperature": 0.0,
        }

    def _subsets(self) -> list[str]:
        s = self.options.get("subsets", SUBSETS)
        subs = [x.strip() for x in s.split(",")] if isinstance(s, str) else list(s)
        for x in subs:
            if x not in SUBSETS:
                raise DataError(f"gpqa: unknown subset {x!r}; expected some of {', '.join(SUBSETS)}")
        return subs

    def _rows(self, source: Path | None) -> list[tuple[str, Any, dict[str, Any]]]:
        rows: list[tuple[str, Any, dict[str, Any]]] = []
        if source is None:
            from datasets import load_dataset

            for sub in self._subsets():
                ds = load_dataset(hub_path(HUB_ID), f"gpqa_{sub}", split="train")
                rows += [(sub, HUB_ID, dict(r, __line__=i + 2)) for i, r in enumerate(ds)]
        elif source.is_file():
            sub = next((s for s in SUBSETS if s in source.stem), "main")
            rows += [(sub, source, r) for r in read_csv(source)]
        else:
            for sub in self._subsets():
                p = source / f"gpqa_{sub}.csv"
                if p.is_file():
                    rows += [(sub, p, r) for r in read_csv(p)]
            if not rows:
                raise DataError(f"gpqa: none of gpqa_{{{','.join(self._subsets())}}}.csv in {source}")
        return rows

    def load_items(self, source: Path | None) -> list[Item]:
        seed = int(self.options.get("seed", 0))
        items = []
        for sub, path, row in self._rows(source):
            q = field(row, "Question", path)
            correct = field(row, "Correct Answer", path)
            wrong = [field(row, f"Incorrect Answer {i}", path) for i in (1, 2, 3)]
            if any(is_missing(x) for x in [q, correct, *wrong]):
                raise DataError(f"{path}:{row['__line__']}: empty question or answer field")
            rid = str(row.get("Record ID") or row["__line__"])
            choices = [preprocess(w) for w in wrong] + [preprocess(correct)]  # utils.py's order
            stable_rng(seed, "gpqa", sub, rid).shuffle(choices)
            gold = choices.index(preprocess(correct))
            doc = {"Question": q, **{f"choice{i + 1}": c for i, c in enumerate(choices)}}
            items.append(
                Item(
                    id=f"{sub}-{rid}",
                    prompt=render(self.cfg["doc_to_text"], doc, f"{path}:{row['__line__']}"),
                    reference=gold,
                    categories={"subset": sub, "domain": str(row.get("High-level domain", "") or "")},
                    meta={"options": choices},
                )
            )
        return items

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        reply = cut_at_stops(responses[0], self.until)
        target = f"({chr(65 + item.reference)})"  # utils.py process_docs "answer"
        strict = regex_filter(reply, self.strict["regex_pattern"], int(self.strict.get("group_select", 0)))
        f = self.flexible
        flex = multi_choice_regex(
            reply, item.meta["options"], f["regex_pattern"], group_select=int(f.get("group_select", 0)),
            ignore_case=bool(f.get("ignore_case", False)), ignore_punctuation=bool(f.get("ignore_punctuation", False)),
        )
        return {
            "parsed": None if flex == INVALID else flex,
            "parsed_strict": None if strict == INVALID else strict,
            "gold": target,
            "score": exact_match(flex, target, **self.metric),
            "score_strict": exact_match(strict, target, **self.metric),
        }

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(records)
        out["accuracy"], out["accuracy_stderr"] = out["score"], out["stderr"]
        xs = [float(r.get("score_strict") or 0.0) for r in records]
        out["accuracy_strict"], out["accuracy_strict_stderr"] = mean(xs), stderr(xs)
        out["n_unparsed_strict"] = sum(1 for r in records if r.get("parsed_strict") is None)
        out["by_subset_strict"] = self.breakdowns(records, "score_strict").get("by_subset", {})
        for key, sc in (("score", "score"), ("score_strict", "score_strict")):
            subs: dict[str, list[float]] = {}
            for r in records:
                subs.setdefault(str((r.get("categories") or {}).get("subset")), []).append(float(r.get(sc) or 0.0))
            if subs:  # a mean of independent subset means: its stderr is sqrt(sum se_i^2) / k
                out[key] = mean([mean(v) for v in subs.values()])
                out[key.replace("score", "stderr")] = math.sqrt(sum(stderr(v) ** 2 for v in subs.values())) / len(subs)
        out["score_variant"] = "flexible-extract, mean of subsets"
        return out
