"""The dataset of ``gsm8k_local.yaml``: the official GSM8K ``test.jsonl`` and, beside it,
``train.jsonl`` (the split the 5 shots come from) from local files.

lm-eval calls ``load`` (the task's ``custom_dataset``) with the task metadata, which includes what
``--metadata '{"data_file": "PATH"}'`` passes; without it the file is looked up like
``personafuse eval`` does: ``$PERSONAFUSE_BENCHDATA/gsm8k/test.jsonl``, then
``../shared/benchdata/gsm8k/test.jsonl``. lm-eval loads this module from its file path, hence the
absolute imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(data_file: str | None = None, **_: Any) -> Any:
    from datasets import Dataset, DatasetDict

    from personafuse.evaluation.data import DataError, field, find_benchdata, read_jsonl

    if data_file:
        path = Path(data_file).expanduser()
    else:
        root = find_benchdata()
        if root is None:
            raise DataError("gsm8k_local: no data file; pass --metadata '{\"data_file\": \"PATH/test.jsonl\"}' or set PERSONAFUSE_BENCHDATA")
        path = root / "gsm8k" / "test.jsonl"
    train = path.with_name("train.jsonl")
    if not train.is_file():
        raise DataError(f"gsm8k_local: {train} not found: the task's 5 shots come from the train split (beside {path.name})")
    splits = {}
    for split, p in (("test", path), ("train", train)):
        rows = read_jsonl(p)  # names file and line on a bad row
        splits[split] = [{"question": field(r, "question", p, kind=str), "answer": field(r, "answer", p, kind=str)} for r in rows]
        if not splits[split]:
            raise DataError(f"gsm8k_local: {p} holds no questions")
    return DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()})
