"""A reproduce run killed (SIGKILL, the whole process group) while a variant trains and again while
one is evaluated, then resumed, ends with the same summary.json as a run never interrupted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from data_fixtures import stub_server
from reproduce_support import popen, reproduce, tiny_experiment
from stub_teacher import StubServer

pytestmark = pytest.mark.slow  # three grid runs and a resume: about 2.5 min on two cores
GRID = {"variants": ["direct_ft", "personafuse"], "data": {"limit": 8, "heldout": 0}}


@pytest.fixture(scope="module")
def server() -> StubServer:
    yield from stub_server()


def _summary(out: Path) -> dict:
    """summary.json without the checkout's commit (provenance only: other work may be committed
    between the two runs)."""
    import json

    s = json.loads((out / "report/summary.json").read_text())
    s["provenance"].pop("git_commit")
    return s


def _kill_when(proc, ready, what: str, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() - t0 < timeout, f"never reached {what}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_in_training_and_in_evaluation_then_resume_equals_uninterrupted(server: StubServer, tmp_path: Path):
    cfg = tiny_experiment(tmp_path, server.base_url, **GRID)
    ref = reproduce("--config", str(cfg), "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    args = ("--config", str(cfg), "--out", str(out))
    train = out / "train/personafuse/seed0"
    # mid-training: the warm-up has written a checkpoint, the stage is not finished
    _kill_when(popen(*args), lambda: any(train.glob("*/checkpoint-*/state.pt")) and not (train / "done.json").exists(), "training")
    assert not (train / "done.json").exists()
    evaluation = out / "eval/personafuse/seed0"
    # mid-evaluation: the first benchmark's replies are written, the cell is not finished
    _kill_when(popen(*args), lambda: (evaluation / "safetybench.jsonl").is_file() and not (evaluation / "done.json").exists(), "evaluation")
    assert (train / "done.json").exists() and not (evaluation / "done.json").exists()
    r = reproduce(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _summary(out) == _summary(tmp_path / "ref")
    log = (out / "reproduce.log").read_text()
    assert log.count("=== train/personafuse/seed0") == 2 and log.count("=== train/direct_ft/seed0") == 1  # only the cell in progress was redone
