"""The GPU benchmark scripts still run and still compute the mixture, at tiny shapes on CPU.

They run for real only in a lent device session, where a script broken by a library change costs
the session; here they run in seconds (the Triton kernels in Triton's interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_expand_kernel_benchmark_times_every_layout_and_each_computes_the_sum(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "expand.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/expand_kernel.py"), "--device", "cpu", "--dtype", "float32",
           "--hidden", "64", "--kv", "32", "--inter", "128", "--rows", "4,24", "--iters", "1", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for rows in (4, 24):
        row = result[f"rows_{rows}"]
        assert set(row) == {"base", "plain", "packed", "fused", "base_act", "fused_act"}, row
        for name, r in row.items():
            assert r["eager_us"] > 0
            if not name.startswith("base"):  # fp32 against float64: the sum, not just the shapes
                assert r["rel_err_vs_fp64"] < 1e-5, (rows, name, r)


def _run(script: str, *args: str, env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mixture_throughput_benchmark_writes_its_ratios_and_checks_the_layouts_agree(tmp_path):
    out = tmp_path / "mixture.json"
    variants = ["base", "moe", "moe_packed", "moe_tuned_act", "peft_lora"]
    _run("mixture_throughput.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "2",
         "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--decoder", "personafuse",
         "--variants", ",".join(variants), "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == {f"{v}_vs_base" for v in variants[1:]}
    assert all(r > 0 for r in result["ratios"].values()) and result["rounds_completed"] == 1
    assert set(result["warmup_s"]) == set(variants)
    # the moe layouts compute the same mixture: same logits (fp32) and the same first new token
    assert result["moe_layouts_rel_logit_diff"] < 1e-5
    assert result["moe_layouts_first_token_agreement"] == 1.0


def test_profile_decode_benchmark_profiles_each_variant(tmp_path):
    out = tmp_path / "profile.json"
    _run("profile_decode.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--backend", "eager",
         "--variants", "base,moe,moe_tuned_act", "--json", str(out))  # fmt: skip
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"base", "moe", "moe_tuned_act"}
    assert all(v["host_overhead_us"] > 0 and v["top"] for v in variants.values())
