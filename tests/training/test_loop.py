"""Resume after a crash: log lines past the last checkpoint and a torn last line
(moved from tests/test_safety_net.py, issue 21's safety net: shown to fail on the planted bug its
docstring names)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, records_on_disk, train_config
from personafuse.training.config import StageConfig, TrainConfig
from personafuse.training.records import Record
from personafuse.training.stages import run_warmup

SC_RESUME = StageConfig(steps=5, batch_size=3, lr=5e-3, micro_batch_size=4)


def _crash_after_step_3(tmp_path: Path, records: list[Record]) -> tuple[TrainConfig, Path]:
    """Checkpoints every 2 steps; the process dies after step 3's log line, before any checkpoint-3.
    (stop_after=3 writes checkpoint-3 too; removing it leaves what the crash would have left.)"""
    tc = train_config(tmp_path / "split", warmup=SC_RESUME, save_every=2)
    run_warmup(build_tiny(init_range=0.3), records, tc, stop_after=3)
    stage = Path(tc.out) / "warmup"
    shutil.rmtree(stage / "checkpoint-3")
    assert (stage / "checkpoint-2" / "state.pt").is_file()
    return tc, stage / "losses.jsonl"


def _straight(tmp_path: Path, records: list[Record]):
    pf = build_tiny(init_range=0.3)
    result = run_warmup(pf, records, train_config(tmp_path / "full", warmup=SC_RESUME, save_every=2))
    return pf, result


def _same_run(a, ra, b, rb) -> None:
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6, msg=n1)
    assert [e["step"] for e in rb.losses] == [1, 2, 3, 4, 5]
    for ea, eb in zip(ra.losses, rb.losses, strict=True):
        assert eb["loss_lm"] == pytest.approx(ea["loss_lm"], rel=1e-5)


def test_resume_drops_log_lines_past_the_last_checkpoint(tmp_path: Path) -> None:
    """Step 3 was logged but never checkpointed: the resume redoes it, and the log holds each step
    once. Planted bug caught: train_loop keeping every old log line on resume (``<= start`` dropped)."""
    records = records_on_disk(tmp_path, 30, seed=4)
    full, full_result = _straight(tmp_path, records)
    tc, log = _crash_after_step_3(tmp_path, records)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    resumed = build_tiny(init_range=0.3)
    result = run_warmup(resumed, records, tc, resume=True)
    _same_run(full, full_result, resumed, result)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_resume_survives_a_torn_last_log_line(tmp_path: Path) -> None:
    """The crash hit mid-write of step 4's log line: the torn line is dropped, not a crash."""
    records = records_on_disk(tmp_path, 30, seed=4)
    full, full_result = _straight(tmp_path, records)
    tc, log = _crash_after_step_3(tmp_path, records)
    with log.open("a") as f:
        f.write('{"step": 4, "lr": 0.00')  # no newline: the write never finished
    resumed = build_tiny(init_range=0.3)
    result = run_warmup(resumed, records, tc, resume=True)
    _same_run(full, full_result, resumed, result)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
