"""What a grid cell read, so that a cached cell is only reused when nothing it depends on changed.

A cell's fingerprint (``inputs.json`` when it starts, the ``inputs`` of ``done.json`` when it ends):
its command and training config, the SHA-256 of each input cell's ``done.json`` (a redone input
writes a new one, so everything downstream goes stale, even after a crash: it is read from disk on
every check), the personafuse version (a fixed scorer, loss or prompt ships as a new version), the
identity of what it loads from outside the grid (a local file or folder: path, size and mtime of
each file, never a hash of model weights; a Hub dataset or model: the revision the local Hub cache
resolved), and for evaluation cells the benchmark data files. The git commit is recorded beside it
for provenance only: a commit that changes nothing a cell uses must not redo the grid.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def package_version() -> str:
    import personafuse

    return str(personafuse.__version__)


def digest(path: Path) -> str | None:
    """SHA-256 of a small file (a ``done.json``); None when it does not exist."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def path_identity(path: Path, *, limit: int = 2000) -> dict[str, Any]:
    """Size and mtime of a file, or of every file under a folder (sorted, up to ``limit`` files):
    a check stats the files and never reads them, so it costs the same for a 16 GB checkpoint."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files: dict[str, Any] = {}
    for f in sorted(x for x in p.rglob("*") if x.is_file())[:limit]:
        st = f.stat()
        files[str(f.relative_to(p))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": str(p), "files": files}


def hub_revision(repo_id: str, kind: str = "model") -> str | None:
    """The commit the local Hub cache resolves ``repo_id``'s main branch to (None: not cached)."""
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    ref = root / f"{kind}s--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def source_identity(spec: str | None, kind: str = "model") -> dict[str, Any] | None:
    """A model or query source as the cell sees it: a local path's identity, a Hub id's cached
    revision, or the spec alone (the embedded models and bundled seeds ship with the version)."""
    if spec is None:
        return None
    head, sep, rest = spec.partition(":")
    target = rest if sep and head in ("file", "hf", "lora", "pf", *_adapters()) else spec
    if target and Path(target).expanduser().exists():
        return {"spec": spec, **path_identity(Path(target).expanduser())}
    if head in _adapters():
        from personafuse.data.sources import HUB_DEFAULTS

        repo = rest or str(HUB_DEFAULTS[head]["repo"])
        return {"spec": spec, "hub": repo, "revision": hub_revision(repo, "dataset")}
    if head == "hf" and rest:
        return {"spec": spec, "hub": rest, "revision": hub_revision(rest, kind)}
    return {"spec": spec}


def _adapters() -> tuple[str, ...]:
    from personafuse.data.sources import ADAPTERS

    return tuple(ADAPTERS)


def benchdata_identity(explicit: str | None, benchmarks: Iterable[str]) -> dict[str, Any]:
    """Size and mtime of the benchmark data files the evaluation reads (each benchmark's own
    folder of the benchmark data root, e.g. ``eq-bench/``)."""
    from personafuse.evaluation.benchmarks import BENCHMARKS, canonical_name
    from personafuse.evaluation.data import find_benchdata

    root = find_benchdata(explicit)
    if root is None:
        return {"root": None}
    out: dict[str, Any] = {"root": str(root)}
    for b in benchmarks:
        cls = BENCHMARKS.get(canonical_name(b))
        folder = root / str(getattr(cls, "folder", None) or canonical_name(b))
        out[canonical_name(b)] = path_identity(folder)["files"] if folder.is_dir() else None
    return out


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit (provenance only; None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
