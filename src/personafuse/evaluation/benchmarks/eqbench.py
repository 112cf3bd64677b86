"""EQ-Bench (Paech 2023): rate the intensity of four named emotions of a dialogue character.

Reference: EQ-bench/EQ-Bench@d28c60c (the original repository; the benchdata files come from it):
``eq-bench.py`` (defaults: v2 file, no revision, ``n_question_attempts=3``), ``lib/eq_bench_utils.py``
``process_question`` (60 completion tokens, retry rule), ``lib/scoring.py`` (``parse_answers``,
``calculate_score``, ``calculate_score_fullscale``, ``calculate_eq_bench_score``),
``lib/run_bench_helper_functions.py:remove_revision_instructions`` and ``lib/run_bench.py``
(version from the file: 60 questions = v1; a run with under 83.33 % parseable answers fails).

Official file: ``{id: {"prompt", "reference_answer", "reference_answer_fullscale"}}``, v1 (60) or v2
(171). As the reference does:

* prompt: the file's; for v2 without revision the critique-and-revise part is cut out
  (``remove_revision_instructions``); v1 keeps the full prompt. One user turn. System message: for
  a local subject (``default``, ``base``, ``hf:``, ``lora:``, ``pf:``) "You are an expert in
  emotional analysis.", as the official local paths send it (``lib/run_query.py:286-301``
  ``generate_prompt_from_template``, used by the transformers path ``run_query`` and by
  ``run_llamacpp_query``: the default fills a template's ``<|system-message|>`` slot, e.g. ChatML's,
  SmolLM2's and Qwen's format); for an OpenAI-compatible endpoint none (``run_openai_query`` sends
  the user turn alone). ``-o eqbench.system=none`` or ``=TEXT`` overrides; ``--system-prompt`` wins.
* parse: every ``(\\w+):\\s+(\\d+)`` pair of the reply (with revision: of the first-pass and the
  revised block separately), later duplicates overwrite earlier ones; nothing is stripped first;
* an answer counts only with exactly four pairs naming the reference's four emotions exactly (case
  sensitive) and, because success is judged by the v1 scorer in every version, scores not all zero;
* retry: an answer that does not count is regenerated, 3 attempts in all, temperature 0.01 then
  +0.15 a retry; after the last failure the item is left out (not scored, not parseable);
* v2 ("fullscale") item: ``10 - 0.7477 * Σ f(|user - ref|)``, f(0)=0, f(d)=6.5/(1+e^{-1.2(d-4)}) for
  d≤5, else d; v1 item: user scores rescaled to sum 10, then ``10 - Σ |user - ref|``;
* ``score`` = ``100 × mean(item)/10`` over the answers that count (with revision, the revised pass when
  it scores at least as high and is ≥95 % as parseable), ``parseable`` and ``failed`` (the reference's
  83.33 % rule) beside it. ``score_lm_eval``: lm-eval's ``eq_bench`` scorer (lm_eval/tasks/eq_bench/
  utils.py ``calculate_score_fullscale``, task version 2.1) on the same final replies: unparseable
  = 0, no all-zero rule, mean over all items.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personafuse.evaluation.benchmarks.base import (
    Benchmark,
    Item,
    Reference,
    ScoreContext,
    mean,
    stderr,
    subject_model,
)
from personafuse.evaluation.data import DataError, hub_path, read_json

HUB_ID = "pbevan11/EQ-Bench"
ADJUST_CONST = 0.7477
FILES = {"v2": "eq_bench_v2_questions_171.json", "v1": "eq_bench_v1_questions_60.json"}
V1_SIZE = 60  # lib/run_bench.py setup_benchmark: "v1" if len(questions) == 60 else "v2"
MIN_PARSEABLE = 0.8333  # lib/run_bench.py: a run below this share of parseable answers fails
PAIR = r"(\w+):\s+(\d+)"
REVISION_MARK = "Critique: <your critique here>"  # in the official files' full (revision) prompts
# lib/run_query.py:289 (d28c60c) generate_prompt_from_template's default_system_message.
LOCAL_SYSTEM = "You are an expert in emotional analysis."


def parse_answers(text: str, revise: bool) -> tuple[dict[str, str], dict[str, str]]:
    """lib/scoring.py ``parse_answers``: (first-pass, revised) ``{emotion: digits}``."""
    if not revise:
        return dict(re.findall(PAIR, text)), {}
    first: dict[str, str] = {}
    revised: dict[str, str] = {}
    m = re.search(r"First pass scores:(.*?)Revised scores:", text, re.DOTALL)
    if m:
        first = dict(re.findall(PAIR, m.group(1)))
    m = re.search(r"Revised scores:(.*?)$", text, re.DOTALL)
    if m:
        revised = dict(re.findall(PAIR, m.group(1)))
    return first, revised


def _names_match(ref: Mapping[str, Any], user: Mapping[str, Any]) -> bool:
    # Four pairs, and four distinct user emotions equal (exactly) to a reference emotion.
    names = {str(ref[f"emotion{i}"]) for i in range(1, 5)}
    return len(user) == 4 and len({e for e in user if e in names}) == 4


def _sigmoid_diff(d: float) -> float:
    if d == 0:
        return 0.0
    if d <= 5:
        return 6.5 * (1 / (1 + math.e ** (-1.2 * (d - 4))))
    return d


def score_v2(reference_fullscale: Mapping[str, Any], user: Mapping[str, Any]) -> float | None:
    """lib/scoring.py ``calculate_score_fullscale``: 0–10 (can go below 0), ``None`` if unparseable."""
    if not _names_match(reference_fullscale, user):
        return None
    want = {str(reference_fullscale[f"emotion{i}"]): float(reference_fullscale[f"emotion{i}_score"]) for i in range(1, 5)}
    return 10 - sum(_sigmoid_diff(abs(float(v) - want[e])) for e, v in user.items()) * ADJUST_CONST


def score_v1(reference: Mapping[str, Any], user: Mapping[str, Any]) -> float | None:
    """lib/scoring.py ``calculate_score``: rescaled to sum 10; ``None`` if unparseable or all zero."""
    if not _names_match(reference, user):
        return None
    total = sum(float(v) for v in user.values())
    if total <= 0:
        return None
    want = {str(reference[f"emotion{i}"]): float(reference[f"emotion{i}_score"]) for i in range(1, 5)}
    return 10 - sum(abs(float(v) / total * 10 - want[e]) for e, v in user.items())


def score_lm_eval(reference_fullscale: Mapping[str, Any], reply: str) -> dict[str, float]:
    """lm_eval/tasks/eq_bench/utils.py ``calculate_score_fullscale`` (v0.4.13): per-item ``eqbench``
    on 0–100 (0 when unparseable) and ``percent_parseable`` 0 or 100."""
    s = score_v2(reference_fullscale, dict(re.findall(PAIR, reply)))
    return {"eqbench": 0.0, "percent_parseable": 0.0} if s is None else {"eqbench": s * 10, "percent_parseable": 100.0}


def remove_revision_instructions(prompt: str) -> str:
    """lib/run_bench_helper_functions.py ``remove_revision_instructions`` (language "en")."""
    p = prompt.replace(" Then critique your answer by thinking it through step by step. Finally, give your revised scores.", "")
    p = p.replace("First pass scores:\n", "")
    p = p[: p.find("Critique: <your critique here>")] + "\n" + p[p.find("[End of answer]") :]
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


def _pass_score(records: Sequence[Mapping[str, Any]], key: str) -> tuple[float, int, list[float]]:
    xs = [10 * float(r[key]) for r in records if r.get(key) is not None]  # 0–100 per item
    return (mean(xs) if xs else 0.0), len(xs), xs


class EQBench(Benchmark):
    name = "eqbench"
    title = "EQ-Bench"
    aliases = ("eq-bench", "eq_bench")
    subscores = ("score", "percent_parseable")
    score_variants = ("score_lm_eval",)
    group = "Social-emotional intelligence"
    order = 20
    grid_default = True
    fail_rule = "under 83.33 % of replies parsed"  # MIN_PARSEABLE
    folder = "eq-bench"
    max_attempts = 3  # eq-bench.py: run_benchmarks(..., n_question_attempts=3)
    max_new_tokens = 60  # lib/eq_bench_utils.py COMPLETION_TOKENS (with or without revision)
    reference = Reference(
        repo="EQ-bench/EQ-Bench",
        commit="d28c60c514fe6667dc5818114ed10088f91f09f3",
        files=("eq-bench.py", "lib/eq_bench_utils.py", "lib/scoring.py", "lib/run_bench.py", "lib/run_bench_helper_functions.py"),
        note="score_lm_eval: EleutherAI/lm-evaluation-harness@v0.4.13 lm_eval/tasks/eq_bench/utils.py, task eq_bench@2.1",
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.revise = str(self.options.get("revise", False)).lower() in ("1", "true", "yes")
        self.version = str(self.options.get("version", "v2"))
        if self.version not in ("v1", "v2"):
            raise DataError(f"eqbench: version must be v1 or v2, got {self.version!r}")
        self.system, self.system_source = self._system_message()

    def _system_message(self) -> tuple[str | None, str]:
        choice = str(self.options.get("system", "auto"))
        if choice != "auto":
            return (None, "-o eqbench.system=none") if choice == "none" else (choice, "-o eqbench.system")
        model, local = subject_model(self.options)
        subj = self.options.get("subject") or {}
        if subj.get("system_prompt"):
            return None, "--system-prompt (the subject's)"
        if local:
            return LOCAL_SYSTEM, f"official local paths (lib/run_query.py:289 default_system_message) for local subject {model}"
        return None, "official run_openai_query sends no system message" if model else "no subject given"

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "revise": self.revise,
            "prompt": "the question file's prompt" + (", revision part removed" if self.version == "v2" and not self.revise else ""),
            "system_prompt": self.system,
            "system_prompt_source": self.system_source,
            "chat_template": True,
            "temperature": "0.01 (greedy here), retries +0.15",
            "unparsed": "retried, then left out of the score",
        }

    def _pick_file(self, source: Path) -> Path:
        if source.is_file():
            return source
        found = source / FILES[self.version]
        if found.is_file():
            return found
        others = sorted(source.glob("eq_bench*questions*.json"))
        if not others:
            raise DataError(f"eqbench: no {FILES[self.version]} (nor any eq_bench_*questions*.json) in {source}")
        return others[0]

    def _check_version(self, path: Any, n: int) -> None:
        file_version = "v1" if n == V1_SIZE else "v2"  # the reference's rule
        if file_version != self.version:
            raise DataError(
                f"{path}: a {file_version} questions file ({n} questions) cannot give EQ-Bench {self.version} scores; "
                f"{self.version} is scored on {FILES[self.version]} (the two files' references differ)"
            )

    def load_items(self, source: Path | None) -> list[Item]:
        if source is None:
            from datasets import load_dataset

            ds = load_dataset(hub_path(HUB_ID), split="validation")
            raw = {str(r.get("id", i + 1)): dict(r) for i, r in enumerate(ds)}
            path: Any = HUB_ID
        else:
            path = self._pick_file(source)
            raw = read_json(path)
            if not isinstance(raw, dict):
                raise DataError(f"{path}: expected an object {{id: question}}, got {type(raw).__name__}")
        self._check_version(path, len(raw))
        return [self._item(str(qid), q, f"{path}: question {qid}") for qid, q in raw.items()]

    def _item(self, qid: str, q: Any, where: str) -> Item:
        if not isinstance(q, dict) or not isinstance(q.get("prompt"), str):
            raise DataError(f"{where}: missing field 'prompt'")
        ref1 = _parse_ref(q["reference_answer"], where + " reference_answer") if q.get("reference_answer") else None
        ref2 = _parse_ref(q["reference_answer_fullscale"], where + " reference_answer_fullscale") if q.get("reference_answer_fullscale") else None
        if self.version == "v2" and ref2 is None:
            raise DataError(f"{where}: v2 scoring needs 'reference_answer_fullscale'")
        if self.version == "v1" and ref1 is None:
            raise DataError(f"{where}: v1 scoring needs 'reference_answer'")
        prompt = q["prompt"]
        # Hub copies may hold prompts already cut; the reference always cuts the file's full prompt.
        if self.version == "v2" and not self.revise and REVISION_MARK in prompt:
            prompt = remove_revision_instructions(prompt)
        if self.system:
            prompt = [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}]
        return Item(id=qid, prompt=prompt, reference={"v1": ref1, "v2": ref2})

    def score_item(self, item: Item, responses: Sequence[str], ctx: ScoreContext) -> dict[str, Any]:
        reply = responses[0]
        first, revised = parse_answers(reply, self.revise)
        ref1, ref2 = item.reference["v1"], item.reference["v2"]
        # Success is judged by the v1 scorer on reference_answer in every version (process_question);
        # without reference_answer (a Hub copy) the fullscale names stand in: the same four emotions.
        judge = ref1 or ref2
        ok_first = score_v1(judge, first) is not None
        ok_rev = score_v1(judge, revised) is not None if self.revise else True
        passes = {"first_pass": first, **({"revised": revised} if self.revise else {})}
        res: dict[str, Any] = {}
        # A failed item stores nothing; with revision a partial result (prev_result) is stored whole,
        # fullscale scores included whatever the v1 scorer said of that pass.
        keep = (ok_first and ok_rev) or (self.revise and (ok_first or ok_rev))
        for tag, ans in passes.items():
            res[f"{tag}_v2"] = score_v2(ref2, ans) if ref2 and keep else None
            res[f"{tag}_v1"] = score_v1(ref1, ans) if ref1 and keep else None
        use = "revised" if self.revise and res.get(f"revised_{self.version}") is not None else "first_pass"
        main = res.get(f"{use}_{self.version}")
        lm = score_lm_eval(ref2, reply) if ref2 and self.version == "v2" else None
        return {
            "parsed": {"first_pass": first, "revised": revised} if main is not None else None,
            "score": main,
            "success": ok_first and ok_rev,
            "score_v2": res.get(f"{use}_v2"),
            "score_v1": res.get(f"{use}_v1"),
            "lm_eval_eqbench": None if lm is None else lm["eqbench"],
            "lm_eval_parseable": None if lm is None else lm["percent_parseable"],
            **res,
        }

    def needs_retry(self, record: Mapping[str, Any]) -> bool:
        return not record.get("success", record.get("score") is not None)

    def partial(self, record: Mapping[str, Any]) -> bool:
        # process_question's prev_result: with revision, a failed attempt whose first pass or revised
        # scores parsed; the first one is stored when the attempts run out without a success.
        keys = [f"{t}_{v}" for t in ("first_pass", "revised") for v in ("v1", "v2")]
        return self.revise and not record.get("success") and any(record.get(k) is not None for k in keys)

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        n = len(records)
        out: dict[str, Any] = {}
        for ver in ("v2", "v1"):
            s_fp, n_fp, xs_fp = _pass_score(records, f"first_pass_{ver}")
            s_rv, n_rv, xs_rv = _pass_score(records, f"revised_{ver}")
            # calculate_eq_bench_score: the revised pass when it scores as high and is (almost) as parseable.
            if self.revise and s_rv >= s_fp and n_rv >= 0.95 * n_fp:
                score, parseable, xs = s_rv, n_rv, xs_rv
            else:
                score, parseable, xs = s_fp, n_fp, xs_fp
            out[f"score_{ver}"], out[f"stderr_{ver}"], out[f"parseable_{ver}"] = score, stderr(xs), parseable
            out[f"percent_parseable_{ver}"] = round(100 * parseable / n, 2) if n else 0.0
            out[f"score_all_{ver}"] = sum(xs) / n if n else 0.0  # unparseable counted as 0
        v = self.version
        lm = [float(r.get("lm_eval_eqbench") or 0.0) for r in records]
        lm_p = [float(r.get("lm_eval_parseable") or 0.0) for r in records]
        return {
            "score": out[f"score_{v}"],
            "stderr": out[f"stderr_{v}"],
            "parseable": out[f"parseable_{v}"],
            "percent_parseable": out[f"percent_parseable_{v}"],
            # lib/run_bench.py: below 83.33 % parseable the reference reports the run as FAILED.
            "failed": bool(n) and out[f"parseable_{v}"] / n < MIN_PARSEABLE,
            "score_all": out[f"score_all_{v}"],
            "score_lm_eval": mean(lm) if v == "v2" else None,
            "stderr_lm_eval": stderr(lm) if v == "v2" else None,
            "percent_parseable_lm_eval": mean(lm_p) if v == "v2" else None,
            **out,
            "version": v,
            "revise": self.revise,
            "n": n,
            "n_unparsed": sum(1 for r in records if r.get("parsed") is None),
            "mean_attempts": round(mean([float(r.get("attempts", 1)) for r in records]), 3),
        }
