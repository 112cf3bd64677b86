"""The server's Prometheus metrics, kept by ``prometheus_client`` in one registry per server.

The names, types, labels and buckets are those the hand-written exposition had before issue 33
(tests/golden/metrics.json holds them); ``_created`` series are off, as they were absent then.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# One process-wide switch in the library: vLLM's own metrics set it too.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_S = 10.0  # the tokens/s gauge counts the tokens of the last this-many seconds
PREFIX = "personafuse"
CONTENT_TYPE = "text/plain; version=0.0.4"  # what generate_latest writes


class _Gauges(Collector):
    """The live gauges (``Metrics.gauges``: name -> reader), read at each scrape; the batcher adds
    its queue depth and running count after the server builds the metrics."""

    def __init__(self, gauges: dict[str, Callable[[], float]]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, fn in list(self.gauges.items()):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", f"{name.replace('_', ' ')}, read at scrape time.", value=fn())


class Metrics:
    """Counters and histograms for the server; ``queue_depth``/``running`` are read live."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        p, reg = PREFIX, self.registry
        self._requests = Counter(f"{p}_requests", "Chat completion requests by endpoint and HTTP status.", ["endpoint", "code"], registry=reg)
        self._prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens processed.", registry=reg)
        self._completion_tokens = Counter(f"{p}_completion_tokens", "Tokens generated.", registry=reg)
        self._batches = Counter(f"{p}_batches", "Batched forward runs (one prefill + decode loop each).", registry=reg)
        self._latency = Histogram(f"{p}_request_latency_seconds", "Time from arrival to the last token.", buckets=LATENCY_BUCKETS, registry=reg)
        self._first_token = Histogram(f"{p}_time_to_first_token_seconds", "Time from arrival to the first text.", buckets=LATENCY_BUCKETS, registry=reg)
        self._batch_size = Histogram(f"{p}_batch_size", "Requests decoded together in one batch (run-to-completion scheduler).", buckets=BATCH_BUCKETS, registry=reg)
        self._queue_wait = Histogram(f"{p}_queue_wait_seconds", "Time from arrival until the scheduler takes the request.", buckets=LATENCY_BUCKETS, registry=reg)
        self._inter_token = Histogram(f"{p}_inter_token_latency_seconds", "Time between two text deltas of one request.", buckets=TOKEN_BUCKETS, registry=reg)
        self._step_rows = Histogram(f"{p}_step_batch_size", "Rows in the running batch at each decoding step.", buckets=BATCH_BUCKETS, registry=reg)
        self._generated = Counter(f"{p}_generated_tokens", "Tokens sampled by decoding steps (end tokens included).", registry=reg)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.gauges: dict[str, Callable[[], float]] = {"tokens_per_second": self.tokens_per_second}
        reg.register(_Gauges(self.gauges))

    def request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, code=str(status)).inc()

    def tokens(self, prompt: int, completion: int) -> None:
        self._prompt_tokens.inc(prompt)
        self._completion_tokens.inc(completion)

    def observe_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self._first_token.observe(seconds)

    def observe_batch(self, size: int) -> None:
        self._batches.inc()
        self._batch_size.observe(size)

    def observe_queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self._inter_token.observe(seconds)

    def observe_step(self, rows: int) -> None:
        self._step_rows.observe(rows)

    def generated(self, tokens: int) -> None:
        """Tokens one decoding step made (for the generated-tokens counter and the tokens/s gauge)."""
        self._generated.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        # a moving window over the last RATE_WINDOW_S seconds: the library's gauges hold a value, not a rate
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of this server's metrics."""
        return generate_latest(self.registry).decode("utf-8")
