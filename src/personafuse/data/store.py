"""Crash-safe JSON Lines output: ``records-*.jsonl`` and ``rejects-*.jsonl`` shards in one folder.

Guarantees, for a run killed at any moment (SIGKILL included) and started again with the same
command:

* no torn lines: every line is written with a single ``os.write`` on an ``O_APPEND`` descriptor, and
  on start-up each shard's tail after its last newline (a write cut short by the kill) is truncated;
* nothing lost or duplicated: a query is "done" once its line is in a shard; start-up reads every
  shard and the pipeline skips done keys, so only in-flight work is repeated. A key that has a
  record is never written again (a record supersedes earlier rejects of its key), and a folder
  that holds two records of one key (written by older versions) is repaired at start-up, keeping
  the later line, as every reader does;
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

from personafuse.fileio import atomic_write, read_jsonl

SHARD_SIZE = 10_000  # lines per records/rejects shard (`data generate --shard-size`)

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
    """``(line_number, record)`` for every complete line of a shard: the shared tolerant reader
    (:func:`personafuse.fileio.read_jsonl`: a torn tail skipped, a corrupt line in the middle a
    :class:`StoreError` naming file and line, or appended to ``errors`` when given)."""
    return read_jsonl(path, errors, error=StoreError)


def line_key(rec: dict[str, Any]) -> str:
    """The key a line is done under: ``key`` (rejects), else ``id`` (records)."""
    return rec.get("key") or rec["id"]


def read_all(out: str | os.PathLike[str], kind: str) -> list[dict[str, Any]]:
    """Every line of one kind, later lines replacing earlier ones with the same ``key``."""
    by_key: dict[str, dict[str, Any]] = {}
    for path in shard_paths(out, kind):
        for _, rec in iter_lines(path):
            by_key[line_key(rec)] = rec
    return list(by_key.values())


def drop_duplicate_records(paths: list[Path]) -> int:
    """Rewrite record shards so each key keeps only its last line; returns the lines removed.
    Each shard is replaced whole (write, fsync, rename), so a crash leaves old or new, never half."""
    last: dict[str, tuple[Path, int]] = {}
    for path in paths:
        for n, rec in iter_lines(path):
            last[line_key(rec)] = (path, n)
    keep: dict[Path, set[int]] = {}
    for path, n in last.values():
        keep.setdefault(path, set()).add(n)
    removed = 0
    for path in paths:
        lines = path.read_bytes().splitlines(keepends=True)
        kept = [ln for i, ln in enumerate(lines, start=1) if i in keep.get(path, set())]
        if len(kept) == len(lines):
            continue
        removed += len(lines) - len(kept)
        atomic_write(path, b"".join(kept), fsync=True)
    return removed


class ShardStore:
    """Append-only writer for one output folder. Use as a context manager."""

    def __init__(self, out: str | os.PathLike[str], *, shard_size: int = SHARD_SIZE, fsync: bool = False):
        self.out = Path(out)
        self.shard_size = shard_size
        self.fsync = fsync
        self._lock_fd: int | None = None
        self._fds: dict[str, int] = {}
        self._counts: dict[str, int] = {RECORDS: 0, REJECTS: 0}
        self._next_index = 0
        self.done_keys: set[str] = set()
        self.record_keys: set[str] = set()  # never redone
        self.reject_reasons: dict[str, str] = {}  # key -> reason of its latest reject, keys without a record
        self.repaired_bytes = 0
        self.repairs: list[str] = []  # what start-up fixed, for the run's report

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
        self._read_shards()

    def _read_shards(self) -> None:
        indices = []
        counts: dict[str, int] = {}
        for kind in (RECORDS, REJECTS):
            for path in shard_paths(self.out, kind):
                if cut := repair_shard(path):
                    self.repaired_bytes += cut
                    self.repairs.append(f"{path.name}: removed a torn last line ({cut} bytes) left by a killed run; "
                                        "its query is redone")
                indices.append(int(_SHARD.match(path.name).group(2)))  # type: ignore[union-attr]
                for _, rec in iter_lines(path):
                    key = line_key(rec)
                    self.done_keys.add(key)
                    if kind == REJECTS:
                        self.reject_reasons[key] = rec.get("reason", "")
                    else:
                        self.record_keys.add(key)
                        counts[key] = counts.get(key, 0) + 1
        for key in self.record_keys:  # a record supersedes any reject of its key, earlier or later
            self.reject_reasons.pop(key, None)
        if any(n > 1 for n in counts.values()):
            removed = drop_duplicate_records(shard_paths(self.out, RECORDS))
            self.repairs.append(f"removed {removed} duplicate record line(s) ({sum(n > 1 for n in counts.values())} "
                                "keys written twice by an older version); each key keeps its last record")
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
        atomic_write(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")  # run.json: absent or complete

    def add_endpoint_counters(self, run: dict[str, Any]) -> dict[str, Any]:
        """Add one run's endpoint counters to ``run.json``'s ``endpoint`` block (totals over every
        run into this folder) with ``rejects_by_cause``: the folder's standing rejects (keys with no
        record) by whose fault they are. Returns the block."""
        from personafuse.data.validation import DUPLICATE, ENDPOINT_REJECTS

        path = self.out / "run.json"
        info = json.loads(path.read_text()) if path.exists() else {}
        old = info.get("endpoint") or {}
        status: dict[str, int] = dict(old.get("http_status") or {})
        for code, n in run.get("http_status", {}).items():
            status[str(code)] = status.get(str(code), 0) + n
        standing = [r for r in self.reject_reasons.values() if r != DUPLICATE]
        endpoint = sum(r in ENDPOINT_REJECTS for r in standing)
        info["endpoint"] = block = {
            "requests": old.get("requests", 0) + run.get("requests", 0),
            "retries": old.get("retries", 0) + run.get("retries", 0),
            "http_status": dict(sorted(status.items())),
            "rate_limit_wait_s": round(old.get("rate_limit_wait_s", 0.0) + run.get("rate_limit_wait_s", 0.0), 3),
            "rejects_by_cause": {"endpoint": endpoint, "teacher": len(standing) - endpoint},
        }
        atomic_write(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
        return block

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
        key = line_key(rec)
        if kind == RECORDS and key in self.record_keys:
            raise StoreError(f"{self.out}: key {key!r} already has a record; a done key is never written twice")
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        fd = self._fd(kind)
        view = memoryview(line)
        while view:  # os.write on a regular file writes everything in practice; loop to be sure
            n = os.write(fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(fd)
        self._counts[kind] += 1
        self.done_keys.add(key)
        if kind == RECORDS:
            self.record_keys.add(key)
            self.reject_reasons.pop(key, None)
        else:
            self.reject_reasons[key] = rec.get("reason", "")

    def write_record(self, rec: dict[str, Any]) -> None:
        self.write(RECORDS, rec)

    def write_reject(self, rec: dict[str, Any]) -> None:
        self.write(REJECTS, rec)
