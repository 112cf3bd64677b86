"""The vLLM route's parts that run without vLLM (fast): the stack export, the plugin's checks and
scale rows, and the front's refusals before it ever calls vLLM. The same parts inside real vLLM
are tests/serving/test_vllm_e2e.py (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny
from personafuse.serving import ServeConfig
from personafuse.serving import vllm_plugin as plugin
from personafuse.serving.vllm_front import create_front_app
from personafuse.traits import TRAIT_POLES
from serve_support import LiveServer

SRC = str(Path(__file__).resolve().parents[2] / "src")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    pf = build_tiny(d)
    pf.save_pretrained(d / "ckpt")
    return pf, d


def test_another_minor_version_is_refused_naming_both() -> None:
    for ok in ("0.32.0", "0.32.1", "0.32.0+cpu"):
        plugin.check_version(ok)
    for bad in ("0.33.0", "0.31.2+cpu", "1.32.0"):
        with pytest.raises(plugin.VersionError) as e:
            plugin.check_version(bad)
        assert bad in str(e.value) and "0.32" in str(e.value)


def test_weights_are_checked_naming_the_field() -> None:
    assert plugin.parse_weights(None) is None and plugin.parse_weights({"other": 1}) is None
    assert plugin.parse_weights({plugin.WEIGHTS_KEY: [0.5] + [0] * 9}) == [0.5] + [0.0] * 9
    bad = {
        "[1, 2]": ("must be a list of 10 numbers, got 2", [1, 2]),
        "text": ("got str", "0.1,0.2"),
        "negative": ("personafuse_weights[3] must be a finite number >= 0", [0, 0, 0, -1] + [1] * 6),
        "nan": ("personafuse_weights[0]", [float("nan")] + [1] * 9),
        "zero": ("all zero", [0] * 10),
    }
    for _, (message, value) in bad.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            plugin.parse_weights({plugin.WEIGHTS_KEY: value})


def test_export_stack_is_the_mixture_once_each_block_is_scaled(tiny, tmp_path) -> None:
    """What the plugin does between shrink and expand (rank block i times w_i) turns the stack into
    the fixed export of that mixture, tensor for tensor; the stack itself is unweighted."""
    pf, d = tiny
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "personafuse.cli", "export", str(tmp_path / "stack"), "--stack",
                           "--model", f"pf:{d / 'ckpt'}"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    info = json.loads((tmp_path / "stack" / "personafuse_mixture.json").read_text())
    assert info["stack"] is True and info["poles"] == list(TRAIT_POLES) and info["expert_rank"] == pf.config.r
    assert line == (f"vllm serve {info['serve_model']} --enable-lora --max-lora-rank 128 "
                    f"--lora-modules personafuse={tmp_path / 'stack'}")  # fmt: skip
    assert plugin.stack_info(str(tmp_path / "stack"))["expert_rank"] == pf.config.r
    w = torch.tensor([0.6, 0, 0, 0, 0.1, 0, 0, 0, 0, 0.3])
    fixed = load_file(str(pf.export_lora(w, tmp_path / "fixed") / "adapter_model.safetensors"))
    stack = load_file(str(tmp_path / "stack" / "adapter_model.safetensors"))
    assert plugin.stack_info(str(tmp_path / "fixed")) is None  # a fixed persona is an ordinary adapter
    scale = torch.tensor(plugin.scale_row(w.tolist(), pf.config.r, 128))[: 10 * pf.config.r]
    for name, t in stack.items():
        if "lora_A" in name:
            torch.testing.assert_close(t * scale[:, None], fixed[name], rtol=0, atol=1e-7)
        else:
            assert torch.equal(t, fixed[name])


def test_export_needs_exactly_one_of_routing_and_stack(tmp_path) -> None:
    import typer
    from typer.testing import CliRunner

    from personafuse.chat_cli import register

    app = typer.Typer()
    register(app)
    for args in ([], ["--stack", "--routing", "pole:high_A"]):
        res = CliRunner().invoke(app, ["export", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and "--stack" in res.output, res.output
    assert not (tmp_path / "x").exists()


def test_a_stack_request_without_weights_is_an_error(tiny, tmp_path) -> None:
    pf, _ = tiny
    pf.export_stack(tmp_path / "stack")

    class Lora:  # the two fields of vllm.lora.request.LoRARequest the plugin reads
        lora_name, lora_path = "personafuse", str(tmp_path / "stack")

    with pytest.raises(ValueError, match="stack adapter 'personafuse' sent no weights"):
        plugin.request_weights(Lora(), {})
    assert plugin.request_weights(None, {}) is None  # the base model: no scale
    assert plugin.request_weights(Lora(), {plugin.WEIGHTS_KEY: [1] + [0] * 9}) == [1.0] + [0.0] * 9


def test_the_front_refuses_before_calling_vllm_and_names_an_unreachable_one(tiny) -> None:
    pf, _ = tiny
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    with LiveServer(create_front_app(pf, url, ServeConfig(model_name="pf", default_max_tokens=4))) as s:
        msg = [{"role": "user", "content": "hello"}]
        for persona, field in (({"mode": "fixed"}, "needs 'weights'"), ({"weights": [0] * 10}, "persona")):
            r = httpx.post(s.url + "/v1/chat/completions", json={"messages": msg, "persona": persona}, timeout=30)
            assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": msg}, timeout=30)
        assert r.status_code == 500 and url in r.json()["error"]["message"]
        h = httpx.get(s.url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["vllm_url"] == url
