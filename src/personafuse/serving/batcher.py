"""Request queue and micro-batching.

Requests wait in one bounded queue. A single worker thread owns the model: it takes the first
waiting request, waits up to ``batch_wait_s`` for more (up to ``max_batch``), routes them in one
router call and decodes them as one batch, each row with its own ten mixture weights (the mixture
layer applies per-row weights in the same forward). Results go back to each request's asyncio
queue as they appear.

Back-pressure (documented in docs/serving.md):
* :class:`QueueFull` → HTTP 429: ``max_queue`` requests are already waiting; retry later.
* :class:`Unavailable` → HTTP 503: the server is shutting down, or the model worker has died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from personafuse.moe.routing import Routing
from personafuse.serving.decode import BatchDecode, RowSpec
from personafuse.serving.metrics import Metrics
from personafuse.traits import NUM_POLES, weights_dict

log = logging.getLogger("personafuse.serving")

# What a client is told when generation fails inside the server: the detail (exception text) goes
# to the server log only.
GENERATION_FAILED = "generation failed inside the server (the details are in the server log)"


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass
class Job:
    messages: list[dict[str, str]]
    routing: Routing
    spec: RowSpec
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def push(self, kind: str, payload: Any) -> None:
        # The worker thread hands events to the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # loop closed: the client is gone
            self.cancelled = True


class Batcher:
    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        batch_wait_s: float = 0.01,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics or Metrics()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.running = 0
        self._thread = threading.Thread(target=self._loop, name="personafuse-batcher", daemon=True)
        self._thread.start()
        self.metrics.gauges["queue_depth"] = lambda: len(self._queue)
        self.metrics.gauges["running_requests"] = lambda: self.running

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.healthy:
                raise Unavailable("the server is shutting down" if self._closing else "the model worker stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (limit {self.max_queue})")
            self._queue.append(job)
            self._cond.notify()

    def discard(self, job: Job) -> None:
        """The job's client left or ran out of time: mark it cancelled (a running row ends at the
        next step) and, if it is still waiting, take it out of the queue at once so its slot is free."""
        job.cancelled = True
        # ValueError: already taken by the worker (or never queued)
        with self._cond, contextlib.suppress(ValueError):
            self._queue.remove(job)

    def begin_close(self) -> None:
        """Stop taking requests (503 from now on); the worker finishes what is queued, then stops."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests; finish the ones already queued."""
        self.begin_close()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            # Give requests arriving together a moment to join the batch.
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._queue) < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = []
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                if not job.cancelled:
                    batch.append(job)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            self.running = len(batch)
            try:
                self._run(batch)
            except Exception:  # one bad batch must not kill the server
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.push("error", GENERATION_FAILED)
            finally:
                self.running = 0

    def _weights(self, batch: list[Job]) -> tuple[list[Job], torch.Tensor]:
        """The jobs that could be routed and their [B, 10] weights. The model's own per-row
        resolution (the same router text and Random Route keys as generate()); if the batch call
        fails, each row is resolved alone so that only the rows that fail get an error."""
        try:
            return batch, self.model.resolve_each([j.messages for j in batch], [j.routing for j in batch])
        except Exception:
            if len(batch) == 1:
                raise
        kept, rows = [], []
        for job in batch:
            try:
                rows.append(self.model.resolve_each([job.messages], [job.routing]))
                kept.append(job)
            except Exception:
                log.exception("routing failed for one request")
                job.push("error", GENERATION_FAILED)
        return kept, torch.cat(rows) if rows else torch.empty(0, NUM_POLES)

    def _run(self, batch: list[Job]) -> None:
        self.metrics.observe_batch(len(batch))
        batch, weights = self._weights(batch)
        if not batch:
            return
        dec = BatchDecode(
            self.model,
            [j.messages for j in batch],
            weights,
            [j.spec for j in batch],
            cancelled=lambda b: batch[b].cancelled,
        )
        for b, job in enumerate(batch):
            job.push("start", {"weights": weights_dict(weights[b].tolist()), "prompt_tokens": dec.prompt_tokens[b]})
        for events in dec:
            for ev in events:
                job = batch[ev.row]
                if ev.error is not None:  # this row failed alone; the batch goes on
                    log.error("request failed during decoding: %s", ev.error)
                    job.push("error", GENERATION_FAILED)
                    continue
                if ev.delta:
                    job.push("delta", ev.delta)
                if ev.finished:
                    job.push("end", {"finish_reason": ev.finish_reason, "completion_tokens": ev.completion_tokens})
