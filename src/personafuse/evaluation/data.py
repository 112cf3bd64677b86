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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personafuse import fileio

BENCHDATA_ENV = "PERSONAFUSE_BENCHDATA"
# A local folder laid out like the remote repositories (``<folder>/<owner>/<repo>/<path>``) that
# stands in for the Hub and GitHub: air-gapped machines and the tests use it.
HUB_MIRROR_ENV = "PERSONAFUSE_HUB_MIRROR"
GITHUB_RAW_ENV = "PERSONAFUSE_GITHUB_RAW"  # base URL for raw GitHub files (a proxy, or a test server)
GITHUB_RAW = "https://raw.githubusercontent.com"
CACHE_ENV = "PERSONAFUSE_CACHE"


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
    """Whether a loader may fall back to the Hugging Face Hub (not when offline mode is set, unless
    a local mirror stands in for it)."""
    if os.environ.get(HUB_MIRROR_ENV):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes")


def hub_path(repo_id: str) -> str:
    """What to hand ``datasets.load_dataset`` for a Hub dataset: the id, or its snapshot folder in
    the mirror (``$PERSONAFUSE_HUB_MIRROR/<repo_id>``) when one is set."""
    mirror = os.environ.get(HUB_MIRROR_ENV)
    return str(Path(mirror) / repo_id) if mirror else repo_id


@dataclass(frozen=True)
class Remote:
    """Where a benchmark's official files live online: a Hub dataset repository (``host="hf"``) or,
    for benchmarks that are not on the Hub in their official form, the authors' GitHub repository."""

    host: str  # "hf" | "github"
    repo: str  # owner/name
    revision: str = "main"

    def describe(self) -> str:
        if self.host == "hf":
            return f"the Hub dataset {self.repo}"
        return f"GitHub {self.repo}@{self.revision}"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "personafuse")


def fetch(remote: Remote, path: str, *, bench: str) -> Path:
    """A local copy of ``path`` in ``remote``: from the mirror when ``$PERSONAFUSE_HUB_MIRROR`` is set,
    else downloaded (Hub files through huggingface_hub's cache, GitHub files into ours). Failures
    raise :class:`DataError` naming the benchmark, the file and where it was looked for."""
    mirror = os.environ.get(HUB_MIRROR_ENV)
    if mirror:
        p = Path(mirror) / remote.repo / path
        if not p.is_file():
            raise DataError(f"{bench}: {path} is not in the mirror of {remote.describe()} ({p} not found)")
        return p
    if not hub_allowed():
        raise DataError(f"{bench}: {path} would come from {remote.describe()}, but HF_HUB_OFFLINE is set; pass --data")
    try:
        if remote.host == "hf":
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(remote.repo, path, repo_type="dataset", revision=remote.revision))
        return _github_download(remote, path)
    except DataError:
        raise
    except Exception as e:  # network, HTTP and Hub errors alike: say which source failed
        raise DataError(f"{bench}: could not fetch {path} from {remote.describe()}: {e}") from e


def _github_download(remote: Remote, path: str) -> Path:
    import urllib.parse
    import urllib.request

    dest = cache_dir() / "remote" / remote.repo / remote.revision / path
    if dest.is_file():
        return dest
    base = os.environ.get(GITHUB_RAW_ENV, GITHUB_RAW).rstrip("/")
    url = f"{base}/{remote.repo}/{remote.revision}/{urllib.parse.quote(path)}"
    with urllib.request.urlopen(url, timeout=60) as r:
        data = r.read()
    if data.startswith(b"version https://git-lfs"):
        raise DataError(f"{url} is a Git LFS pointer, not the file; download it by hand and pass --data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)  # atomic: a crash never leaves a truncated file in the cache
    return dest


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each with its ``__line__``; blank lines are skipped, a bad line
    (a cut last one too: benchmark files are input, strict) raises naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows: list[dict[str, Any]] = []
    for lineno, row in fileio.read_jsonl(p, error=DataError, strict=True):
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
