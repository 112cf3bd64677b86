"""A virtual clock for endpoint tests: time moves only by waits, never by work.

:class:`personafuse.endpoint.EndpointClient` and the stub server take their time from a
:class:`~personafuse.endpoint.Clock`. Under this one, a wait (backoff, Retry-After, a server's
trickle) registers its wake time; when no HTTP attempt is in flight (or the in-flight ones have
made no progress for ``stall`` real seconds: a server that is itself waiting), the clock jumps to
the earliest wake. A request therefore takes no clock time however loaded the machine is, and a
40 s outage or a 60 s Retry-After costs milliseconds. Attempt deadlines are watchers: they fire
when the clock reaches them but never move it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from personafuse.endpoint import Clock


@dataclass(order=True)
class _Entry:
    wake: float
    seq: int
    advancer: bool = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    on_due: Callable[[], None] = field(compare=False)
    done: bool = field(default=False, compare=False)


class VirtualClock(Clock):
    def __init__(self, start_epoch: float = 1_800_000_000.0, stall: float = 0.02, tick: float = 0.001):
        self._now = 0.0
        self._epoch = start_epoch
        self.stall = stall
        self.tick = tick
        self._lock = threading.Lock()
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._last_change = time.monotonic()
        self._thread: threading.Thread | None = None
        self.sleeps: list[float] = []  # every wait asked for, in clock seconds

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    def _add(self, seconds: float, advancer: bool, on_due: Callable[[], None]) -> _Entry:
        e = _Entry(self._now + seconds, next(self._seq), advancer, asyncio.get_running_loop(), on_due)
        with self._lock:
            heapq.heappush(self._heap, e)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._drive, daemon=True)
                self._thread.start()
        return e

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        e = self._add(seconds, True, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            e.done = True

    @contextlib.asynccontextmanager
    async def deadline(self, seconds: float) -> AsyncIterator[None]:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as cm:
            exited = False

            def due() -> None:
                if not exited:
                    cm.reschedule(loop.time())  # the attempt's time is up: cancel it as a timeout

            e = self._add(seconds, False, due)
            self._busy(+1)
            try:
                yield
            finally:
                exited = e.done = True
                self._busy(-1)

    def _busy(self, d: int) -> None:
        with self._lock:
            self._in_flight += d
            self._last_change = time.monotonic()

    def _drive(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(self.tick)
            with self._lock:
                while self._heap and self._heap[0].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    if time.monotonic() - idle_since > 1.0:
                        self._thread = None
                        return
                    continue
                idle_since = time.monotonic()
                stalled = time.monotonic() - self._last_change >= self.stall
                head = next((e for e in sorted(self._heap) if e.advancer and not e.done), None)
                if head is not None and (self._in_flight == 0 or stalled):
                    self._now = max(self._now, head.wake)
                    self._last_change = time.monotonic()
                while self._heap and self._heap[0].wake <= self._now:
                    e = heapq.heappop(self._heap)
                    if not e.done:
                        with contextlib.suppress(RuntimeError):  # its loop has closed
                            e.loop.call_soon_threadsafe(e.on_due)
