"""`personafuse serve --model default` (embedded SmolLM2 + MiniLM router) as its own process,
spoken to with the official openai client, then stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e
SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_default_model_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "personafuse.cli", "serve", "--model", "default", "--port", str(port), "--threads", "2",
         "--max-tokens-limit", "64"],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        anxious = client.chat.completions.create(
            model="personafuse", messages=[{"role": "user", "content": "I'm so anxious about tomorrow, I can't breathe."}],
            max_tokens=16, temperature=0,
        )
        maths = client.chat.completions.create(
            model="personafuse", messages=[{"role": "user", "content": "Solve 3x + 7 = 22 for x."}], max_tokens=16, temperature=0,
        )
        # each reply reports the default model's router weights for its own message
        from personafuse.specs import load_personafuse

        want = load_personafuse("default").route(
            ["I'm so anxious about tomorrow, I can't breathe.", "Solve 3x + 7 = 22 for x."]
        ).tolist()
        for r, w in zip((anxious, maths), want, strict=True):
            assert r.choices[0].message.content.strip()
            assert list(r.model_extra["persona"]["weights"].values()) == pytest.approx(w, abs=1e-4)
        assert anxious.model_extra["persona"]["weights"] != maths.model_extra["persona"]["weights"]
        stream = client.chat.completions.create(
            model="personafuse", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0, stream=True,
            extra_body={"persona": {"mode": "pole", "pole": "high_E"}},
        )
        chunks = list(stream)
        assert chunks[0].model_extra["persona"]["weights"]["high_E"] == 1.0
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal, so -SIGTERM is a clean exit too.
        assert proc.wait(60) in (0, -signal.SIGTERM)
