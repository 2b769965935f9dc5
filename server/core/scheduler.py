"""Scheduling of executions for one model version: dynamic batching or direct execution.

Dynamic batching merges concurrent requests into one onnxruntime run of up to ``max_batch_size``
samples, waiting at most ``max_queue_delay`` for more once a request is waiting, then splits the outputs
back. The queue is bounded: a full queue fails fast with :class:`QueueFull` (RESOURCE_EXHAUSTED / 429).
A request that is cancelled (client gone, deadline) before its batch runs is dropped from the batch.

Executions run on a thread pool (onnxruntime releases the GIL), one thread per model instance.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from foldserve.errors import ModelNotReady, QueueFull, RequestTimeout
from server.core.stats import Metrics, ModelStats

logger = logging.getLogger(__name__)

INLINE_MAX_S = 0.001  # runs shorter than this may execute on the event loop itself (see _infer_direct)
RunFn = Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    batch: int
    future: asyncio.Future[Outcome]
    enqueued: float


#: the outputs of one request, the seconds it queued, and the (input, infer, output) nanoseconds of the execution
#: that computed it: Triton attributes a batched execution's compute time to every request in it
Outcome = tuple[list[np.ndarray], float, tuple[int, int, int]]


def _deliver(batch: list[_Pending], results: list[np.ndarray], start: float, input_ns: int, infer_ns: int) -> None:
    """Each request's slice of a batched execution's outputs, with the execution's compute times (Triton's)."""
    offset = 0
    t_out = time.perf_counter_ns()
    parts = []
    for p in batch:
        parts.append([r[offset:offset + p.batch] for r in results])
        offset += p.batch
    output_ns = time.perf_counter_ns() - t_out
    for p, part in zip(batch, parts, strict=True):
        if not p.future.done():
            p.future.set_result((part, start - p.enqueued, (input_ns, infer_ns, output_ns)))


class Scheduler:
    def __init__(self, name: str, run: RunFn, *, max_batch_size: int, max_delay_s: float | None,
                 max_queue: int, instances: int, stats: ModelStats, metrics: Metrics, eager: bool = False) -> None:
        self.name = name
        self._run = run
        self.max_batch_size = max(1, max_batch_size)
        self.batching = max_delay_s is not None and max_batch_size > 1
        self.max_delay_s = max_delay_s or 0.0
        self.eager = eager
        self.run_estimate_s = float("inf")  # per-sample run time measured at warm-up (inf: unknown)
        self.max_queue = max_queue
        self.instances = max(1, instances)
        self.stats, self.metrics = stats, metrics
        self.executor = ThreadPoolExecutor(self.instances, thread_name_prefix=f"run-{name}")
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event            # made in start(), on the serving loop
        self._workers: list[asyncio.Task[None]] = []
        self._inflight = 0
        self._mean_batch = 1.0   # requests per execution, moving average (light load: close to 1)
        self._direct_slots: asyncio.Semaphore
        self._waiting = 0
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._direct_slots = asyncio.Semaphore(self.instances)
        if self.batching:
            self._workers = [asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}")
                             for i in range(self.instances)]

    @property
    def queue_length(self) -> int:
        return len(self._queue) if self.batching else self._waiting

    @property
    def busy(self) -> int:
        return self._inflight + self.queue_length

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, finish what is queued and running, then release the threads."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in self._workers:
            t.cancel()
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(ModelNotReady(f"model {self.name} was unloaded"))
        self._queue.clear()
        self.executor.shutdown(wait=False)

    # --- requests -------------------------------------------------------------------------------

    @property
    def may_wait(self) -> bool:
        """Requests wait for a batch window here (a client that leaves meanwhile is worth noticing)."""
        return self.batching and not self.eager and (self.max_delay_s or 0) > 0

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                    timeout_s: float) -> Outcome:
        """Run one request; returns (outputs, seconds spent queued, compute nanoseconds of its execution)."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is being unloaded")
        if self.batching:
            return await self._infer_batched(feeds, outputs, batch, timeout_s)
        return await self._infer_direct(feeds, outputs, batch, timeout_s)

    async def _infer_direct(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                            timeout_s: float) -> Outcome:
        if self._waiting >= self.max_queue:
            raise QueueFull(f"model {self.name}: {self._waiting} requests already waiting (max_queue_size "
                            f"{self.max_queue}); retry later")
        t0 = time.perf_counter()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._direct_slots.acquire(), timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"model {self.name}: request waited {timeout_s:g} s for an execution slot") from None
        finally:
            self._waiting -= 1
        queued = time.perf_counter() - t0
        self._inflight += 1
        try:
            if self._inflight == 1 and batch * self.run_estimate_s <= INLINE_MAX_S:
                # a tiny run with nothing else executing: the hand-off to a worker thread and back costs
                # more than the run itself blocks the event loop
                result, infer_ns = self._execute(feeds, outputs, batch)
            else:
                loop = asyncio.get_running_loop()
                result, infer_ns = await loop.run_in_executor(self.executor, self._execute, feeds, outputs, batch)
        finally:
            self._inflight -= 1
            self._direct_slots.release()
        return result, queued, (0, infer_ns, 0)

    async def _infer_batched(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                             timeout_s: float) -> Outcome:
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"model {self.name}: queue full ({len(self._queue)} requests waiting, "
                            f"max_queue_size {self.max_queue}); retry later")
        fut = asyncio.get_running_loop().create_future()
        pending = _Pending(feeds, list(outputs), batch, fut, time.perf_counter())
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"model {self.name}: no result within {timeout_s:g} s") from None

    def _execute(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                 input_ns: int = 0) -> tuple[list[np.ndarray], int]:
        """One model execution; returns its outputs and its compute (infer) nanoseconds."""
        t0 = time.perf_counter_ns()
        result = self._run(feeds, outputs)
        infer_ns = time.perf_counter_ns() - t0
        self.stats.record_execution(batch, input_ns, infer_ns, 0)
        self.metrics.executed(self.name, batch, self.stats.name, self.stats.version)
        return result, infer_ns

    # --- the batcher -----------------------------------------------------------------------------

    def _take_batch(self) -> list[_Pending]:
        """Pop requests for one execution: same requested outputs, total batch <= max_batch_size."""
        taken: list[_Pending] = []
        total = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # cancelled or timed out while waiting: abandon its work
                self._queue.popleft()
                continue
            if taken and (total + p.batch > self.max_batch_size or p.outputs != taken[0].outputs):
                break
            self._queue.popleft()
            taken.append(p)
            total += p.batch
        return taken

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Triton's policy: wait for more requests until the batch is full or the oldest has waited
            # max_delay. The "eager" policy never waits: requests that queued during the previous
            # execution form the next batch, so a lone request pays no delay.
            oldest = self._queue[0].enqueued
            while (not self.eager and sum(p.batch for p in self._queue if not p.future.done()) < self.max_batch_size
                   and time.perf_counter() - oldest < self.max_delay_s):
                self._wakeup.clear()
                remaining = self.max_delay_s - (time.perf_counter() - oldest)
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(remaining, 0))
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            start = time.perf_counter()
            for p in batch:
                self.metrics.queued(self.name, start - p.enqueued)
            self._inflight += 1
            try:
                t_in = time.perf_counter_ns()
                if len(batch) == 1:
                    feeds = batch[0].feeds
                else:
                    feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
                input_ns = time.perf_counter_ns() - t_in
                total = sum(p.batch for p in batch)
                try:
                    self._mean_batch = 0.9 * self._mean_batch + 0.1 * len(batch)
                    if (len(batch) == 1 and self._mean_batch < 1.05 and self.instances == 1
                            and total * self.run_estimate_s <= INLINE_MAX_S):
                        # light load (recent batches all held one request) and a tiny run: the hand-off to a
                        # thread and back costs more than the run blocks the event loop (as in _infer_direct);
                        # under load, batches grow and runs go to the thread again
                        results, infer_ns = self._execute(feeds, batch[0].outputs, total, input_ns)
                    else:
                        results, infer_ns = await loop.run_in_executor(self.executor, self._execute, feeds,
                                                                       batch[0].outputs, total, input_ns)
                except Exception as exc:  # an execution error fails exactly the requests in this batch
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                _deliver(batch, results, start, input_ns, infer_ns)
            finally:
                self._inflight -= 1
                # drop this batch's arrays before waiting for the next one: inputs may be views of a
                # shared-memory region that the client unregisters next
                batch = feeds = results = p = None  # type: ignore[assignment]
