"""Admission control for inference, shared by both transports: requests being handled at once on a
transport, against a limit; past it a request is answered at once (RESOURCE_EXHAUSTED / 429) instead of
queueing without bound.

Both transports run on one event loop, and a burst (thousands of requests at once) queues in front of it
before any request is counted: a well-behaved client's request then waits behind the whole burst. The
:class:`LoopMonitor` measures how late the loop runs a timer; while it runs later than ``--shed-lag-ms``
new inference requests are answered at once (the REST transport even before routing), so that a burst
drains at the cost of a refusal, not of a request, and admitted clients keep their latency.

A slot is taken only when the request is complete (the body read, the message received) and authenticated,
so clients that open calls and send nothing, or send slowly, never hold one; health, liveness and metadata
never take one.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from foldserve.errors import QueueFull
from server.settings import flag

TICK_S = 0.01


@dataclass
class LoopMonitor:
    """How late the event loop runs: a timer every TICK_S. ``overloaded`` once LATE_TICKS ticks in a row ran
    later than ``lag_s`` (a backlog, not one slow callback: a 64 MB message or a collection alone never sheds)
    and for HOLD_S after the last of them, so that shedding does not flap. It also counts the inference requests
    that arrive (:meth:`demand`), so that admission sheds only where other work is waiting: a loop that is late
    because other processes hold the CPU while the server is idle refuses no one."""

    lag_s: float
    lag: float = 0.0
    late: int = 0
    hold_until: float = 0.0
    last_arrival: float = float("-inf")     # loop time of the last inference request (:meth:`demand`)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    HOLD_S = 0.1
    LATE_TICKS = 3

    def start(self) -> None:
        if self.lag_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(TICK_S)
            self.lag = loop.time() - t - TICK_S
            self.late = self.late + 1 if self.lag > self.lag_s else 0
            if self.late >= self.LATE_TICKS:
                self.hold_until = loop.time() + self.HOLD_S

    RECENT_S = 0.5

    def demand(self) -> bool:
        """An inference request arrived; returns whether another one arrived within RECENT_S before it."""
        now = asyncio.get_running_loop().time()
        others, self.last_arrival = now - self.last_arrival < self.RECENT_S, now
        return others

    def overloaded(self) -> bool:
        return self._task is not None and (self.late >= self.LATE_TICKS or
                                           asyncio.get_running_loop().time() < self.hold_until)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class Admission:
    limit: int
    monitor: LoopMonitor | None = None
    active: int = 0

    def refusal(self) -> str | None:
        """Why a new inference request would be refused now, or None."""
        if self.active >= self.limit:
            return f"server busy: {self.active} requests in flight (limit {self.limit}); retry later"
        others = self.monitor.demand() if self.monitor is not None else False
        if self.monitor is not None and self.monitor.overloaded() and (others or self.active > 0):
            return (f"server overloaded: its event loop runs {self.monitor.lag * 1000:.0f} ms late "
                    f"({flag('shed_lag_ms')} {self.monitor.lag_s * 1000:g}); retry later")
        return None

    @contextmanager
    def slot(self) -> Iterator[None]:
        why = self.refusal()
        if why:
            raise QueueFull(why)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
