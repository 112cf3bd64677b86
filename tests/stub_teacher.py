"""A local OpenAI-compatible chat server that plays a Persona-CoT teacher, for tests and benchmarks.

It answers ``POST /v1/chat/completions`` after a fixed latency with replies in the shapes our
prompts ask for (JSON cues, JSON traits, headed response, or the paper's single-reply layout), chosen
deterministically from the query so two runs produce identical data. Markers in the query text
trigger bad behaviour, to exercise the pipeline's error handling:

``[malformed]`` unparseable traits · ``[allzero]`` no poles · ``[bothpoles]`` high and low of one trait ·
``[unknown]`` a pole that does not exist · ``[empty]`` empty response · ``[truncated]`` cut at the limit ·
``[paper]`` traits and response in the paper's Table 2 / Table 9 layout · ``[norationale]`` no rationale · ``[slow]`` 4x latency ·
``[500xN]`` / ``[429xN]`` the first N attempts of each request fail with that status ·
``[down]`` always 500 · ``[blank]`` every reply has empty content (an endpoint fault, not the teacher's).

:class:`Faults` makes the whole endpoint misbehave the way hosted and self-served endpoints do
(rate limits with every ``Retry-After`` form, a used-up quota, outages, 200s that are not
completions, empty content, replies cut at the token limit, a server that trickles its reply);
which requests fail is a pure function of the request and its attempt number, so runs repeat.
Time comes from a :class:`personafuse.endpoint.Clock` shared with the client, so tests can run a
40 s outage or a 60 s ``Retry-After`` on a fast clock.

It lives in tests/ (a stand-in, not part of the library); tests import it as ``stub_teacher``.
Run it standalone: ``python tests/stub_teacher.py --port 8011 --latency 0.1``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from personafuse.data.prompts import pole_label
from personafuse.endpoint import SYSTEM_CLOCK, Clock
from personafuse.traits import TRAITS


@dataclass
class Faults:
    """Endpoint-wide misbehaviour. Shares are of attempts, drawn per (request, attempt)."""

    rate_limit: float | None = None  # requests per clock second (token bucket, burst of one second)
    retry_after: str | None = None  # Retry-After with each 429: seconds, a fraction, or "date+N" (an HTTP date N s ahead)
    retry_after_ms: str | None = None  # retry-after-ms header sent with each 429
    insufficient_quota: bool = False  # every request: 429 with error code insufficient_quota
    outage: tuple[float, float] | None = None  # clock seconds after start answering 503
    malformed: float = 0.0  # 200 with cut JSON, an HTML page or no choices
    empty: float = 0.0  # 200 with empty or null content
    length: float = 0.0  # the reply cut in half, finish_reason "length"
    trickle: float | None = None  # clock seconds between body bytes


@dataclass
class StubState:
    latency: float = 0.0
    requests: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Faults = field(default_factory=Faults)
    clock: Clock = SYSTEM_CLOCK
    t0: float | None = None
    tokens: float = 0.0
    last_refill: float = 0.0
    max_tokens_seen: list[int] = field(default_factory=list)
    in_flight: int = 0  # chat requests between arrival and reply
    max_in_flight: int = 0  # the most at once: what a client's concurrency cap really let through
    hold: threading.Event | None = None  # while given and not set, every reply waits (a test lines requests up)


def _draw(key: str, n: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the request, its attempt and the fault."""
    h = hashlib.sha256(f"{key}:{n}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _rate_limited(state: StubState) -> bool:
    rate = state.faults.rate_limit
    if rate is None:
        return False
    now = state.clock.monotonic()
    state.tokens = min(max(rate, 1.0), state.tokens + (now - state.last_refill) * rate)
    state.last_refill = now
    if state.tokens >= 1:
        state.tokens -= 1
        return False
    return True


_MALFORMED = (b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assi',
              b"<html><body><h1>502 Bad Gateway</h1></body></html>",
              b'{"id": "x", "object": "chat.completion", "choices": []}',
              b'{"object": "error", "message": "upstream busy"}')


_NULL = "\x00null"  # stands for JSON null content


def _faulty_body(state: StubState, key: str, n: int, text: str, finish: str) -> tuple[bytes | None, str, str]:
    """A broken body (bytes) to send instead of the completion, or the (possibly cut) text."""
    f = state.faults
    if f.malformed and _draw(key, n, "malformed") < f.malformed:
        return _MALFORMED[int(_draw(key, n, "kind") * len(_MALFORMED))], text, finish
    if f.empty and _draw(key, n, "empty") < f.empty:
        return None, "" if _draw(key, n, "kind") < 0.5 else _NULL, "stop"
    if f.length and _draw(key, n, "length") < f.length:
        return None, text[: len(text) // 2], "length"
    return None, text, finish


def _query_of(messages: list[dict[str, str]]) -> str:
    user = next((m["content"] for m in messages if m.get("role") == "user"), "")
    m = re.search(r"Message:\n(.*?)(?:\n\nSocial cue:|$)", user, re.S)
    return (m.group(1) if m else user).strip()


def poles_for(query: str) -> tuple[list[str], list[str]]:
    h = hashlib.sha256(query.encode()).digest()
    traits = list(TRAITS)
    t1, t2 = traits[h[0] % 5], traits[(h[0] % 5 + 1 + h[1] % 4) % 5]
    social = [f"{'high' if h[2] % 2 else 'low'}_{t1}"]
    task = [f"{'high' if h[3] % 2 else 'low'}_{t2}"]
    return social, task


def reply_for(messages: list[dict[str, str]]) -> tuple[str, str]:
    """``(text, finish_reason)`` for one request (pure function of the messages)."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    q = _query_of(messages)
    social, task = poles_for(q)
    if '"social_cue"' in system:
        return json.dumps({"social_cue": f"The person writes about: {q[:60]}. They want to be taken seriously.",
                           "task_cue": "A clear, well organised answer that addresses the request."}), "stop"
    if '"social": [' in system:
        if "[malformed]" in q:
            return "Sure! I think the assistant should be nice and helpful here :)", "stop"
        if "[allzero]" in q:
            return '{"social": [], "task": []}', "stop"
        if "[unknown]" in q:
            return '{"social": [{"pole": "High Happiness", "reason": "cheerful"}], "task": []}', "stop"
        if "[bothpoles]" in q:
            return ('{"social": [{"pole": "High Extraversion", "reason": "a"}], '
                    '"task": [{"pole": "Low Extraversion", "reason": "b"}]}'), "stop"
        if "[paper]" in q:
            return ("Based on social cue:\n" + "".join(f"• {pole_label(p)}: (fits the tone)\n" for p in social)
                    + "The message shows feelings that call for this.\nBased on task cue:\n"
                    + "".join(f"• {pole_label(p)}: (fits the task)\n" for p in task)), "stop"
        body = {"social": [{"pole": pole_label(p), "reason": "fits the tone"} for p in social],
                "task": [{"pole": pole_label(p), "reason": "fits the task"} for p in task]}
        return "```json\n" + json.dumps(body) + "\n```", "stop"
    if "## Analysis" in system:
        if "[empty]" in q:
            return "## Analysis\nThinking.\n## Response\n\n## Rationale\nNone.", "stop"
        if "[truncated]" in q:
            return "## Analysis\nThe person needs help.\n## Response\nHere is the beginning of an answer that", "length"
        if "[norationale]" in q:
            return f"## Analysis\nBrief.\n## Response\nAn answer without a rationale to: {q}", "stop"
        head = "##Response:" if "[paper]" in q else "## Response"
        rat = "##Persona Behavior Rationale:" if "[paper]" in q else "## Rationale"
        return (f"## Analysis\nSocial cue read; task cue read; traits planned.\n{head}\n"
                f"Thanks for asking about this. Here is a considered answer to: {q}\n{rat}\n"
                f"The reply shows {', '.join(pole_label(p) for p in social + task)}."), "stop"
    if "Social Cue:" in system and "Based on social cue" in system:  # single call
        return (f"Social Cue: The person sounds earnest.\nTask Cue: They need a clear answer.\n"
                f"Based on social cue:\n- {pole_label(social[0])}: tone\nBased on task cue:\n- {pole_label(task[0])}: task\n"
                f"##Response:\n{'' if '[empty]' in q else 'A single-call answer to: ' + q}\n##Persona Behavior Rationale:\nIt uses the traits."), "stop"
    if "[empty]" in q:
        return "...", "stop"
    return f"Plain answer to: {q}", "stop"


def make_app(state: StubState) -> Callable[..., Any]:
    """A bare ASGI app (no framework) so the stub adds as little overhead as possible."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break

        async def respond(status: int, payload: dict[str, Any] | bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
            state.statuses[status] += 1
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), *headers]})
            if state.faults.trickle is not None:
                await _trickle(state, data, receive, send)
                return
            await send({"type": "http.response.body", "body": data})

        if scope["path"].rstrip("/") != "/v1/chat/completions" or scope["method"] != "POST":
            await respond(404, {"error": {"message": "not found"}})
            return
        state.requests += 1
        if state.t0 is None:
            state.t0 = state.last_refill = state.clock.monotonic()
            state.tokens = max(state.faults.rate_limit or 0.0, 1.0)  # a full bucket (one second of requests)
        req = json.loads(body)
        messages = req["messages"]
        state.max_tokens_seen.append(int(req.get("max_tokens") or 0))
        q = _query_of(messages)
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        state.attempts[key] += 1
        n = state.attempts[key]
        if (early := _endpoint_fault(state)) is not None:
            await respond(*early)
            return
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(state.latency * (4 if "[slow]" in q else 1))
            while state.hold is not None and not state.hold.is_set():
                await asyncio.sleep(0.005)
        finally:
            state.in_flight -= 1
        if "[down]" in q:
            await respond(500, {"error": {"message": "teacher is down"}})
            return
        for code in (500, 429):
            m = re.search(rf"\[{code}x(\d+)\]", q)
            if m and n <= int(m.group(1)):
                await respond(code, {"error": {"message": f"stub {code}"}}, [(b"retry-after", b"0")] if code == 429 else [])
                return
        text, finish = reply_for(messages)
        broken, text, finish = _faulty_body(state, key, n, text, finish)
        if broken is not None:
            await respond(200, broken)
            return
        content: str | None = "" if "[blank]" in q else text
        await respond(200, {
            "id": f"stub-{state.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model", "stub"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None if content == _NULL else content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        })

    return app


def _endpoint_fault(state: StubState) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]] | None:
    """A quota, outage or rate-limit reply that comes before any work, or ``None``."""
    f = state.faults
    if f.insufficient_quota:
        return 429, {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                               "type": "insufficient_quota", "code": "insufficient_quota"}}, []
    assert state.t0 is not None
    if f.outage and f.outage[0] <= state.clock.monotonic() - state.t0 < f.outage[1]:
        return 503, {"error": {"message": "service unavailable"}}, []
    if _rate_limited(state):
        headers = []
        if f.retry_after is not None:
            value = f.retry_after
            if value.startswith("date+"):  # an HTTP date that many seconds ahead on the shared clock,
                # rounded up as a server must: HTTP dates have whole seconds, and one truncated down
                # would send the client back before the bucket refills (a second 429 in ~5% of runs)
                value = email.utils.formatdate(math.ceil(state.clock.time() + float(value[5:])), usegmt=True)
            headers.append((b"retry-after", value.encode()))
        if f.retry_after_ms is not None:
            headers.append((b"retry-after-ms", f.retry_after_ms.encode()))
        return 429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, headers
    return None


async def _trickle(state: StubState, data: bytes, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Send the body one byte at a time until done or the client hangs up."""
    gone = asyncio.ensure_future(receive())  # completes with http.disconnect when the client leaves
    try:
        for i in range(len(data)):
            if gone.done():
                return
            await send({"type": "http.response.body", "body": data[i:i + 1], "more_body": i + 1 < len(data)})
            await state.clock.sleep(state.faults.trickle or 0.0)
    finally:
        gone.cancel()


class StubServer:
    """Runs the stub with uvicorn in a background thread on a free loopback port."""

    def __init__(self, latency: float = 0.0, port: int = 0, *, faults: Faults | None = None, clock: Clock | None = None):
        import uvicorn

        self.state = StubState(latency=latency, faults=faults or Faults(), clock=clock or SYSTEM_CLOCK)
        self.config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=port, log_level="warning",
                                     lifespan="on", backlog=2048, timeout_keep_alive=30)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds per request")
    a = ap.parse_args()
    import uvicorn

    uvicorn.run(make_app(StubState(latency=a.latency)), host="127.0.0.1", port=a.port, log_level="warning",
                backlog=2048)


if __name__ == "__main__":
    main()
