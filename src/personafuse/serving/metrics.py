"""Prometheus text-format metrics, kept in-process (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


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
        self.gauges: dict[str, Callable[[], float]] = {}

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
                f"# HELP {p}_batch_size Requests decoded together in one batch.",
                f"# TYPE {p}_batch_size histogram",
                *self.batch_size.lines(f"{p}_batch_size"),
            ]
        for name, fn in self.gauges.items():
            lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {fn():g}"]
        return "\n".join(lines) + "\n"
