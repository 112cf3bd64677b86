"""The shared crash-safe helpers (issue 33): one atomic write, one tolerant JSONL reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personafuse.fileio import atomic_write, end_torn_tail, read_jsonl


def test_atomic_write_replaces_whole_and_leaves_no_tmp(tmp_path: Path) -> None:
    p = tmp_path / "results.json"
    p.write_text("old")
    atomic_write(p, json.dumps({"a": 1}))
    atomic_write(tmp_path / "b.bin", b"\x00\x01", fsync=True)
    assert json.loads(p.read_text()) == {"a": 1}
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b.bin", "results.json"]


def test_read_jsonl_drops_a_torn_tail_and_keeps_a_whole_last_line(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2}\n{"id": 3, "te')
    assert [(n, r["id"]) for n, r in read_jsonl(p)] == [(1, 1), (3, 2)]
    p.write_text('{"id": 1}\n{"id": 2}')  # written by hand: no final newline, but whole
    assert [r["id"] for _, r in read_jsonl(p)] == [1, 2]


def test_read_jsonl_names_a_corrupt_line(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": 1}\n{"id": broken\n[1, 2]\n{"id": 4}\n')
    with pytest.raises(RuntimeError, match=r"r\.jsonl:2: not valid JSON .*; delete it"):
        list(read_jsonl(p, error=RuntimeError, hint="; delete it"))
    errors: list[str] = []
    assert [r["id"] for _, r in read_jsonl(p, errors)] == [1, 4]
    assert [e.split(": ", 1)[0] for e in errors] == [f"{p}:2", f"{p}:3"] and "expected a JSON object, got list" in errors[1]


def test_end_torn_tail_makes_a_file_safe_to_append_to(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": 1}\n{"id": 2, "te')
    assert end_torn_tail(p) == len('{"id": 2, "te')
    p.write_text(p.read_text() + '{"id": 2}')  # whole but unterminated: gets its newline
    assert end_torn_tail(p) == 0 and p.read_text() == '{"id": 1}\n{"id": 2}\n'
    assert end_torn_tail(tmp_path / "absent.jsonl") == 0
