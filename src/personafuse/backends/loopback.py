"""The other side of the openai backend, for tests and benchmarks: an OpenAI-compatible
``/v1/chat/completions`` and ``/v1/completions`` server on loopback (127.0.0.1, a free port) in a
thread, whose replies come from a function. The evaluation tests' scripted subjects and judges and
the stand-in judge of ``benchmarks/standins.py`` are this server (the Persona-CoT teacher with
fault injection is ``tests/stub_teacher.py``, a test stand-in outside the package)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# reply(messages, body) -> text, or (text, extra top-level fields of the response)
ReplyFn = Callable[[list[dict[str, Any]], dict[str, Any]], "str | tuple[str, dict[str, Any]]"]


class ChatServer:
    """``reply(messages, body)`` decides each answer (a string, or (string, extra fields)); every
    request body is kept in ``requests``. A raw completion reaches ``reply`` as one user message."""

    def __init__(self, reply: ReplyFn) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
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


def _payload(server: ChatServer, body: dict[str, Any], chat: bool) -> dict[str, Any]:
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
    return {
        "id": f"cmpl-{len(server.requests)}",
        "object": "chat.completion" if chat else "text_completion",
        "created": 0,
        "model": body.get("model", "test"),
        "choices": [choice],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        **extra,
    }


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
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
            data = json.dumps(_payload(server, body, chat)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
