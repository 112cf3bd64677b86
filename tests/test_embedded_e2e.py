"""End to end on the embedded SmolLM2 base + MiniLM router, offline, through the real CLI."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

# wide columns: rich wraps an error box at the terminal width, which would split a long tmp path
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "400"}
CLI = [sys.executable, "-m", "personafuse.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_route_json():
    proc = run_cli("route", "--json", "I've been so anxious I can't sleep", "Solve 3x + 7 = 22")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2
    from personafuse import TRAIT_POLES

    # the weights are the default model's router's for each query (init is seeded: same in-process)
    from personafuse.specs import load_personafuse

    want = load_personafuse("default").route([line["query"] for line in lines]).tolist()
    for line, w in zip(lines, want, strict=True):
        assert list(line["weights"]) == list(TRAIT_POLES)
        assert list(line["weights"].values()) == pytest.approx(w, abs=1e-5)
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


def test_missing_model_path_and_bad_tau_are_named_without_a_traceback(tmp_path):
    proc = run_cli("route", "hi", "--model", str(tmp_path / "ckpt-missing"))
    assert proc.returncode == 2  # a usage error, as click reports one
    assert "--model" in proc.stderr and "ckpt-missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("route", "hi", "--tau", "0")
    assert proc.returncode == 2 and "--tau" in proc.stderr and "positive" in proc.stderr


def test_exported_lora_loads_with_auto_peft_on_the_embedded_gguf_base(tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM

    from personafuse import PersonaFuseConfig, PersonaFuseModel

    pf = PersonaFuseModel.from_config(PersonaFuseConfig(encoder_model="minilm"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking experts: B starts at zero
        for layer in pf.mixture_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    w = {"high_A": 0.6, "low_N": 0.4}
    out = pf.export_lora(w, tmp_path / "lora")
    info = json.loads((out / "personafuse_mixture.json").read_text())
    lora = AutoPeftModelForCausalLM.from_pretrained(str(out), gguf_file=info["base_gguf_file"]).eval()
    ids = pf.tokenizer(["Hello there, how are you today?"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), pf.mixture_weights(w):
        ours = pf.base_model(input_ids=ids).logits
    with torch.no_grad():
        theirs = lora(input_ids=ids).logits
        base = pf.base_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changed the logits


def test_interactive_chat_json_prints_one_object_per_reply_and_nothing_else():
    proc = subprocess.run([*CLI, "chat", "--json", "--max-new-tokens", "4"], input="Hello\nAnd tea?\n\n",
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(replies) == 2 and all(r["finish_reason"] in ("stop", "length") and len(r["weights"]) == 10 for r in replies)
    assert "you>" in proc.stderr
