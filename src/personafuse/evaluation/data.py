"""Reading benchmark files: locating the data folder, line-numbered errors, seeded subsampling.

Every loader goes through these helpers so that a bad file always fails with a message naming the
file, the line (or record) and the field, and so that ``--limit N --seed S`` picks the same items on
every machine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCHDATA_ENV = "PERSONAFUSE_BENCHDATA"


class DataError(ValueError):
    """A benchmark file is missing, malformed or lacks a field. The message says where."""


def find_benchdata(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder laid out like ``../shared/benchdata``: ``explicit``, else ``$PERSONAFUSE_BENCHDATA``,
    else ``../shared/benchdata`` relative to the repository root (two levels above ``src``). ``None``
    when none exists."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get(BENCHDATA_ENV):
        candidates.append(Path(os.environ[BENCHDATA_ENV]))
    repo_root = Path(__file__).resolve().parents[3]
    candidates.append(repo_root.parent / "shared" / "benchdata")
    candidates.append(Path.cwd().parent / "shared" / "benchdata")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def hub_allowed() -> bool:
    """Whether a loader may fall back to the Hugging Face Hub (not when offline mode is set)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; blank lines are skipped, a bad line raises naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            row["__line__"] = lineno
            rows.append(row)
    return rows


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        with p.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_json_or_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A file that is either one JSON array or JSON lines (Shop-MMLU and SafetyBench use both)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.is_file() else None
    if text is None:
        raise DataError(f"{p}: file not found")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = read_json(p)
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{p}: record {i}: expected a JSON object, got {type(row).__name__}")
            row = dict(row)
            row["__line__"] = i
            out.append(row)
        return out
    return read_jsonl(p)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    with p.open(encoding="utf-8", newline="") as f:
        rows = []
        for i, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
            row["__line__"] = i
            rows.append(row)
    return rows


def where(path: str | os.PathLike[str] | None, row: Mapping[str, Any]) -> str:
    """``file:line`` for messages."""
    line = row.get("__line__", "?")
    return f"{path}:{line}" if path else f"record {line}"


def field(row: Mapping[str, Any], name: str, path: str | os.PathLike[str] | None = None, *, kind: type | tuple[type, ...] | None = None) -> Any:
    """``row[name]``, raising :class:`DataError` naming file, line and field when it is missing or of
    the wrong type."""
    if name not in row:
        raise DataError(f"{where(path, row)}: missing field {name!r}")
    v = row[name]
    if kind is not None and not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where(path, row)}: field {name!r} should be {names}, got {type(v).__name__}")
    return v


def is_missing(v: Any) -> bool:
    """NaN, None or blank: ToMBench stores absent options as NaN."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and (not v.strip() or v.strip().lower() == "nan")


def subsample(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """The first ``limit`` items of a seeded permutation, returned in their original order, so that a
    larger limit always contains a smaller one (resuming with a larger ``--limit`` reuses work)."""
    if limit is None or limit <= 0 or limit >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[:limit])
    return [items[i] for i in keep]


def stable_rng(seed: int, *parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and the item's identity (stable across runs/processes,
    unlike ``hash()``)."""
    import hashlib

    h = hashlib.sha256(("|".join(str(p) for p in (seed, *parts))).encode()).hexdigest()
    return random.Random(int(h[:16], 16))


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        p = folder / n
        if p.exists():
            return p
    return None


def iter_files(folder: Path, pattern: str) -> Iterator[Path]:
    yield from sorted(folder.glob(pattern))
