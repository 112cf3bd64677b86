"""Prometheus text-format metrics, kept in-process (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_S = 10.0  # the tokens/s gauge counts the tokens of the last this-many seconds


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters and histograms for the server; ``queue_depth``/``running`` are read live."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.batches = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.inter_token = Histogram(TOKEN_BUCKETS)
        self.step_rows = Histogram(BATCH_BUCKETS)
        self.generated_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.gauges: dict[str, Callable[[], float]] = {"tokens_per_second": self.tokens_per_second}

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_size.observe(size)

    def observe_queue_wait(self, seconds: float) -> None:
        with self._lock:
            self.queue_wait.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        with self._lock:
            self.inter_token.observe(seconds)

    def observe_step(self, rows: int) -> None:
        with self._lock:
            self.step_rows.observe(rows)

    def generated(self, tokens: int) -> None:
        """Tokens one decoding step made (for the generated-tokens counter and the tokens/s gauge)."""
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    def render(self) -> str:
        p = "personafuse"
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total Chat completion requests by endpoint and HTTP status.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (ep, code), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{ep}",code="{code}"}} {n}')
            lines += [
                f"# HELP {p}_prompt_tokens_total Prompt tokens processed.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_completion_tokens_total Tokens generated.",
                f"# TYPE {p}_completion_tokens_total counter",
                f"{p}_completion_tokens_total {self.completion_tokens}",
                f"# HELP {p}_batches_total Batched forward runs (one prefill + decode loop each).",
                f"# TYPE {p}_batches_total counter",
                f"{p}_batches_total {self.batches}",
                f"# HELP {p}_request_latency_seconds Time from arrival to the last token.",
                f"# TYPE {p}_request_latency_seconds histogram",
                *self.latency.lines(f"{p}_request_latency_seconds"),
                f"# HELP {p}_time_to_first_token_seconds Time from arrival to the first text.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.first_token.lines(f"{p}_time_to_first_token_seconds"),
                f"# HELP {p}_batch_size Requests decoded together in one batch (run-to-completion scheduler).",
                f"# TYPE {p}_batch_size histogram",
                *self.batch_size.lines(f"{p}_batch_size"),
                f"# HELP {p}_queue_wait_seconds Time from arrival until the scheduler takes the request.",
                f"# TYPE {p}_queue_wait_seconds histogram",
                *self.queue_wait.lines(f"{p}_queue_wait_seconds"),
                f"# HELP {p}_inter_token_latency_seconds Time between two text deltas of one request.",
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.inter_token.lines(f"{p}_inter_token_latency_seconds"),
                f"# HELP {p}_step_batch_size Rows in the running batch at each decoding step.",
                f"# TYPE {p}_step_batch_size histogram",
                *self.step_rows.lines(f"{p}_step_batch_size"),
                f"# HELP {p}_generated_tokens_total Tokens sampled by decoding steps (end tokens included).",
                f"# TYPE {p}_generated_tokens_total counter",
                f"{p}_generated_tokens_total {self.generated_tokens}",
            ]
        for name, fn in self.gauges.items():
            lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {fn():g}"]
        return "\n".join(lines) + "\n"
