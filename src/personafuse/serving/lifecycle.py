"""How an accepted request ends before its reply is complete, on the server's event loop.

Three reasons, each delivered as an event on the job's own queue (so the code that answers the
client learns it where it already waits) and each freeing the job's place in the batcher at once:

* ``gone``: the client closed the connection (a queued job leaves the queue; a running row ends
  at the next decode step);
* ``timeout``: the request's deadline (``--request-timeout``, counted from arrival) passed;
* ``shutdown``: the server was told to stop (SIGTERM) and the drain bound (``--drain-timeout``)
  ran out before this request finished.

Whatever schedules the model (today's batcher, a continuous-batching scheduler later) must keep
two promises for this to work: a job taken out of its queue by ``discard`` is never started, and a
job whose ``cancelled`` flag is set stops being decoded at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from personafuse.serving.batcher import Job

GONE, TIMEOUT, SHUTDOWN = "gone", "timeout", "shutdown"


class Guard:
    """Watches one job: its deadline timer and, while nothing else reads the connection, a
    listener for the client's disconnect."""

    def __init__(self, flight: InFlight, job: Job, receive: Callable[[], Any] | None, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(timeout_s, flight.end, job, TIMEOUT) if timeout_s > 0 else None
        self.listener = asyncio.create_task(self._listen(flight, job, receive)) if receive is not None else None

    @staticmethod
    async def _listen(flight: InFlight, job: Job, receive: Callable[[], Any]) -> None:
        # The body has been read: the next ASGI message on this connection is its disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        flight.end(job, GONE)

    def stop_listening(self) -> None:
        """Before handing the connection to a streaming response (which listens itself)."""
        if self.listener is not None:
            self.listener.cancel()
            self.listener = None

    def close(self) -> None:
        self.stop_listening()
        if self.timer is not None:
            self.timer.cancel()


class InFlight:
    """The accepted requests that have not been answered yet."""

    def __init__(self, discard: Callable[[Job], None]) -> None:
        self.jobs: dict[int, Job] = {}  # by id(): a Job (a dataclass) is not hashable
        self.discard = discard
        self.draining = False
        self._abort: asyncio.TimerHandle | None = None

    def add(self, job: Job, receive: Callable[[], Any] | None, timeout_s: float) -> Guard:
        self.jobs[id(job)] = job
        return Guard(self, job, receive, timeout_s)

    def end(self, job: Job, kind: str) -> None:
        """End the job early for ``kind``; no-op once it has been answered (or ended)."""
        if self.jobs.pop(id(job), None) is None:
            return
        self.discard(job)  # frees its queue slot now, or its row at the next step
        job.events.put_nowait((kind, None))

    def release(self, job: Job) -> None:
        """The job was answered (or its answer abandoned): nothing may end it any more."""
        if self.jobs.pop(id(job), None) is not None:
            self.discard(job)  # no-op for a finished job; stops an abandoned one

    def drain(self, bound_s: float) -> None:
        """Stop taking requests; whatever is still in flight after ``bound_s`` seconds ends with
        ``shutdown``."""
        self.draining = True
        self._abort = asyncio.get_running_loop().call_later(max(bound_s, 0.0), self.abort_all)

    def abort_all(self) -> None:
        for job in list(self.jobs.values()):
            self.end(job, SHUTDOWN)
