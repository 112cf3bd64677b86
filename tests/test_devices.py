"""--device / --dtype (personafuse.devices): one reading in every model-loading command.

Each model kind (hf:, lora:, pf: on tiny random models; default and base on the embedded SmolLM2,
e2e) is loaded with ``--device cpu --dtype bfloat16`` through each command's own code path, and
the test checks what the model computes in (its parameters, and the logits of a real forward), not
what the command was told."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny, make_tokenizer, tiny_causal_lm, tiny_encoder
from eval_support import FIXTURE_BENCHDATA
from personafuse import devices
from personafuse.devices import (
    DeviceError,
    check_dtype,
    placement_line,
    resolve_device,
    resolve_dtype,
    source_dtype,
)

torch.set_num_threads(1)
NO_CUDA = not torch.cuda.is_available()
BF16 = "dtype bfloat16"


@functools.cache
def _app():
    """The personafuse command's model-loading groups, registered as the command registers them."""
    import typer

    from personafuse.chat_cli import register as chat_commands
    from personafuse.data.cli import app as data_app
    from personafuse.evaluation.cli import register as eval_commands
    from personafuse.serving.cli import register as serve_commands

    app = typer.Typer()
    for register in (chat_commands, eval_commands, serve_commands):
        register(app)
    app.add_typer(data_app, name="data")
    return app


def _invoke(*args: str):
    return CliRunner().invoke(_app(), list(args), catch_exceptions=False)


def _plain(text: str) -> str:
    """Rich's boxed error and help text, one line, no box characters."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


# ------------------------------------------------------------------------------------ resolving
def test_the_device_grammar_and_what_this_machine_lacks():
    assert resolve_device("cpu") == "cpu"
    if NO_CUDA and sys.platform == "linux":  # no MPS on Linux
        assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="'tpu' is not a device"):
        resolve_device("tpu")
    if NO_CUDA:
        for d in ("cuda", "cuda:1"):
            with pytest.raises(DeviceError, match=f"{d}: this machine has no CUDA device"):
                resolve_device(d)
    with pytest.raises(DeviceError, match="not a dtype") as e:
        check_dtype("float33")
    assert e.value.option == "--dtype"


def test_dtype_precedence_flag_then_checkpoint_then_auto():
    assert resolve_dtype("bfloat16", "cpu", own="float32") == "bfloat16"  # the flag
    assert resolve_dtype("auto", "cpu", own="bfloat16") == "bfloat16"  # the checkpoint's own
    assert resolve_dtype("auto", "cpu", own=None) == "float32"  # auto on the CPU
    assert resolve_dtype("auto", "cpu", own="float64") == "float32"  # not one we load in


def test_source_dtype_reads_the_checkpoint_and_gives_a_gguf_none(tmp_path):
    for key in ("dtype", "torch_dtype"):  # transformers 5, and checkpoints saved before it
        (tmp_path / "config.json").write_text(json.dumps({key: "bfloat16"}))
        assert source_dtype(str(tmp_path)) == "bfloat16"
    assert source_dtype(str(tmp_path), gguf_file="m.gguf") is None
    (tmp_path / "config.json").write_text("{}")
    assert source_dtype(str(tmp_path)) is None


# ------------------------------------------------------------------------------------ the CLI
MODEL_COMMANDS = [
    ["eval"], ["serve"], ["chat", "hi"], ["route", "hi"], ["export", "OUT", "--routing", "pole:high_A"],
    ["probe", "--dataset", "emotion", "--encoder", "minilm"], ["routing"], ["data", "generate", "--out", "OUT"],
]  # fmt: skip


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", MODEL_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_device_cuda_without_cuda_exits_2_naming_the_flag_before_any_load(cmd, tmp_path, monkeypatch):
    import personafuse.specs

    def no_load(*a, **k):  # the check must come first
        raise AssertionError("a model was loaded before --device was checked")

    monkeypatch.setattr(personafuse.specs, "load_personafuse", no_load)
    monkeypatch.setattr("personafuse.evaluation.subjects.load_subject", no_load)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in cmd]
    r = _invoke(*args, "--device", "cuda")
    assert r.exit_code == 2, r.output
    assert "Invalid value for --device: cuda: this machine has no CUDA device" in _plain(r.output)
    assert not (tmp_path / "out").exists()
    r = _invoke(*args, "--dtype", "float8")
    assert r.exit_code == 2 and "Invalid value for --dtype" in _plain(r.output)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_the_installed_command_exits_2_on_cuda():
    """The real entry point, as a user runs it (a fresh process, the whole CLI imported)."""
    p = subprocess.run([sys.executable, "-m", "personafuse.cli", "route", "hi", "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "--device" in p.stderr and "no CUDA device" in _plain(p.stderr)


@pytest.mark.parametrize("cmd", [c[:2] if c[0] == "data" else c[:1] for c in MODEL_COMMANDS], ids=" ".join)
def test_help_of_every_model_loading_command_lists_device_and_dtype(cmd):
    r = _invoke(*cmd, "--help")
    assert r.exit_code == 0
    text = _plain(r.output)
    assert "--device" in text and "--dtype" in text and "cuda:N" in text, text


# ------------------------------------------------------------------------------------ each kind
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny random models saved in float32: a plain causal LM (hf:), a peft LoRA on it (lora:),
    a PersonaFuse checkpoint on it (pf:) and a Qwen2 encoder."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("devices")
    build_tiny(d).save_pretrained(d / "ckpt")  # writes d/base and d/encoder too
    lora = get_peft_model(tiny_causal_lm(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(d / "lora")
    cfg = json.loads((d / "lora" / "adapter_config.json").read_text())
    (d / "lora" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(d / "base")}))
    tiny_encoder("qwen2").save_pretrained(d / "qwen2")
    make_tokenizer().save_pretrained(d / "qwen2")
    assert json.loads((d / "base" / "config.json").read_text())["dtype"] == "float32"
    return {"hf": f"hf:{d / 'base'}", "lora": f"lora:{d / 'lora'}", "pf": f"pf:{d / 'ckpt'}", "encoder": f"hf:{d / 'qwen2'}", "dir": str(d)}


def _logits_dtype(model, call) -> torch.dtype:
    """The dtype of the logits (the LM head's output) of the first forward ``call`` makes: what
    the model computed in."""
    seen: list[torch.dtype] = []
    h = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        call()
    finally:
        h.remove()
    return seen[0]


def _assert_bf16(module) -> None:
    # the router's ten expert embeddings stay float32: routing computes its cosines in float32
    odd = {n: p.dtype for n, p in module.named_parameters() if p.dtype != torch.bfloat16 and not n.endswith("expert_embeddings")}
    assert not odd, odd


@pytest.mark.parametrize("kind", ["hf", "lora", "pf"])
def test_eval_subject_computes_in_bfloat16(models, kind):
    """personafuse eval, the grid's replies cells and routing analysis load through load_subject."""
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    s = load_subject(models[kind], SubjectOptions(device="cpu", dtype="bfloat16", batch_size=2))
    _assert_bf16(s.model)
    assert (s.describe()["device"], s.describe()["dtype"]) == ("cpu", "bfloat16")  # results.json's subject
    base = s.model.base_model if kind == "pf" else s.model
    assert _logits_dtype(base, lambda: s.generate(["i am so anxious"], max_new_tokens=2)) == torch.bfloat16
    # without --dtype: the checkpoint's own (float32 here), as before
    assert devices.placement(load_subject(models[kind], SubjectOptions(device="cpu")).model)[1] == "float32"


@pytest.mark.parametrize("kind", ["hf", "pf"])
def test_chat_route_serve_export_model_computes_in_bfloat16(models, kind):
    """chat, route, serve and export load through chat_cli.load_model (lora: is refused there)."""
    from personafuse.chat_cli import load_model

    m = load_model(models[kind], "cpu", "bfloat16")
    _assert_bf16(m)
    assert _logits_dtype(m.base_model, lambda: m.generate(["i am so anxious"], max_new_tokens=2)) == torch.bfloat16
    assert placement_line(m) == "device cpu, dtype bfloat16"


def test_eval_command_says_bfloat16_first_and_runs(models, tmp_path):
    for kind in ("hf", "lora", "pf"):
        r = _invoke("eval", "--model", models[kind], "--benchmarks", "emobench", "--data", str(FIXTURE_BENCHDATA), "--limit", "1",
                    "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / kind), "--device", "cpu", "--dtype", "bfloat16")
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[0] == f"{models[kind]}: device cpu, {BF16}", r.output
        assert (tmp_path / kind / "results.json").is_file()


def test_chat_route_export_commands_say_bfloat16_first(models, tmp_path):
    from safetensors.torch import load_file

    for kind in ("hf", "pf"):
        for cmd in (["chat", "i am so anxious", "--max-new-tokens", "2", "--json"], ["route", "i am so anxious", "--json"]):
            r = _invoke(*cmd, "--model", models[kind], "--device", "cpu", "--dtype", "bfloat16")
            assert r.exit_code == 0, r.output
            assert r.output.splitlines()[0] == f"{models[kind]}: device cpu, {BF16}", r.output
    r = _invoke("export", str(tmp_path / "calm"), "--routing", "pole:high_A", "--model", models["pf"], "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 0 and BF16 in r.output.splitlines()[0], r.output
    tensors = load_file(str(tmp_path / "calm" / "adapter_model.safetensors"))
    assert {t.dtype for k, t in tensors.items() if "lora_A" in k} == {torch.bfloat16}


def test_serve_command_serves_in_bfloat16(models, tmp_path):
    """The real `personafuse serve` process: its first line is where the model computes, and it answers."""
    import os
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "personafuse.cli", "serve", "--model", models["pf"], "--port", str(port),
                             "--device", "cpu", "--dtype", "bfloat16", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        first = proc.stderr.readline().strip()
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "i am so anxious"}], "max_tokens": 2}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
    finally:
        proc.terminate()
        proc.wait(60)
    assert first == f"{models['pf']}: device cpu, {BF16}"
    assert r.status_code == 200 and len(r.json()["persona"]["weights"]) == 10


def test_probe_encoders_compute_in_bfloat16(models, tmp_path):
    from personafuse.evaluation.probing import make_encoder

    for spec in (models["encoder"], models["pf"]):
        enc = make_encoder(spec, "cpu", "bfloat16")
        assert enc.placement.endswith(f"device cpu, {BF16}")
        assert enc(["i am so anxious", "solve x"]).shape[0] == 2
    rows = [{"text": f"{w} {w} please", "label": w[:1]} for w in ("anxious", "sad", "solve", "prove") * 5]
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _invoke("probe", "--dataset", str(data), "--encoder", models["encoder"], "--encoder", models["pf"], "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert [ln for ln in r.output.splitlines() if ": device " in ln] == [f"{models['encoder']}: device cpu, {BF16}", f"{models['pf']}: device cpu, {BF16}"]


def test_routing_command_routes_situations_in_bfloat16(models, tmp_path):
    sit = tmp_path / "situations.jsonl"
    sit.write_text("".join(json.dumps({"query": q, "situation": s}) + "\n" for q, s in (("i am so anxious", "support"), ("solve x", "math"))))
    r = _invoke("routing", "--situations", str(sit), "--model", models["pf"], "--out", str(tmp_path / "r"), "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"{models['pf']}: device cpu, {BF16}", r.output
    assert (tmp_path / "r" / "situations_routed.jsonl").is_file()
    r = _invoke("routing", "--situations", str(sit), "--model", models["hf"], "--device", "cpu")
    assert r.exit_code == 2 and "has no router" in _plain(r.output)


def test_data_generate_teacher_computes_in_bfloat16(models, tmp_path):
    from personafuse.data.teachers import TeacherOptions, make_teacher

    t = make_teacher(models["hf"], TeacherOptions(device="cpu", dtype="bfloat16"))
    _assert_bf16(t.model)
    r = _invoke("data", "generate", "--teacher", models["hf"], "--source", "seeds", "--limit", "1", "--max-new-tokens", "2",
                "--no-progress", "--out", str(tmp_path / "d"), "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"{models['hf']}: device cpu, {BF16}", r.output


@pytest.mark.parametrize("kind", ["hf", "lora", "pf"])
def test_lm_eval_adapter_takes_dtype_and_device(models, kind):
    from personafuse.evaluation.lm_eval_model import PersonaFuseLM

    lm = PersonaFuseLM(model=models[kind], dtype="bfloat16", device="cpu", batch_size=1)
    _assert_bf16(lm._pf if kind == "pf" else lm.model)
    assert lm.device.type == "cpu"


def test_the_grid_passes_device_and_dtype_to_every_model_loading_cell(models, tmp_path, capsys):
    from personafuse.reproduce.config import ConfigError, ReproduceConfig
    from personafuse.reproduce.plan import plan
    from personafuse.reproduce.run import command

    cfg = ReproduceConfig.from_dict({"teacher": {"spec": "default"}, "eval": {"device": "cuda:1", "dtype": "bfloat16"}})
    cells = plan(cfg)
    for cell in cells:
        cmd = command(cfg, cell)
        placed = "--device" in cmd and cmd[cmd.index("--device") + 1] == "cuda:1" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
        assert placed == (cell.kind in ("eval", "replies", "data")), (cell.name, cmd)
    auto = ReproduceConfig.from_dict({})  # auto: the commands' default, so done cells of older runs stay done
    assert not any("--device" in command(auto, c) for c in plan(auto))
    with pytest.raises(ConfigError, match="eval.device: 'gpu'"):
        ReproduceConfig.from_dict({"eval": {"device": "gpu"}})
    with pytest.raises(ConfigError, match="eval.dtype: 'fp8'"):
        ReproduceConfig.from_dict({"eval": {"dtype": "fp8"}})
    # the replies cell's own command: a pf: checkpoint in bfloat16, the first line from its parameters
    from personafuse.reproduce.replies import main as replies

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "a", "query": "i am so anxious", "situation": "support"}) + "\n")
    args = ["--model", models["pf"], "--queries", str(q), "--system", "pf", "--max-new-tokens", "2"]
    replies([*args, "--out", str(tmp_path / "r.jsonl"), "--device", "cpu", "--dtype", "bfloat16"])
    assert capsys.readouterr().out.splitlines()[0] == f"{models['pf']}: device cpu, {BF16}"
    assert (tmp_path / "r.jsonl").is_file()
    if NO_CUDA:
        with pytest.raises(SystemExit) as e:
            replies([*args, "--out", str(tmp_path / "r2.jsonl"), "--device", "cuda"])
        assert e.value.code == 2 and "--device" in capsys.readouterr().err and not (tmp_path / "r2.jsonl").exists()


# ------------------------------------------------------------------------------------ embedded (e2e)
@pytest.mark.e2e
def test_embedded_base_and_default_convert_the_gguf_to_bfloat16():
    """``base`` and ``default`` load a GGUF (no dtype of its own): converted to the request, not
    float32 as before."""
    from personafuse.chat_cli import load_model
    from personafuse.evaluation.subjects import SubjectOptions, load_subject

    s = load_subject("base", SubjectOptions(device="cpu", dtype="bfloat16", batch_size=1))
    _assert_bf16(s.model)
    assert _logits_dtype(s.model, lambda: s.generate(["Hi"], max_new_tokens=1)) == torch.bfloat16
    m = load_model("default", "cpu", "bfloat16")
    _assert_bf16(m)  # the base and the router's encoder (a copy of the base's body)
    assert _logits_dtype(m.base_model, lambda: m.generate(["Hi"], max_new_tokens=1)) == torch.bfloat16
    assert m.route(["I can't sleep"]).shape == (1, 10)
