"""Crash safety: torn-line repair, single writer, settings guard, and SIGKILL-and-resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import REPO, cli, cli_env, lines, write_jsonl
from personafuse.data.sources import seed_queries
from personafuse.data.store import ShardStore, StoreError, read_all, repair_shard
from stub_teacher import StubServer


def test_torn_tail_is_repaired_and_work_redone(tmp_path: Path) -> None:
    with ShardStore(tmp_path) as st:
        st.write_record({"id": "a", "query": "x"})
        st.write_record({"id": "b", "query": "y"})
    shard = next(tmp_path.glob("records-*.jsonl"))
    with open(shard, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"id": "c", "query": "hal')
    with ShardStore(tmp_path) as st:
        assert st.done_keys == {"a", "b"} and st.repaired_bytes > 0
        st.write_record({"id": "c", "query": "half"})
    assert shard.read_bytes().endswith(b'"y"}\n')
    assert sorted(r["id"] for r in read_all(tmp_path, "records")) == ["a", "b", "c"]


def test_repair_drops_a_garbled_last_line(tmp_path: Path) -> None:
    p = tmp_path / "records-00000.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "b"\n')
    assert repair_shard(p) == len(b'{"id": "b"\n')
    assert p.read_bytes() == b'{"id": "a"}\n'


def test_one_writer_at_a_time_and_settings_guard(tmp_path: Path) -> None:
    with ShardStore(tmp_path) as st:
        st.check_settings({"mode": "direct", "teacher": "t"})
        with pytest.raises(StoreError, match="in use"):
            ShardStore(tmp_path).open()
    with ShardStore(tmp_path) as st:
        st.check_settings({"mode": "direct", "teacher": "t"})
        with pytest.raises(StoreError, match="mode: was 'direct', now 'persona_cot'"):
            st.check_settings({"mode": "persona_cot", "teacher": "t"})


def test_shards_rotate_and_load_with_datasets(tmp_path: Path) -> None:
    with ShardStore(tmp_path, shard_size=3) as st:
        for i in range(7):
            st.write_record({"id": str(i), "query": f"q{i}", "p": [1] + [0] * 9, "situation": None})
    assert len(list(tmp_path.glob("records-*.jsonl"))) == 3
    import datasets

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "records-*.jsonl"), split="train")
    assert sorted(ds["id"]) == [str(i) for i in range(7)]


def _generate_cmd(base_url: str, src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "personafuse.data.cli", "generate", "--teacher", "openai:stub",
            "--base-url", base_url, "--source", f"file:{src}", "--out", str(out), "--concurrency", "3",
            "--no-progress", "--shard-size", "20"]


def _count_lines(out: Path) -> int:
    n = 0
    for p in out.glob("*.jsonl"):
        with contextlib.suppress(FileNotFoundError):  # a shard can appear between glob and read
            n += p.read_bytes().count(b"\n")
    return n


def _comparable(rec: dict) -> str:
    rec = {k: v for k, v in rec.items() if k not in ("timings",)}
    return json.dumps(rec, sort_keys=True)


def test_sigkill_and_resume_gives_the_uninterrupted_set(tmp_path: Path) -> None:
    qs = [q.text for q in seed_queries()[:70]]
    qs[5] += " [malformed]"
    qs[17] += " [bothpoles]"
    qs[40] = qs[3]  # a duplicate
    src = write_jsonl(tmp_path / "q.jsonl", [{"query": q} for q in qs])
    with StubServer(latency=0.025) as server:
        ref = tmp_path / "ref"
        cli(*_generate_cmd(server.base_url, src, ref)[3:])
        killed = tmp_path / "killed"
        kills = 0
        for threshold in (5, 25, 45):
            proc = subprocess.Popen(_generate_cmd(server.base_url, src, killed), env=cli_env(), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 60
            while _count_lines(killed) < threshold and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            assert proc.poll() is None, "the run finished before it could be killed; make it slower"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            assert _count_lines(killed) < len(qs)  # really interrupted mid-run
        r = cli(*_generate_cmd(server.base_url, src, killed)[3:])
        assert kills == 3 and '"skipped": ' in r.stdout
    for kind in ("records", "rejects"):
        a, b = lines(ref, kind), lines(killed, kind)  # lines() also asserts no torn tail
        keys_b = [x.get("key", x["id"]) for x in b]
        assert len(keys_b) == len(set(keys_b)), f"duplicated {kind}"
        assert sorted(map(_comparable, a)) == sorted(map(_comparable, b))
    assert len(lines(ref, "records")) + len(lines(ref, "rejects")) == len(qs)
    assert len(list(killed.glob("records-*.jsonl"))) >= 3  # each run appended to its own shard
