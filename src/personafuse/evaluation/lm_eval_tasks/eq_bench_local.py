"""The dataset of ``eq_bench_local.yaml``: official EQ-Bench questions (v1 or v2 JSON) from disk.

The official files map question ids to items whose ``reference_answer_fullscale`` is a dict; the
Hub copy that lm-eval's ``eq_bench`` reads stores it as a Python-literal string, which is what its
scorer (reused unchanged) parses. Only v2 files: the v1 file's fullscale references differ.

The Hub copy's prompts carry no critique-and-revise part; the official file's do. As
``personafuse eval --benchmarks eqbench`` does for v2 without revision, each prompt is cut with the
official rule (EQ-bench/EQ-Bench@d28c60c lib/run_bench_helper_functions.py:remove_revision_instructions,
transcribed in :func:`personafuse.evaluation.benchmarks.eqbench.remove_revision_instructions`), so
the task sends lm-eval's prompt with its 80-token limit. lm-eval loads this module from its file
path, hence the absolute imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_eval.tasks.eq_bench.utils import calculate_score_fullscale  # noqa: F401  (the task's scorer)

V2_FILE = "eq_bench_v2_questions_171.json"
V1_SIZE = 60


def load(eq_bench_file: str | None = None, **_: Any) -> Any:
    from datasets import Dataset, DatasetDict

    from personafuse.evaluation.benchmarks.eqbench import REVISION_MARK, remove_revision_instructions
    from personafuse.evaluation.data import DataError, find_benchdata

    if eq_bench_file:
        path = Path(eq_bench_file).expanduser()
    else:
        root = find_benchdata()
        path = root / "eq-bench" / V2_FILE if root else Path(V2_FILE)
        if not path.is_file():
            raise DataError(f"eq_bench_local: no {V2_FILE}; pass --metadata '{{\"eq_bench_file\": \"PATH.json\"}}' or set PERSONAFUSE_BENCHDATA")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"eq_bench_local: cannot read {path}: {e}") from None
    items = data.values() if isinstance(data, dict) else data
    if len(items) == V1_SIZE:  # EQ-bench/EQ-Bench@d28c60c lib/run_bench.py: 60 questions is the v1 file
        raise DataError(f"eq_bench_local: {path} is the v1 questions file (60); lm-eval's eq_bench scores v2 references: use {V2_FILE}")
    docs = []
    for n, item in enumerate(items):
        missing = [k for k in ("prompt", "reference_answer_fullscale") if k not in item]
        if missing:
            raise DataError(f"eq_bench_local: {path}: item {n} lacks {', '.join(missing)}")
        ref = item["reference_answer_fullscale"]
        prompt = item["prompt"]
        if REVISION_MARK in prompt:  # already-cut prompts (a Hub copy) are sent as they are
            prompt = remove_revision_instructions(prompt)
        docs.append({"prompt": prompt, "reference_answer_fullscale": ref if isinstance(ref, str) else repr(ref)})
    if not docs:
        raise DataError(f"eq_bench_local: {path} holds no questions")
    return DatasetDict({"validation": Dataset.from_list(docs)})
