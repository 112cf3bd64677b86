"""Size and time bounds of the server (issue 22, section 6): the body cap, over-long prompts refused
before tokenising, tokenising off the event loop, the per-request deadline, clients that leave
(running or still queued), and the SIGTERM drain bound."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import build_tiny
from personafuse.serving import ServeConfig, create_app
from serve_support import LiveServer, SlowModel, metric

torch.set_num_threads(1)
CHAT = "/v1/chat/completions"


def code_count(url: str, code: int) -> float:
    return metric(httpx.get(url + "/metrics").text, "personafuse_requests_total", endpoint="chat_completions", code=code)


def wait_for(cond, what: str, limit_s: float = 30.0) -> None:
    """Poll ``cond`` until it holds (bounded: a liveness check, not a speed one)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def raw_post(port: int, body: dict | bytes) -> socket.socket:
    """Send a chat request on a plain socket (so the test decides when the client leaves)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {CHAT} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(60)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), rest


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def server(tiny):
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=16, max_prompt_tokens=40, default_max_tokens=4)
    with LiveServer(create_app(tiny, cfg)) as s:
        yield s


def test_body_cap(server):
    """A 20 MB body used to be read whole (and its text tokenised on the event loop): now 413 as
    soon as it passes the cap, whether its length is declared or it arrives chunked."""
    before = code_count(server.url, 413)
    big = json.dumps({"messages": [{"role": "user", "content": "hi " * 7_000_000}]}).encode()
    r = httpx.post(server.url + CHAT, content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"]["type"] == "invalid_request_error" and "1048576 bytes" in r.json()["error"]["message"]

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(300):
            yield b"hi " * 30_000
        yield b'"}]}'

    r = httpx.post(server.url + CHAT, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert code_count(server.url, 413) == before + 2
    assert health(server.url)["status"] == "ok"


def test_over_long_input_is_refused_before_tokenising(server):
    """40 tokens allowed: a 3,000-character conversation is refused by its length in characters
    (the bound is 32 characters a token), without tokenising it."""
    r = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "hi " * 1000}]}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "3000 characters" in err["message"] and "at most 1280" in err["message"]


def test_a_long_prompt_is_tokenised_off_the_event_loop(tiny):
    """While an 8 MB prompt is being tokenised, /health still answers (it used to wait for it)."""
    cfg = ServeConfig(model_name="tiny", max_prompt_tokens=10**7, max_tokens_limit=8)
    cfg.max_body_bytes = 64 << 20
    with LiveServer(create_app(tiny, cfg)) as s:
        sock = raw_post(s.port, {"messages": [{"role": "user", "content": "hello world " * 700_000}], "max_tokens": 1})
        # The server's tokenizer thread starts with the first prompt it tokenises.
        tokenising = lambda: any(t.name.startswith("personafuse-tokenize") for t in threading.enumerate())  # noqa: E731
        # (no such thread: the prompt is tokenised on the event loop, and the check below fails)
        with contextlib.suppress(AssertionError):
            wait_for(tokenising, "the tokenizer thread", 20)
        h = httpx.get(s.url + "/health", timeout=60)
        big_answered = bool(select.select([sock], [], [], 0)[0])
        status, body = read_response(sock)
        sock.close()
    assert h.status_code == 200
    assert not big_answered, "/health waited until the long prompt was tokenised"
    assert status == 400 and b"context" in body  # 700k tokens: refused after counting them


def test_deadline_ends_running_and_queued_requests(tmp_path):
    """Deadline 1 s. The running request (its prefill alone takes 2 s) and one queued behind it
    get 504 at their deadline; the queued one is never started, the running one stops decoding."""
    slow = SlowModel(step_s=0.05, prefill_s=2.0)
    cfg = ServeConfig(model_name="tiny", max_batch=1, batch_wait_ms=0, max_tokens_limit=100, max_prompt_tokens=20)
    cfg.request_timeout_s = 1.0
    with LiveServer(create_app(slow.model, cfg)) as s:
        results: dict[str, httpx.Response] = {}

        def post(name: str, text: str) -> None:
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 100, "temperature": 0}
            results[name] = httpx.post(s.url + CHAT, json=body, timeout=60)

        first = threading.Thread(target=post, args=("running", "i am so anxious"))
        first.start()
        wait_for(lambda: health(s.url)["running"] == 1, "the first request to run")
        second = threading.Thread(target=post, args=("queued", "write a poem about the sea"))
        second.start()
        first.join(60)
        second.join(60)
        wait_for(lambda: health(s.url)["running"] == 0, "the worker to stop")
    for name in ("running", "queued"):
        r = results[name]
        assert r.status_code == 504, (name, r.text)
        assert r.json()["error"]["type"] == "timeout_error" and "deadline of 1 s" in r.json()["error"]["message"]
    # the queued request never reached the model
    assert len(slow.prefilled) == 1 and "i am so anxious" in slow.prefilled[0]
    assert slow.forwards <= 2  # the running one stopped at its first step after the deadline


def test_deadline_ends_a_stream_with_an_error_event():
    slow = SlowModel(step_s=0.05)
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=100, max_prompt_tokens=20)
    cfg.request_timeout_s = 1.0
    with LiveServer(create_app(slow.model, cfg)) as s:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", s.url + CHAT, json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert code_count(s.url, 504) == 1
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 504 and err["type"] == "timeout_error"
    deltas = [json.loads(e) for e in events[:-2]]
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"  # it did stream before the deadline
    assert slow.forwards < 100


def test_a_client_that_leaves_frees_its_row():
    """A non-streaming client that disconnects used to keep its generation running to the end
    (counted as a 200); now its row ends at the next step and /metrics counts a 499."""
    slow = SlowModel(step_s=0.05)
    cfg = ServeConfig(model_name="tiny", max_batch=1, batch_wait_ms=0, max_tokens_limit=100, max_prompt_tokens=20)
    with LiveServer(create_app(slow.model, cfg)) as s:
        sock = raw_post(s.port, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100})
        wait_for(lambda: health(s.url)["running"] == 1, "the request to run")
        sock.close()
        wait_for(lambda: health(s.url)["running"] == 0, "the worker to drop the row")
        forwards = slow.forwards
        assert code_count(s.url, 499) == 1 and code_count(s.url, 200) == 0
        r = httpx.post(s.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # still serving
    assert forwards < 50  # 100 forwards had it run to its end


def test_a_streaming_client_that_leaves_frees_its_row():
    slow = SlowModel(step_s=0.05)
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=100, max_prompt_tokens=20)
    with LiveServer(create_app(slow.model, cfg)) as s:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", s.url + CHAT, json=body, timeout=60) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        wait_for(lambda: health(s.url)["running"] == 0, "the worker to drop the row")
        forwards = slow.forwards
        wait_for(lambda: code_count(s.url, 499) == 1, "the disconnect to be counted")
        assert code_count(s.url, 200) == 0
    assert forwards < 50


def test_a_queued_client_that_leaves_gives_up_its_slot():
    """A request still waiting whose client left used to keep its queue slot and be generated later."""
    slow = SlowModel(step_s=0.05)
    cfg = ServeConfig(model_name="tiny", max_batch=1, batch_wait_ms=0, max_tokens_limit=100, max_prompt_tokens=20)
    with LiveServer(create_app(slow.model, cfg)) as s:
        running = raw_post(s.port, {"messages": [{"role": "user", "content": "i am so anxious"}], "max_tokens": 60})
        wait_for(lambda: health(s.url)["running"] == 1, "the first request to run")
        queued = raw_post(s.port, {"messages": [{"role": "user", "content": "write a poem about the sea"}], "max_tokens": 5})
        wait_for(lambda: health(s.url)["queue_depth"] == 1, "the second request to queue")
        queued.close()
        wait_for(lambda: health(s.url)["queue_depth"] == 0, "the slot to be freed")
        assert health(s.url)["running"] == 1  # freed while the first request was still decoding
        status, body = read_response(running)
        running.close()
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 60
    assert len(slow.prefilled) == 1 and "i am so anxious" in slow.prefilled[0]  # not the poem


DRAIN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from serve_support import SlowModel
import personafuse.chat_cli as chat_cli
chat_cli.load_model = lambda spec, *placement: SlowModel(step_s=0.05).model  # the CLI, with the slow tiny model
from personafuse.cli import main
sys.argv = ["personafuse", "serve", "--port", "{port}", "--max-tokens-limit", "100", "--max-prompt-tokens", "20",
            "--batch-wait-ms", "300", "--drain-timeout", "1"]
main()
"""


def test_sigterm_drains_within_the_bound(tmp_path):
    """SIGTERM: the short request in flight finishes; the long ones (5 s) end with 503 at the
    1 s drain bound instead of holding the shutdown until they are done; the process exits."""
    import personafuse

    src = str(Path(personafuse.__file__).resolve().parents[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = DRAIN_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), port=port)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url, proc), "the server to start", 120)
        results: dict[str, object] = {}

        def post(name: str, n: int, stream: bool = False) -> None:
            body = {"messages": [{"role": "user", "content": f"hello {name}"}], "max_tokens": n, "stream": stream}
            if not stream:
                results[name] = httpx.post(url + CHAT, json=body, timeout=60)
                return
            with httpx.stream("POST", url + CHAT, json=body, timeout=60) as r:
                results[name] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=post, args=a) for a in (("short", 3), ("long", 100), ("streamed", 100, True))]
        for t in threads:
            t.start()
        wait_for(lambda: health(url)["running"] == 3, "the three requests to run together")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results["short"].status_code == 200 and results["short"].json()["usage"]["completion_tokens"] == 3
    assert results["long"].status_code == 503 and "shutting down" in results["long"].json()["error"]["message"]
    streamed = results["streamed"]
    assert streamed[-1] == "[DONE]" and json.loads(streamed[-2])["error"]["code"] == 503
    assert proc.returncode is not None


def _up(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "the server exited"
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
