"""A tiny experiment for tests/reproduce/test_reproduce_*.py: random 2-layer Llamas (the embedded
tokenizer) as base and encoder, the stub teacher on loopback, two benchmarks on fixture data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_fixtures import REPO, cli_env
from eval_support import FIXTURE_BENCHDATA, make_tiny_llama

TRAIN = {
    "model": {"embed_dim": 16, "dtype": "float32"},
    "warmup": {"steps": 2, "batch_size": 4, "micro_batch_size": 4},
    "router": {"steps": 2, "batch_size": 8, "micro_batch_size": 8},
    "joint": {"steps": 2, "batch_size": 4, "micro_batch_size": 4},
    "sft": {"steps": 2, "batch_size": 4, "micro_batch_size": 4},
    "max_length": 96,
    "save_every": 1,
    "mixed_precision": "no",
}


def tiny_experiment(folder: Path, base_url: str, **grid: object) -> Path:
    """Writes the models, a training config and ``grid.yaml``; returns the grid config's path."""
    import yaml

    base = folder / "base"
    if not base.is_dir():
        make_tiny_llama(base)
        make_tiny_llama(folder / "encoder")
    train = {**TRAIN, "model": {**TRAIN["model"], "encoder_model": str(folder / "encoder")}}
    (folder / "train.json").write_text(json.dumps(train))
    cfg = {
        "model": str(base),
        "teacher": {"spec": "openai:stub", "base_url": base_url},
        "train": str(folder / "train.json"),
        "data": {"limit": 12, "heldout": 1},
        # SafetyBench and ToMBench score a random model above zero (options, first-token fallbacks)
        "eval": {"benchmarks": ["safetybench", "tombench"], "data": str(FIXTURE_BENCHDATA), "limit": 3, "reasoning_tokens": 8,
                 "reply_tokens": 8, "threads": 1, "batch_size": 4,
                 "options": {"safetybench": {"max_new_tokens": 4}, "tombench": {"max_new_tokens": 4}}},
        **grid,
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _die_with_the_test() -> None:  # pragma: no cover - runs in the child
    """A test killed by its timeout (pytest-timeout ends the worker) takes its grid with it, and the
    grid's own PR_SET_PDEATHSIG then ends the grid's cells: no run keeps going after its test."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def reproduce(*args: str, timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "personafuse.cli", "reproduce", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO, preexec_fn=_die_with_the_test, **kw)  # type: ignore[call-overload]


def popen(*args: str) -> subprocess.Popen[str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "personafuse.cli", "reproduce", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True, text=True,
                            preexec_fn=_die_with_the_test)


__all__ = ["os", "popen", "reproduce", "tiny_experiment"]
