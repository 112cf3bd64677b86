"""The dataset of ``gsm8k_local.yaml``: the official GSM8K ``test.jsonl`` from a local file.

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
    rows = read_jsonl(path)  # names file and line on a bad row
    docs = [{"question": field(r, "question", path, kind=str), "answer": field(r, "answer", path, kind=str)} for r in rows]
    if not docs:
        raise DataError(f"gsm8k_local: {path} holds no questions")
    return DatasetDict({"test": Dataset.from_list(docs)})
