"""The annotation app in headless Chromium, served by the real CLI in its own process: a participant
signs in with a token minted by 'personafuse annotate tokens', a judgement made in the browser
survives a server restart and appears in the export."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_support import CHROMIUM, CHROMIUM_ARGS

ARTIFACTS = Path(os.environ.get("PERSONAFUSE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
SRC = str(Path(__file__).resolve().parents[2] / "src")
OWNER_KEY = "owner-key-for-the-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "personafuse.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


class AnnotateServer:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = (*args, "--owner-key", OWNER_KEY)
        self.proc = subprocess.Popen(cli("annotate", "serve", *args, "--port", str(self.port)), env=env())

    def __enter__(self) -> AnnotateServer:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "annotation server exited"
            try:
                httpx.get(self.url + "/api/summary", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("annotation server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: a real stop, nothing flushed by hand
        self.proc.wait(30)


def test_judgement_survives_restart_and_is_exported(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    prompts = {"e1": ("emotion", "I failed my driving test again and feel useless."), "r1": ("reasoning", "What is 17 * 3?")}
    for name, style in (("personafuse", "warm and clear"), ("baseline", "terse")):
        rows = [{"id": k, "prompt": p, "task": t, "response": f"[{name}] a {style} reply to: {p}"} for k, (t, p) in prompts.items()]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "ann.sqlite"
    files = [str(tmp_path / "personafuse.jsonl"), str(tmp_path / "baseline.jsonl")]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    minted = subprocess.run(cli("annotate", "tokens", "alice", "--db", str(db)), env=env(), check=True, capture_output=True, text=True)
    name, token = minted.stdout.split()
    assert name == "alice" and len(token) >= 16
    owner = {"authorization": f"Bearer {OWNER_KEY}"}

    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 820},
        )
        page = ctx.new_page()
        with AnnotateServer(*files, "--db", str(db), "--annotators-per-pair", "5", "--reference", "personafuse") as s:
            page.goto(s.url + "/")
            page.fill("#token", "alice")  # a name is not a token
            page.click("text=Start")
            page.wait_for_function("document.getElementById('loginerror').textContent.includes('token')", timeout=10_000)
            assert page.is_hidden("#task")
            page.fill("#token", token)
            page.click("text=Start")
            page.wait_for_selector("#task:not([hidden])")
            assert page.inner_text("#progress").startswith("alice:")
            first_prompt = page.inner_text("#prompt")
            a_text = page.inner_text("#resp_a")
            chosen = "personafuse" if "[personafuse]" in a_text else "baseline"
            page.check("input[name=preferred][value=A]")
            page.check("input[name=confidence][value='4']")
            page.check("input[name=usefulness][value=A]")
            page.check("input[name=social_presence][value=B]")
            page.screenshot(path=str(ARTIFACTS / "annotate.png"))
            page.click("#submit")
            try:
                page.wait_for_function(f"document.getElementById('prompt').textContent !== {json.dumps(first_prompt)}", timeout=10_000)
            except Exception:
                raise AssertionError(page.inner_text("#error") + " / " + page.inner_text("#progress")) from None
            assert "1 answered" in page.inner_text("#progress")

        # Restart (without the files: everything comes from the database) and sign in again
        # (a new port is a new origin: the browser's stored token is not shared).
        with AnnotateServer("--db", str(db)) as s:
            page.goto(s.url + "/")
            page.fill("#token", token)
            page.click("text=Start")
            page.wait_for_selector("#task:not([hidden])")
            assert "1 answered" in page.inner_text("#progress")
            assert page.inner_text("#prompt") != first_prompt  # the answered pair is not offered again
            assert httpx.get(s.url + "/api/summary").status_code == 401  # the running votes are the owner's
            summary = httpx.get(s.url + "/api/summary", headers=owner).json()
            assert summary["judgements"] == 1 and summary["annotators_per_pair"] == 5  # kept from the first run
        ctx.close()

    out = tmp_path / "export"
    subprocess.run(cli("annotate", "export", "--db", str(db), "--out", str(out), "--bootstrap", "200"), env=env(), check=True)
    rows = list(csv.DictReader((out / "win_rates.csv").read_text().splitlines()))
    overall = next(r for r in rows if r["task"] == "all" and r["criterion"] == "preferred")
    assert overall["system"] == "personafuse" and overall["opponent"] == "baseline" and overall["pairs"] == "1"
    assert float(overall["win_rate"]) == (1.0 if chosen == "personafuse" else 0.0)
    judg = list(csv.DictReader((out / "judgements.csv").read_text().splitlines()))
    assert len(judg) == 1 and judg[0]["annotator"] == "alice" and judg[0]["confidence"] == "4"
    assert judg[0]["preferred"] == chosen and judg[0]["usefulness"] == chosen
    assert judg[0]["social_presence"] == ("baseline" if chosen == "personafuse" else "personafuse")
