"""Request queue and the scheduler that decodes it.

Requests wait in one bounded queue. A single worker thread owns the model. With the default
``scheduler="step"`` it schedules per decoding step: between two steps, waiting requests join the
running batch (up to ``max_batch`` rows; routed in one router call, their prompts prefilled in
chunks of ``prefill_chunk`` tokens, each chunk between two decode steps of the rows already
running), and finished, failed or cancelled rows leave at once. Every row keeps its own ten
mixture weights from prefill to its last token (the mixture layer applies per-row weights in the
same forward). ``scheduler="batch"`` is the earlier run-to-completion batching (a batch is taken,
then decoded until its last row ends), kept for comparison (``benchmarks/serve_load.py``).
Results go back to each request's asyncio queue as they appear.

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
from personafuse.serving.decode import Prefill, RowEvent, RowSpec, Running, new_row
from personafuse.serving.metrics import Metrics
from personafuse.traits import NUM_POLES, weights_dict

log = logging.getLogger("personafuse.serving")

# What a client is told when generation fails inside the server: the detail (exception text) goes
# to the server log only.
GENERATION_FAILED = "generation failed inside the server (the details are in the server log)"


SCHEDULERS = ("step", "batch")


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
    admitted: float | None = None  # when the scheduler took it from the queue
    last_token: float | None = None  # when its latest text went out (inter-token latency)

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
        scheduler: str = "step",
        prefill_chunk: int = 256,
        mixture: bool = True,
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.scheduler = scheduler
        self.prefill_chunk = prefill_chunk
        self.mixture = mixture  # False: decode with the base model alone (a load benchmark's anchor)
        self.metrics = metrics or Metrics()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.running = 0
        loop = self._step_loop if scheduler == "step" else self._loop
        self._thread = threading.Thread(target=loop, name="personafuse-batcher", daemon=True)
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
    def _loop(self) -> None:
        while True:
            batch = self._admit(0, idle=True)  # run-to-completion: a whole batch at a time
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

    # ------------------------------------------------------------------ step-level scheduling
    def _admit(self, active: int, idle: bool) -> list[Job] | None:
        """Waiting jobs that join at the next step (at most ``max_batch - active``). When nothing
        runs, wait for a first one (and ``batch_wait_s`` for company); None: closing, nothing left."""
        with self._cond:
            if idle:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._queue) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            jobs: list[Job] = []
            while self._queue and active + len(jobs) < self.max_batch:
                job = self._queue.popleft()
                if not job.cancelled:
                    jobs.append(job)
        now = time.monotonic()
        for job in jobs:
            job.admitted = now
            self.metrics.observe_queue_wait(now - job.arrived)
        return jobs

    def _start_prefill(self, jobs: list[Job], chunk: int | None) -> Prefill | None:
        jobs, weights = self._weights(jobs)
        if not jobs:
            return None
        rows = [new_row(j.spec, j) for j in jobs]
        prefill = Prefill(self.model, [j.messages for j in jobs], weights, rows, chunk, mixture=self.mixture)
        for b, job in enumerate(jobs):
            job.push("start", {"weights": weights_dict(weights[b].tolist()), "prompt_tokens": prefill.prompt_tokens[b]})
        return prefill

    def _step_loop(self) -> None:
        running: Running | None = None
        prefill: Prefill | None = None
        while True:
            active = (len(running) if running else 0) + (len(prefill.rows) if prefill else 0)
            jobs = self._admit(active, idle=active == 0) if prefill is None else []
            if jobs is None:
                return
            self.running = active + len(jobs)
            try:
                if jobs:
                    prefill = self._start_prefill(jobs, self.prefill_chunk)
                if prefill is not None and (joined := prefill.advance()) is not None:
                    prefill = None
                    if running is None:
                        running = joined
                    else:
                        running.merge(joined)
            except Exception:  # the newcomers' prefill failed: they fail, the running rows go on
                log.exception("prefill of %d request(s) failed", len(prefill.rows) if prefill else len(jobs))
                self._fail([row.tag for row in prefill.rows] if prefill else jobs)
                prefill = None
            if running is not None:
                running = self._step(running)
            self.running = (len(running) if running else 0) + (len(prefill.rows) if prefill else 0)

    def _step(self, running: Running) -> Running | None:
        """One decoding step of the running batch; None once it is empty (or its forward failed)."""
        self.metrics.observe_step(len(running))
        try:
            events = running.step(lambda row: row.tag.cancelled)
        except Exception:  # a forward of the whole batch failed: no row can be told apart
            log.exception("decode step of %d request(s) failed", len(running))
            self._fail([row.tag for row in running.rows])
            return None
        self._dispatch(events)
        self.metrics.generated(running.last_tokens)
        return running if len(running) else None

    def _dispatch(self, events: list[RowEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            job: Job = ev.row
            if ev.error is not None:  # this row failed alone; the batch goes on
                log.error("request failed during decoding: %s", ev.error)
                job.push("error", GENERATION_FAILED)
                continue
            if ev.delta:
                if job.last_token is not None:
                    self.metrics.observe_inter_token(now - job.last_token)
                job.last_token = now
                job.push("delta", ev.delta)
            if ev.finished:
                job.push("end", {"finish_reason": ev.finish_reason, "completion_tokens": ev.completion_tokens})

    def _fail(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.push("error", GENERATION_FAILED)

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
        """Run-to-completion: prefill the batch in one go, then step until its last row ends."""
        self.metrics.observe_batch(len(batch))
        prefill = self._start_prefill(batch, chunk=None)
        running = None
        while prefill is not None and running is None:
            running = prefill.advance()
        while running is not None:
            running = self._step(running)
