"""Per-request persona mixtures inside real vLLM (issue 32), on its CPU path: the embedded SmolLM2
with random experts, ``personafuse export --stack``, the ``vllm serve`` command it prints (run as
printed, plus port and CPU settings), the personafuse plugin loaded by vLLM's own entry-point
discovery, and ``personafuse serve --engine vllm``'s front in front of it.

Slow (one vLLM start; 461 s on the loaded 2-core development machine, see docs/serving.md): marked ``slow``; ``make test`` runs it after building
``.venv-vllm`` (``make vllm-env``), and the fixture builds that venv itself when it is missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from personafuse.serving import ServeConfig
from personafuse.serving.vllm_front import create_front_app
from personafuse.traits import TRAIT_POLES
from serve_support import LiveServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
STAMP = VENV / ".personafuse-vllm-installed"
MAX_TOKENS = 20
QUERY = "I can't sleep before my exam tomorrow. Any advice?"
# Two fixed mixtures, one pole, one from the router: four different rows in one vLLM batch.
ROUTINGS = {
    "fixed_calm": {"weights": {"high_A": 0.6, "low_N": 0.4}},
    "fixed_bold": {"weights": {"high_E": 0.7, "high_O": 0.3}},
    "pole": {"pole": "high_C"},
    "router": None,
}


def _ensure_venv() -> None:
    """`make test` builds the venv in the background while the suite runs: wait for that build
    (it holds scripts/vllm_env.sh's lock), then build it here only if it is still missing."""
    import fcntl

    with open(f"{VENV}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_UN)
    if STAMP.is_file():
        return
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and STAMP.is_file(), f"building {VENV} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_stack(ckpt: Path, out: Path) -> str:
    """`personafuse export OUT --stack --model pf:CKPT` in this process; the command it prints."""
    import typer
    from typer.testing import CliRunner

    from personafuse.chat_cli import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["export", str(out), "--stack", "--model", f"pf:{ckpt}"])
    assert res.exit_code == 0, res.output[-2000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The embedded model with random experts (fresh B is zero: every mixture would be the base)."""
    from personafuse.specs import load_personafuse

    torch.set_num_threads(1)
    m = load_personafuse("default")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in m.mixture_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    d = tmp_path_factory.mktemp("vllm") / "ckpt"
    m.save_pretrained(d)
    return m.eval(), d


@pytest.fixture(scope="module")
def vllm(model, tmp_path_factory):
    """`vllm serve` exactly as `personafuse export --stack` prints it, on a free loopback port."""
    _ensure_venv()
    _, ckpt = model
    stack = tmp_path_factory.mktemp("stack") / "stack"
    printed = _export_stack(ckpt, stack)
    assert printed.startswith("vllm serve ") and f"personafuse={stack}" in printed
    port = _free_port()
    extra = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
             "--max-num-seqs", "8", "--enable-prompt-tokens-details"]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}  # fmt: skip
    log = open(stack.parent / "vllm.log", "w")  # noqa: SIM115 - open for the server's whole life
    server = subprocess.Popen(["bash", "-c", f"exec {printed} " + " ".join(extra)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(server, url, stack.parent / "vllm.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: vLLM's engine and worker processes too
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        log.close()


def _wait_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve was not healthy within 900 s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def front(model, vllm):
    m, _ = model
    with LiveServer(create_front_app(m, vllm, ServeConfig(model_name="pf", max_tokens_limit=64))) as s:
        yield s.url


def _chat(url: str, persona: dict | None, stream: bool = False) -> tuple[str, dict]:
    body = {"messages": [{"role": "user", "content": QUERY}], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if persona is not None:
        body["persona"] = persona
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["persona"]
    text, persona_out = [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                persona_out = chunk.get("persona", persona_out)
                text += [c["delta"].get("content", "") for c in chunk["choices"]]
    return "".join(text), persona_out


def test_four_mixtures_in_one_batch_each_give_personafuse_chat_reply(model, front) -> None:
    m, _ = model
    with cf.ThreadPoolExecutor(4) as pool:  # concurrent: vLLM schedules them into the same steps
        futures = {k: pool.submit(_chat, front, p, stream=(k == "router")) for k, p in ROUTINGS.items()}
        got = {k: f.result() for k, f in futures.items()}
    replies = set()
    for key, persona in ROUTINGS.items():
        text, persona_out = got[key]
        routing = {"mode": "router"} if persona is None else {"mode": "pole" if "pole" in persona else "fixed", **persona}
        want = m.generate([QUERY], routing=routing, max_new_tokens=MAX_TOKENS)[0]  # what `personafuse chat` runs
        assert text == want.text, key
        assert [persona_out["weights"][p] for p in TRAIT_POLES] == pytest.approx([want.weights[p] for p in TRAIT_POLES], abs=1e-5)
        replies.add(text)
    assert len(replies) >= 2  # the mixtures do change the reply: the scale reached the layers


def test_a_request_without_weights_is_refused_by_the_front_and_fails_in_vllm(front, vllm) -> None:
    msgs = [{"role": "user", "content": QUERY}]
    r = httpx.post(front + "/v1/chat/completions", json={"messages": msgs, "persona": {"mode": "fixed"}}, timeout=60)
    assert r.status_code == 400 and "needs 'weights'" in r.json()["error"]["message"]
    r = httpx.post(vllm + "/v1/completions", json={"model": "personafuse", "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and "sent no weights" in r.text, r.text
    bad = {"model": "personafuse", "prompt": "Hello", "max_tokens": 2, "vllm_xargs": {"personafuse_weights": [1, 2]}}
    r = httpx.post(vllm + "/v1/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "10 numbers" in r.text
    ok = {**bad, "vllm_xargs": {"personafuse_weights": [1] + [0] * 9}}
    assert httpx.post(vllm + "/v1/completions", json=ok, timeout=120).status_code == 200  # the engine lives on


def test_same_prompt_different_weights_share_no_cached_blocks(vllm) -> None:
    # one full KV block (128 tokens on vLLM's CPU backend) and a little more: only full blocks are
    # cached, and vLLM's CPU LoRA prefill gathers the adapter per token, so longer costs minutes
    prompt = "Tell me about the old town, its rivers, bridges, markets and stone walls. " * 10

    def cached(w: list[float]) -> int:
        body = {"model": "personafuse", "prompt": prompt, "max_tokens": 1, "vllm_xargs": {"personafuse_weights": w}}
        r = httpx.post(vllm + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] or 0

    a, b = [0.6] + [0] * 8 + [0.4], [0] * 6 + [1] + [0] * 3
    assert cached(a) == 0
    assert cached(a) > 0  # the same mixture reuses its blocks: caching is on
    assert cached(b) == 0  # another mixture reuses none of them


def test_another_vllm_minor_version_is_refused_at_load() -> None:
    _ensure_venv()
    code = ("import vllm; vllm.__version__ = '0.33.0'\n"
            "from vllm.plugins import load_general_plugins; load_general_plugins()")  # fmt: skip
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert proc.returncode != 0
    assert "vLLM 0.33.0 is installed" in proc.stderr and "supports vLLM 0.32.x" in proc.stderr, proc.stderr[-2000:]
