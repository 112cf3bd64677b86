"""The real CLI trains all three stages on the embedded SmolLM2 + MiniLM with a handful of records."""

import json
import os
import subprocess
import sys

import pytest

from personafuse.traits import vector_from_poles

pytestmark = pytest.mark.e2e

RECORDS = [
    ("I'm so nervous about my job interview tomorrow.", "It's normal to feel nervous. Prepare a few stories, sleep well, and remember they want you to succeed.", ["high_A", "low_N"]),
    ("What is 12 times 13?", "12 times 13 is 156: 12 x 10 = 120 and 12 x 3 = 36, so 120 + 36 = 156.", ["high_C", "low_N"]),
    ("Give me three fun ideas for a rainy Saturday.", "Build a blanket fort, hold a bake-off, or film a tiny stop-motion movie!", ["high_O", "high_E"]),
    ("My order arrived broken. What can I do?", "I'm sorry it arrived damaged. Reply with a photo and your order number and we'll send a replacement.", ["high_C", "high_A"]),
    ("I feel lonely since moving to a new city.", "That's a hard change. Joining a club or a class can help you meet people slowly.", ["high_A", "high_N"]),
    ("Explain what a prime number is.", "A prime number has exactly two divisors: 1 and itself. 2, 3, 5 and 7 are primes.", ["high_C", "low_E"]),
]


def test_cli_trains_three_stages_and_chats(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with (data / "records-00000.jsonl").open("w") as f:
        for i, (q, r, poles) in enumerate(RECORDS):
            f.write(json.dumps({"id": f"r{i}", "query": q, "response": r, "p": vector_from_poles(poles)}) + "\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "max_length: 96\nsave_every: 2\n"
        "warmup: {steps: 2, batch_size: 1, micro_batch_size: 4, lr: 0.001}\n"
        "router: {steps: 3, batch_size: 4, micro_batch_size: 4, lr: 0.001}\n"
        "joint: {steps: 2, batch_size: 2, micro_batch_size: 2, lr: 0.0001}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "personafuse.cli", "train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("warmup", "router", "joint"):
        logs = (tmp_path / "out" / stage / "losses.jsonl").read_text().splitlines()
        assert len(logs) == {"warmup": 2, "router": 3, "joint": 2}[stage]
        assert (tmp_path / "out" / stage / "model" / "experts.safetensors").is_file()
        assert json.loads((tmp_path / "out" / stage / "train_config.json").read_text())["warmup"]["steps"] == 2
    # --resume after completion does nothing and succeeds
    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the trained checkpoint answers through the chat CLI
    chat = [sys.executable, "-m", "personafuse.cli", "chat", "Hello!", "--json", "--max-new-tokens", "6", "--model", str(tmp_path / "out" / "joint" / "model")]
    proc = subprocess.run(chat, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from personafuse import PersonaFuseModel

    # the weights reported are the trained router's for this query (summing to 1 is softmax's doing)
    want = PersonaFuseModel.from_pretrained(tmp_path / "out" / "joint" / "model").route(["Hello!"])[0].tolist()
    assert list(json.loads(proc.stdout)["weights"].values()) == pytest.approx(want, abs=1e-5)


def test_cli_names_bad_records(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "oops", "query": "hi", "response": "hello", "p": [0] * 10}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "personafuse.cli", "train", "--data", str(data), "--out", str(tmp_path / "o")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "id oops" in proc.stderr and "all zero" in proc.stderr
