"""One retry and deadline policy for every OpenAI-compatible HTTP call, made through the openai
backend (:class:`personafuse.backends.openai_compat.OpenAIBackend`) by data teachers, benchmark
subjects and LLM judges alike.

What runs, per request (one logical call, e.g. one chat completion):

* every attempt has **one deadline** from send to last byte (``timeout``): a server that trickles
  its reply cannot hold a request longer than that, whatever its per-read timing;
* **429** waits ``Retry-After`` (seconds, fractions, ``retry-after-ms`` or an HTTP date) plus a random
  share on top, so workers told "1 s" do not come back in lockstep; without a hint it waits
  ``backoff`` doubling. These waits come out of their own cumulative budget
  (``max_rate_limit_wait`` seconds per request), never out of ``max_retries``. A 429 whose error
  code is ``insufficient_quota`` is not a rate limit and stops the caller at once;
* **5xx, 408/409/425, timeouts, dropped connections**, and a **200 that is not a completion** (cut
  JSON, an HTML page, no ``choices``) or (where asked) has **empty content** are retried up to
  ``max_retries`` times with jittered exponential backoff;
* **401/403/404** raise :class:`EndpointFatal` (bad key, wrong URL or model); other 4xx fail the
  request at once.

A request that fails for good raises :class:`EndpointFailure` whose ``cause`` is one of
``endpoint_status``, ``endpoint_timeout``, ``endpoint_malformed``, ``endpoint_empty`` (the data
pipeline's reject reasons). Counters go to :class:`EndpointStats`. Time (waits, deadlines, the
wall clock for Retry-After dates) comes from a :class:`Clock`, so tests run a 60 s Retry-After or
a 40 s outage on a virtual clock (``tests/virtual_clock.py``).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

ENDPOINT_STATUS = "endpoint_status"
ENDPOINT_TIMEOUT = "endpoint_timeout"
ENDPOINT_MALFORMED = "endpoint_malformed"
ENDPOINT_EMPTY = "endpoint_empty"
ENDPOINT_REASONS: tuple[str, ...] = (ENDPOINT_STATUS, ENDPOINT_TIMEOUT, ENDPOINT_MALFORMED, ENDPOINT_EMPTY)

RETRY_STATUS = frozenset({408, 409, 425, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class EndpointFatal(RuntimeError):
    """The endpoint cannot serve this run at all (bad key, wrong URL/model, quota used up);
    ``status`` is the HTTP status that said so."""

    def __init__(self, detail: str, status: int | None = None):
        super().__init__(detail)
        self.status = status


class EndpointFailure(RuntimeError):
    """One request failed for good; ``cause`` is one of :data:`ENDPOINT_REASONS`."""

    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


# ------------------------------------------------------------------------------------------ clocks


class Clock:
    """Real time. ``deadline`` bounds a block (send to last byte) in this clock's seconds."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:  # wall clock, for Retry-After HTTP dates
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def deadline(self, seconds: float) -> AbstractAsyncContextManager[Any]:
        return asyncio.timeout(seconds)


SYSTEM_CLOCK = Clock()


# ------------------------------------------------------------------------------------------ policy


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (delay seconds, fractions
    included, or an HTTP date relative to ``now``); ``None`` when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            v = float(ms) / 1000
            if math.isfinite(v):
                return max(0.0, v)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    ra = ra.strip()
    try:
        v = float(ra)
        return max(0.0, v) if math.isfinite(v) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5  # re-sends after errors other than 429
    backoff: float = 1.0  # first error delay; doubles per retry; also the floor of a 429 wait
    backoff_max: float = 30.0  # cap of one error delay (and of a 5xx Retry-After)
    max_rate_limit_wait: float = 600.0  # cumulative 429 waiting per request
    timeout: float = 300.0  # one attempt, send to last byte
    jitter: float = 0.5  # a 429 wait is its base times U(1, 1 + jitter)

    def error_delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Jittered exponential backoff (``attempt`` from 0); a server hint raises it, never lowers."""
        delay = min(self.backoff_max, self.backoff * 2**attempt) * rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(self.backoff_max, retry_after) * rng.uniform(1.0, 1.0 + self.jitter))
        return delay

    def rate_limit_delay(self, n429: int, retry_after: float | None, rng: random.Random) -> float:
        """Never sooner than the server asked, never sooner than ``backoff`` (a ``Retry-After: 0``
        would otherwise turn every worker into a busy loop), with a random share on top so workers
        told the same number spread out."""
        base = self.backoff * 2 ** min(n429, 16) if retry_after is None else retry_after
        base = max(base, self.backoff)
        if retry_after is None:
            base = min(base, self.backoff_max)
        return base * rng.uniform(1.0, 1.0 + self.jitter)


@dataclass
class EndpointStats:
    """What the endpoint did: shown in progress bars, summaries and ``run.json``."""

    requests: int = 0  # HTTP attempts sent
    retries: int = 0  # attempts that were re-sends
    http_status: Counter[int] = field(default_factory=Counter)
    rate_limit_wait_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "http_status": {str(k): v for k, v in sorted(self.http_status.items())},
            "rate_limit_wait_s": round(self.rate_limit_wait_s, 3),
        }


# ------------------------------------------------------------------------------------ reply checks


def chat_reply(data: Any, *, require_content: bool = True) -> tuple[str, str, dict[str, Any]]:
    """``(content, finish_reason, choice)`` of a chat completion body, or :class:`EndpointFailure`
    (``endpoint_malformed`` for anything that is not a completion; ``endpoint_empty`` for empty
    or null content when ``require_content``)."""
    ch = _first_choice(data)
    msg = ch.get("message")
    if not isinstance(msg, dict):
        raise EndpointFailure(ENDPOINT_MALFORMED, "reply choice has no message")
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        raise EndpointFailure(ENDPOINT_MALFORMED, f"message content is {type(content).__name__}, not text")
    if require_content and not (content or "").strip():
        raise EndpointFailure(ENDPOINT_EMPTY, "reply content is empty" if content is not None else "reply content is null")
    return content or "", str(ch.get("finish_reason") or "stop"), ch


def completion_reply(data: Any, *, require_content: bool = True) -> tuple[str, str, dict[str, Any]]:
    """The same for the (raw-prompt) completions endpoint, whose choices carry ``text``."""
    ch = _first_choice(data)
    text = ch.get("text")
    if text is not None and not isinstance(text, str):
        raise EndpointFailure(ENDPOINT_MALFORMED, f"choice text is {type(text).__name__}, not text")
    if require_content and not (text or "").strip():
        raise EndpointFailure(ENDPOINT_EMPTY, "reply text is empty")
    return text or "", str(ch.get("finish_reason") or "stop"), ch


def _first_choice(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise EndpointFailure(ENDPOINT_MALFORMED, f"reply body is a JSON {type(data).__name__}, not a completion")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        what = "no choices" if isinstance(choices, list) else "no 'choices' field"
        raise EndpointFailure(ENDPOINT_MALFORMED, f"reply has {what}")
    if not isinstance(choices[0], dict):
        raise EndpointFailure(ENDPOINT_MALFORMED, "reply choice is not an object")
    return choices[0]


def _error_of(body: bytes) -> tuple[str, str]:
    """``(code, message)`` of an OpenAI-style error body, best effort."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return "", body[:200].decode("utf-8", "replace")
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("code") or err.get("type") or ""), str(err.get("message") or "")[:300]
    if isinstance(err, str):
        return "", err[:300]
    return "", str(data)[:200]


# ------------------------------------------------------------------------------------------ client


def http_module() -> Any:
    """``httpx2`` (the transport the openai package ships with: about twice the requests per
    second of ``httpx`` at 32 in flight on loopback), else ``httpx``; same API."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        pass
    try:
        import httpx

        return httpx
    except ImportError:  # pragma: no cover - comes with the data and eval extras
        raise EndpointFatal("HTTP endpoints need httpx2 or httpx: pip install 'personafuse[data]'") from None


class EndpointClient:
    """An OpenAI-compatible endpoint behind :class:`RetryPolicy`, at most ``max_in_flight``
    attempts in flight (waits between attempts hold no slot). One client per event loop: a
    caller that runs several loops (a sync subject) calls :meth:`aclose` at the end of each."""

    def __init__(self, base_url: str | None, api_key: str | None, *, policy: RetryPolicy | None = None,
                 clock: Clock | None = None, max_in_flight: int = 32, seed: int | None = None,
                 name: str = "endpoint"):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key
        self.policy = policy or RetryPolicy()
        self.clock = clock or SYSTEM_CLOCK
        self.max_in_flight = max_in_flight
        self.name = name
        self.stats = EndpointStats()
        self.rng = random.Random(seed)
        self._http: Any = None
        self._sem: asyncio.Semaphore | None = None

    def _session(self) -> tuple[Any, asyncio.Semaphore]:
        if self._http is None or self._sem is None:
            httpx = http_module()
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            # No client timeouts: the deadline in _attempt bounds the whole attempt instead. The
            # semaphore caps requests in flight; the pool is not capped as well, so an attempt
            # never spends its deadline waiting for a connection.
            self._http = httpx.AsyncClient(headers=headers, timeout=None, limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=max(100, self.max_in_flight)))
            self._sem = asyncio.Semaphore(self.max_in_flight)
        return self._http, self._sem

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http, self._sem = None, None

    async def post(self, path: str, body: dict[str, Any], check: Callable[[Any], Any]) -> Any:
        """POST ``body`` to ``base_url + path`` until ``check(json)`` accepts a reply (its value is
        returned) or the policy gives up (:class:`EndpointFailure`, :class:`EndpointFatal`)."""
        url = self.base_url + path
        p = self.policy
        errors = 0
        n429 = 0
        waited = 0.0
        while True:
            self.stats.requests += 1
            status, headers, raw, fail = await self._attempt(url, body)
            if status == 429:
                code, msg = _error_of(raw)
                if code == "insufficient_quota":
                    raise EndpointFatal(f"{self.name} at {self.base_url}: HTTP 429 insufficient_quota: {msg}", 429)
                ra = parse_retry_after(headers, self.clock.time())
                wait = p.rate_limit_delay(n429, ra, self.rng)
                if waited + wait > p.max_rate_limit_wait:
                    raise EndpointFailure(ENDPOINT_STATUS, f"HTTP 429: still rate-limited after {waited:.0f} s of "
                                          f"waiting (budget {p.max_rate_limit_wait:g} s per request): {msg}")
                n429 += 1
                waited += wait
                self.stats.retries += 1
                self.stats.rate_limit_wait_s += wait
                await self.clock.sleep(wait)
                continue
            ra = None
            if fail is None and status is not None:
                fail, ra = self._classify(status, headers, raw, check)
                if isinstance(fail, _Accepted):
                    return fail.value
            assert fail is not None
            if errors >= p.max_retries:
                n = errors + n429 + 1
                raise EndpointFailure(fail.cause, f"gave up after {n} attempt{'s' * (n > 1)}: {fail.detail}")
            self.stats.retries += 1
            await self.clock.sleep(p.error_delay(errors, ra, self.rng))
            errors += 1

    async def _attempt(self, url: str, body: dict[str, Any]) -> tuple[int | None, Mapping[str, str], bytes, EndpointFailure | None]:
        httpx = http_module()
        http, sem = self._session()
        async with sem:
            try:
                async with self.clock.deadline(self.policy.timeout):
                    r = await http.post(url, json=body)
            except TimeoutError:
                return None, {}, b"", EndpointFailure(
                    ENDPOINT_TIMEOUT, f"no complete reply within --timeout {self.policy.timeout:g} s")
            except httpx.TransportError as e:
                return None, {}, b"", EndpointFailure(ENDPOINT_TIMEOUT, f"connection failed: {type(e).__name__}: {e}"[:300])
        self.stats.http_status[r.status_code] += 1
        return r.status_code, r.headers, r.content, None

    def _classify(self, status: int, headers: Mapping[str, str], raw: bytes,
               check: Callable[[Any], Any]) -> tuple[EndpointFailure | _Accepted, float | None]:
        """A non-429 reply: accepted, retryable (with any Retry-After), or raised at once."""
        import json

        if status >= 400 or status < 200:
            code, msg = _error_of(raw)
            detail = f"HTTP {status}{' ' + code if code else ''}: {msg}"[:300]
            if status in FATAL_STATUS:
                raise EndpointFatal(f"{self.name} at {self.base_url}: {detail}", status)
            fail = EndpointFailure(ENDPOINT_STATUS, detail)
            if status in RETRY_STATUS or status >= 500:
                return fail, parse_retry_after(headers, self.clock.time())
            raise fail
        try:
            data = json.loads(raw)
        except ValueError:
            head = raw[:60].decode("utf-8", "replace")
            return EndpointFailure(ENDPOINT_MALFORMED, f"HTTP {status} body is not JSON: {head!r}"), None
        try:
            return _Accepted(check(data)), None
        except EndpointFailure as f:
            return f, None


@dataclass
class _Accepted:
    value: Any


def run_sync(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())  # type: ignore[arg-type]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(make())).result()  # type: ignore[arg-type]
