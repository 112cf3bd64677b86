"""Crash-safe file helpers shared by every package: one atomic write, one tolerant JSON Lines reader.

* :func:`atomic_write`: the whole file or none of it (a sibling ``NAME.tmp``, then ``os.replace``),
  for results, run settings and rewritten record files that a kill must not leave half-written;
* :func:`read_jsonl`: the lines of an append-only JSONL file (generated records, eval replies,
  training logs) where a kill can cut the last write short.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` through ``path.tmp`` and ``os.replace``: a reader (or a crash) sees
    the old file or the new one, never a mix. ``fsync``: also flush the new bytes to disk first (so
    a power cut cannot leave the rename without its data)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    raw = data.encode(encoding) if isinstance(data, str) else data
    with open(tmp, "wb") as f:
        f.write(raw)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_jsonl(
    path: str | os.PathLike[str],
    errors: list[str] | None = None,
    *,
    error: type[Exception] = ValueError,
    hint: str = "",
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for every complete line of a JSONL file; blank lines are skipped.

    A torn tail (a write cut by a kill: no final newline and not JSON) is skipped; a final line that
    is whole JSON but lacks its newline (a file written by hand) is kept. A corrupt line anywhere
    else, or one that is not a JSON object, raises ``error`` naming file and line (``hint`` added:
    what to do about it), or, when ``errors`` is given, is appended to it and skipped (callers that
    report every problem at once)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            torn = not line.endswith(b"\n")
            try:
                obj = json.loads(line)
            except ValueError as e:
                if torn:
                    return
                msg = f"{path}:{n}: not valid JSON ({e}){hint}"
            else:
                if isinstance(obj, dict):
                    yield n, obj
                    continue
                msg = f"{path}:{n}: expected a JSON object, got {type(obj).__name__}{hint}"
            if errors is None:
                raise error(msg)
            errors.append(msg)


def end_torn_tail(path: str | os.PathLike[str]) -> int:
    """Make a JSONL file safe to append to: a torn tail (no final newline, not JSON: a kill cut the
    last write) is cut off, a whole last object without its newline gets one. Returns the bytes cut."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            f.truncate(start)
            return len(data) - start
        f.write(b"\n")
        return 0
