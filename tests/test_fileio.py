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


def test_strict_mode_makes_a_cut_last_line_an_error(tmp_path: Path) -> None:
    p = tmp_path / "bench.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')  # a hand-given file cut short: lost data, not a torn write
    assert [r["id"] for _, r in read_jsonl(p)] == [1, 2]  # tolerant (our own append-only files): skipped
    with pytest.raises(LookupError, match=r"bench\.jsonl:3: not valid JSON \(.* at column \d+\); fix it$"):
        list(read_jsonl(p, error=LookupError, hint="; fix it", strict=True))
    errors: list[str] = []
    assert [r["id"] for _, r in read_jsonl(p, errors, strict=True)] == [1, 2]
    assert [e.split(": ", 1)[0] for e in errors] == [f"{p}:3"]
    p.write_text('{"id": 1}\n{"id": 2}')  # whole but unterminated: kept in both modes
    assert [r["id"] for _, r in read_jsonl(p, strict=True)] == [1, 2]


def test_a_multibyte_character_cut_in_half(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_bytes('{"id": 1}\n{"t": "é"}\n'.encode() + '{"t": "é'.encode()[:-1])
    assert [n for n, _ in read_jsonl(p)] == [1, 2]
    with pytest.raises(ValueError, match=r"r\.jsonl:3: not valid UTF-8"):
        list(read_jsonl(p, strict=True))
    p.write_bytes(b'{"id": 1}\n{"t": "\xff"}\n{"id": 3}\n')  # a bad byte mid-file: an error in both modes
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not valid UTF-8 \(invalid start byte\)"):
        list(read_jsonl(p))
    p.write_bytes(b'\xef\xbb\xbf{"id": 1}\n{"id": 2}\n')  # a BOM (Windows editors) before the first line
    assert [r["id"] for _, r in read_jsonl(p, strict=True)] == [1, 2]


def test_input_file_readers_are_strict_with_their_own_error(tmp_path: Path) -> None:
    """The four readers of files a user gives us go through read_jsonl(strict=True): a cut last
    line raises their own error class naming file:line instead of dropping the row."""
    from personafuse.data.sources import SourceError, file_queries
    from personafuse.evaluation.annotation.store import AnnotationError, AnnotationStore
    from personafuse.evaluation.data import DataError
    from personafuse.evaluation.data import read_jsonl as read_benchmark
    from personafuse.evaluation.judges import MentalJudgePrompt

    p = tmp_path / "in.jsonl"
    p.write_text('{"query": "a", "id": "1", "prompt": "a", "response": "r"}\n{"query": "b", "id": "2", "pro')
    cases = [
        (SourceError, lambda: file_queries(p)),
        (DataError, lambda: read_benchmark(p)),
        (DataError, lambda: MentalJudgePrompt.from_judgment_file(p)),
        (AnnotationError, lambda: AnnotationStore(tmp_path / "a.sqlite").load_responses([p])),
    ]
    for cls, call in cases:
        with pytest.raises(cls, match=r"in\.jsonl:2: not valid JSON"):
            call()
    p.write_text(p.read_text().splitlines()[0] + "\n[1]\n")  # a non-object line: named too (judges and annotation used to crash on it)
    for cls, call in cases:
        with pytest.raises(cls, match=r"in\.jsonl:2: expected a JSON object, got list"):
            call()
    p.write_text(p.read_text().splitlines()[0] + "\n")
    assert len(file_queries(p)) == 1 and [r["__line__"] for r in read_benchmark(p)] == [1]
