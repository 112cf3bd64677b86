"""Regenerate docs/images/chat.png and annotate.png (headless Debian chromium via Playwright).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python docs/images/make_screenshots.py [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start(args: list[str], probe: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "personafuse.cli", *args, "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + probe, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(f"{tmp}/profile", executable_path="/usr/bin/chromium",
                                                    headless=True, args=ARGS, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        proc, url = start(["serve", "--model", args.model, "--threads", "2"], "/health")
        try:
            page.goto(url + "/")
            page.fill("#maxtokens", "48")
            page.fill("#temperature", "0")
            for i, msg in enumerate(["I've been so anxious I can't sleep. My exam is tomorrow.", "What is 12 times 7?"]):
                page.fill("#input", msg)
                page.click("#send")
                page.wait_for_selector(f".msg.assistant.done >> nth={i}", timeout=300_000)
            page.screenshot(path=str(HERE / "chat.png"))
        finally:
            proc.terminate()
            proc.wait(60)

        prompt = "I failed my driving test for the second time and I feel useless."
        replies = {
            "personafuse": "That sounds really discouraging, and it makes sense to feel low after a second try. "
            "Failing a test twice says nothing about your worth; many good drivers needed three or four attempts. "
            "Which part went wrong this time? We could plan a few focused lessons around it.",
            "baseline": "Driving tests are hard. Practise more and book another test. Most people pass eventually.",
        }
        for name, text in replies.items():
            Path(tmp, f"{name}.jsonl").write_text(json.dumps({"id": "e1", "prompt": prompt, "task": "emotion", "response": text}) + "\n")
        # participants sign in with a token the study owner issued
        minted = subprocess.run([sys.executable, "-m", "personafuse.cli", "annotate", "tokens", "participant-07", "--db",
                                 f"{tmp}/a.sqlite"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                                capture_output=True, text=True)
        token = minted.stdout.split()[1]
        proc, url = start(["annotate", "serve", f"{tmp}/personafuse.jsonl", f"{tmp}/baseline.jsonl", "--db", f"{tmp}/a.sqlite"],
                          "/api/summary")
        try:
            page.set_viewport_size({"width": 1200, "height": 760})
            page.goto(url + "/")
            page.fill("#token", token)
            page.click("text=Start")
            page.wait_for_selector("#task:not([hidden])")
            page.screenshot(path=str(HERE / "annotate.png"))
        finally:
            proc.terminate()
            proc.wait(60)
        ctx.close()


if __name__ == "__main__":
    main()
