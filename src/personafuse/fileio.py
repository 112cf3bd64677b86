"""Crash-safe file helpers shared by every package: one atomic write, one tolerant JSON Lines reader.

* :func:`atomic_write`: the whole file or none of it (a sibling ``NAME.tmp``, then ``os.replace``),
  for results, run settings and rewritten record files that a kill must not leave half-written;
* :func:`read_jsonl`: the lines of a JSONL file: an append-only one (generated records, eval
  replies, training logs) where a kill can cut the last write short, or (``strict=True``) one a
  user gives us (benchmark data, query sources, judgment records, responses to annotate).
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
    strict: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for every complete line of a JSONL file; blank lines are skipped,
    a UTF-8 byte-order mark on the first line is accepted.

    A torn tail (a write cut by a kill: no final newline and not JSON) is skipped; a final line that
    is whole JSON but lacks its newline (a file written by hand) is kept. ``strict``: for files a
    user gives us (benchmarks, query sources), where a cut last line is lost data, not a crash of
    ours: that line is an error like any other. A corrupt line (not UTF-8, not JSON, or not a JSON
    object) raises ``error`` naming file and line (``hint`` added: what to do about it), or, when
    ``errors`` is given, is appended to it and skipped (callers that report every problem at once)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            torn = not strict and not line.endswith(b"\n")
            try:
                # explicit decode (not json.loads(bytes), which guesses UTF-16/32) so a bad byte is named as such
                obj = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                if torn:  # a kill can cut a multi-byte character in half
                    return
                msg = f"{path}:{n}: not valid UTF-8 ({e.reason}){hint}"
            except ValueError as e:  # JSONDecodeError, or e.g. an integer over Python's digit limit
                if torn:
                    return
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                msg = f"{path}:{n}: not valid JSON ({why}){hint}"
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
