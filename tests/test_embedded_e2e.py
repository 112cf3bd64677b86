"""End to end on the embedded SmolLM2 base + MiniLM router, offline, through the real CLI."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLI = [sys.executable, "-m", "personafuse.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_route_json():
    proc = run_cli("route", "--json", "I've been so anxious I can't sleep", "Solve 3x + 7 = 22")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2
    from personafuse import TRAIT_POLES

    for line in lines:
        assert list(line["weights"]) == list(TRAIT_POLES)
        assert sum(line["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert lines[0]["weights"] != lines[1]["weights"]


def test_chat_one_shot_shows_reply_and_weights():
    proc = run_cli("chat", "Hi! Can you suggest a name for my cat?", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "PersonaFuse" in out and "routing weights" in out
    for pole in ("high_O", "low_N"):
        assert pole in out
    proc = run_cli("chat", "Hello", "--json", "--routing", "pole:high_A", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = json.loads(proc.stdout)
    assert reply["weights"]["high_A"] == 1.0 and reply["reply"].strip()


def test_bad_routing_flag_is_named():
    proc = run_cli("chat", "Hello", "--routing", "pole:brave_A")
    assert proc.returncode != 0
    assert "brave_A" in proc.stderr and "--routing" in proc.stderr
