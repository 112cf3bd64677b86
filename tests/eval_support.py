"""Shared pieces for the evaluation tests: fixture paths, a real OpenAI-compatible HTTP server on
loopback, and a tiny randomly initialised causal LM saved to disk."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_BENCHDATA = FIXTURES / "benchdata"


def real_benchdata() -> Path | None:
    """``$PERSONAFUSE_BENCHDATA`` or ``../shared/benchdata`` next to the repository, if present."""
    env = os.environ.get("PERSONAFUSE_BENCHDATA")
    if env and Path(env).is_dir():
        return Path(env)
    p = Path(__file__).resolve().parents[1].parent / "shared" / "benchdata"
    return p if p.is_dir() else None


class ChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` (and ``/v1/completions``) server in a thread. ``reply(messages, body)``
    decides each answer (a string, or (string, extra fields)); every request body is kept in ``requests``."""

    def __init__(self, reply: Callable[[list[dict[str, Any]], dict[str, Any]], str]) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                server.requests.append(body)
                chat = self.path.endswith("/chat/completions")
                if not chat and not self.path.endswith("/completions"):
                    self.send_response(404)
                    self.end_headers()
                    return
                # A raw completion (RawPrompt) reaches the reply function as one user message.
                messages = body["messages"] if chat else [{"role": "user", "content": body["prompt"]}]
                text = server.reply(messages, body)
                extra: dict[str, Any] = {}
                if isinstance(text, tuple):  # (text, extra top-level fields), e.g. routing weights
                    text, extra = text
                choice = (
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    if chat
                    else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
                )
                payload = {
                    "id": f"cmpl-{len(server.requests)}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": 0,
                    "model": body.get("model", "test"),
                    "choices": [choice],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    **extra,
                }
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *a: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_tiny_llama(path: Path) -> Path:
    """A 2-layer random Llama with the embedded SmolLM2 tokenizer (chat template included)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from personafuse.embedded import resolve

    src = resolve("default")
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
