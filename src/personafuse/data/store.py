"""Crash-safe JSON Lines output: ``records-*.jsonl`` and ``rejects-*.jsonl`` shards in one folder.

Guarantees, for a run killed at any moment (SIGKILL included) and started again with the same
command:

* no torn lines: every line is written with a single ``os.write`` on an ``O_APPEND`` descriptor, and
  on start-up each shard's tail after its last newline (a write cut short by the kill) is truncated;
* nothing lost or duplicated: a query is "done" once its line is in a shard; start-up reads every
  shard and the pipeline skips done keys, so only in-flight work is repeated;
* one writer: an exclusive ``flock`` on ``DIR/.lock`` stops two runs from interleaving.

Each run appends to fresh shards (numbered after the existing ones) and rotates every
``shard_size`` lines, so ``datasets.load_dataset("json", data_files="DIR/records-*.jsonl")`` reads
the whole set. ``run.json`` records the settings that must not change between resumed runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORDS = "records"
REJECTS = "rejects"
_SHARD = re.compile(r"^(records|rejects)-(\d{5})\.jsonl$")


class StoreError(RuntimeError):
    """Output folder problems: locked by another run, settings that do not match, bad shard."""


def shard_paths(out: str | os.PathLike[str], kind: str) -> list[Path]:
    d = Path(out)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if (m := _SHARD.match(p.name)) and m.group(1) == kind)


def repair_shard(path: Path) -> int:
    """Truncate a shard after its last complete, parseable line; returns the bytes removed."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    # The last newline-terminated line could itself be partial only if a crash cut a write that
    # contained a newline inside its payload; json.dumps never emits raw newlines, so check it anyway.
    while keep > 0:
        prev = data.rfind(b"\n", 0, keep - 1) + 1
        try:
            json.loads(data[prev: keep - 1])
            break
        except ValueError:
            keep = prev
    removed = len(data) - keep
    if removed:
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return removed


def iter_lines(path: Path, errors: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, record)`` for every complete line of a shard. A torn tail (a write cut by a
    kill: no final newline and not JSON) is skipped; a final line that is whole JSON but lacks its
    newline (a file written by hand) is kept. A corrupt line in the middle raises
    :class:`StoreError` naming file and line, or, when ``errors`` is given, is appended to it and
    skipped (callers that report every problem at once)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            torn = not line.endswith(b"\n")
            try:
                rec = json.loads(line)
            except ValueError as e:
                if torn:
                    return
                msg = f"{path}:{n}: not valid JSON ({e})"
                if errors is None:
                    raise StoreError(msg) from None
                errors.append(msg)
                continue
            if not isinstance(rec, dict):
                msg = f"{path}:{n}: expected a JSON object, got {type(rec).__name__}"
                if errors is None:
                    raise StoreError(msg)
                errors.append(msg)
                continue
            yield n, rec


def read_all(out: str | os.PathLike[str], kind: str) -> list[dict[str, Any]]:
    """Every line of one kind, later lines replacing earlier ones with the same ``key``."""
    by_key: dict[str, dict[str, Any]] = {}
    for path in shard_paths(out, kind):
        for _, rec in iter_lines(path):
            by_key[rec.get("key") or rec["id"]] = rec
    return list(by_key.values())


class ShardStore:
    """Append-only writer for one output folder. Use as a context manager."""

    def __init__(self, out: str | os.PathLike[str], *, shard_size: int = 10_000, fsync: bool = False):
        self.out = Path(out)
        self.shard_size = shard_size
        self.fsync = fsync
        self._lock_fd: int | None = None
        self._fds: dict[str, int] = {}
        self._counts: dict[str, int] = {RECORDS: 0, REJECTS: 0}
        self._next_index = 0
        self.done_keys: set[str] = set()
        self.reject_reasons: dict[str, str] = {}  # key -> reason, for --retry-reasons
        self.repaired_bytes = 0

    # -- lifecycle
    def __enter__(self) -> ShardStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(f"{self.out} is in use by another generation run (lock {self.out / '.lock'})") from None
        indices = []
        for kind in (RECORDS, REJECTS):
            for path in shard_paths(self.out, kind):
                self.repaired_bytes += repair_shard(path)
                indices.append(int(_SHARD.match(path.name).group(2)))  # type: ignore[union-attr]
                for _, rec in iter_lines(path):
                    key = rec.get("key") or rec["id"]
                    self.done_keys.add(key)
                    if kind == REJECTS:
                        self.reject_reasons[key] = rec.get("reason", "")
                    else:
                        self.reject_reasons.pop(key, None)
        self._next_index = max(indices, default=-1) + 1

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- settings
    def check_settings(self, settings: dict[str, Any]) -> None:
        """Write ``run.json`` on the first run; later runs must match it key for key."""
        path = self.out / "run.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError as e:
                raise StoreError(f"{path}: unreadable ({e}); delete it to start over") from None
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                lines = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise StoreError(
                    f"{self.out} holds a run with different settings ({lines}); use a new --out folder"
                )
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: run.json is either absent or complete

    # -- writing
    def _fd(self, kind: str) -> int:
        if kind not in self._fds or self._counts[kind] >= self.shard_size:
            if kind in self._fds:
                os.close(self._fds[kind])
            idx = self._next_index
            self._next_index += 1
            path = self.out / f"{kind}-{idx:05d}.jsonl"
            self._fds[kind] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._counts[kind] = 0
        return self._fds[kind]

    def write(self, kind: str, rec: dict[str, Any]) -> None:
        """Append one line atomically (one write call) and mark its key done."""
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        fd = self._fd(kind)
        view = memoryview(line)
        while view:  # os.write on a regular file writes everything in practice; loop to be sure
            n = os.write(fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(fd)
        self._counts[kind] += 1
        self.done_keys.add(rec.get("key") or rec["id"])

    def write_record(self, rec: dict[str, Any]) -> None:
        self.write(RECORDS, rec)

    def write_reject(self, rec: dict[str, Any]) -> None:
        self.write(REJECTS, rec)
