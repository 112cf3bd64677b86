"""Helpers for the serving tests: a real uvicorn server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

import uvicorn


class LiveServer:
    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class SlowModel:
    """The tiny test model made slow and talkative, to test what happens while a request runs:
    every forward sleeps (``prefill_s`` for a prompt, ``step_s`` for one decode step) and the end
    token is never chosen, so a reply lasts exactly ``max_tokens`` steps. It records the prompts it
    prefilled and counts its forwards."""

    def __init__(self, step_s: float = 0.05, prefill_s: float = 0.0) -> None:
        from conftest import build_tiny

        self.model = build_tiny()
        self.step_s, self.prefill_s = step_s, prefill_s
        self.prefilled: list[str] = []
        self.forwards = 0
        self.eos = self.model.tokenizer.eos_token_id
        self.model.base_model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, _args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        ids = kwargs.get("input_ids")
        prefill = ids is not None and ids.shape[1] > 1
        if prefill:
            self.prefilled += [self.model.tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
        self.forwards += 1
        time.sleep(self.prefill_s if prefill else self.step_s)
        out.logits[..., self.eos] = float("-inf")
        return out


def metric(text: str, sample: str, **labels: object) -> float:
    """One sample's value in a ``/metrics`` text (0 when absent), read with prometheus_client's own
    parser; ``le`` compares as a number ("1" and "1.0" are one bucket bound)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {k: str(v) for k, v in labels.items()}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            got = dict(s.labels)
            if "le" in want and "le" in got and float(got["le"]) == float(want["le"]):
                got["le"] = want["le"]
            if s.name == sample and got == want:
                return float(s.value)
    return 0.0
