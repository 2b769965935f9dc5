"""Scheduling of executions for one model version: dynamic batching or direct execution.

Dynamic batching merges concurrent requests into one onnxruntime run of up to ``max_batch_size``
samples, waiting at most ``max_queue_delay`` for more once a request is waiting, then splits the outputs
back. The queue is bounded: a full queue fails fast with :class:`QueueFull` (RESOURCE_EXHAUSTED / 429).
A request that is cancelled (client gone, deadline) before its batch runs is dropped from the batch.

A model's config.pbtxt may add Triton's queue policy (``dynamic_batching.default_queue_policy``): its own
``max_queue_size`` and a queue timeout (``default_timeout_microseconds``; a request's ``timeout`` parameter
replaces it where ``allow_timeout_override``) after which a waiting request is rejected (``REJECT``) or served
after every request still in time (``DELAY``); both rejections are Triton's UNAVAILABLE. With
``priority_levels`` the queue is ordered by each request's ``priority`` (1 first), then by arrival.

Executions run on a thread pool (onnxruntime releases the GIL), one thread per model instance.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from foldserve.errors import InvalidInput, ModelNotReady, QueueFull, QueueRejected, RequestTimeout
from server.core.stats import Metrics, ModelStats
from server.core.types import BatchingSpec

logger = logging.getLogger(__name__)

#: Triton's message, exactly: clients compare it whole (qa/L0_batcher/queue_timeout_test.py)
REQUEST_TIMEOUT_EXPIRED = "Request timeout expired"
INLINE_MAX_S = 0.001  # runs shorter than this may execute on the event loop itself (see _infer_direct)
RunFn = Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    batch: int
    future: asyncio.Future[Outcome]
    enqueued: float
    level: int = 0                  # priority level (0 without priority levels; 1 is served first)
    delayed: bool = False           # past its queue timeout under DELAY: served after everything in time
    taken: bool = False             # in a batch already
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def live(self) -> bool:
        return not (self.taken or self.future.done())


_Entry = tuple[bool, int, int, _Pending]    # (delayed, level, arrival, request): the heap's order


#: the outputs of one request, the seconds it queued, the (input, infer, output) nanoseconds of the execution
#: that computed it (Triton attributes a batched execution's compute time to every request in it), and that
#: execution's batch size
Outcome = tuple[list[np.ndarray], float, tuple[int, int, int], int]


def _deliver(batch: list[_Pending], results: list[np.ndarray], start: float, input_ns: int, infer_ns: int) -> None:
    """Each request's slice of a batched execution's outputs, with the execution's compute times (Triton's)."""
    offset = 0
    t_out = time.perf_counter_ns()
    parts = []
    for p in batch:
        parts.append([r[offset:offset + p.batch] for r in results])
        offset += p.batch
    output_ns = time.perf_counter_ns() - t_out
    total = sum(p.batch for p in batch)
    for p, part in zip(batch, parts, strict=True):
        if not p.future.done():
            p.future.set_result((part, start - p.enqueued, (input_ns, infer_ns, output_ns), total))


def _shapes(p: _Pending) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """What must agree for two requests to share an execution: each input's shape past the batch axis and type."""
    return tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in p.feeds.items()))


class Scheduler:
    def __init__(self, name: str, run: RunFn, *, max_batch_size: int, max_delay_s: float | None,
                 max_queue: int, instances: int, stats: ModelStats, metrics: Metrics, eager: bool = False,
                 policy: BatchingSpec | None = None) -> None:
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
        self.policy = policy or BatchingSpec(0)
        self._queue: list[_Entry] = []          # a heap; entries of taken, finished or re-queued requests are stale
        self._arrivals = itertools.count()
        self._wakeup: asyncio.Event            # made in start(), on the serving loop
        self._workers: list[asyncio.Task[None]] = []
        self._inflight = 0
        self._mean_batch = 1.0   # requests per execution, moving average (light load: close to 1)
        self._direct_slots: asyncio.Semaphore
        self._waiting = 0
        self._closed = False
        self.batcher_restarts = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._direct_slots = asyncio.Semaphore(self.instances)
        if self.batching:
            self._workers = [self._start_worker(i) for i in range(self.instances)]

    @property
    def queue_length(self) -> int:
        return self._live_count() if self.batching else self._waiting

    def _live(self) -> list[_Pending]:
        return [e[3] for e in self._queue if e[3].live and e[0] == e[3].delayed]

    def _live_count(self) -> int:
        return sum(1 for e in self._queue if e[3].live and e[0] == e[3].delayed)

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
        for p in self._live():
            p.future.set_exception(ModelNotReady(f"model {self.name} was unloaded"))
        self._queue.clear()
        self.executor.shutdown(wait=False)

    # --- requests -------------------------------------------------------------------------------

    @property
    def may_wait(self) -> bool:
        """Requests wait for a batch window here (a client that leaves meanwhile is worth noticing)."""
        return self.batching and not self.eager and (self.max_delay_s or 0) > 0

    def check_parameters(self, priority: int, timeout_us: int) -> None:
        """A request's ``priority`` and ``timeout`` parameters, checked against the model's queue policy."""
        levels = self.policy.priority_levels
        if priority and (not levels or priority > levels):
            raise InvalidInput(f"priority {priority} is out of range: model {self.name} has "
                               f"{levels or 'no'} priority levels" + (f" (1 .. {levels}; 0: the default)"
                                                                      if levels else ""))

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                    timeout_s: float, priority: int = 0, timeout_us: int = 0) -> Outcome:
        """Run one request; returns (outputs, seconds spent queued, compute nanoseconds of its execution).
        ``priority`` / ``timeout_us``: the request's own parameters (0: the model's defaults)."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is being unloaded")
        if self.batching:
            return await self._infer_batched(feeds, outputs, batch, timeout_s, priority, timeout_us)
        return await self._infer_direct(feeds, outputs, batch, timeout_s, timeout_us)

    def _queue_timeout_us(self, timeout_us: int) -> int:
        """A request's queue timeout: its own ``timeout`` parameter where the policy allows it, else the policy's."""
        policy = self.policy
        return timeout_us if policy.allow_timeout_override and timeout_us else policy.queue_timeout_us

    async def _infer_direct(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                            timeout_s: float, timeout_us: int = 0) -> Outcome:
        """Without batching, a request waits for one of the instances; the queue policy's size and timeout
        (REJECT) bound that wait as they bound the batcher's queue."""
        policy = self.policy
        if policy.max_queue_size and self._waiting >= policy.max_queue_size:
            raise QueueRejected(f"Exceeds maximum queue size: model {self.name} has {self._waiting} requests "
                                f"waiting (dynamic_batching.default_queue_policy.max_queue_size "
                                f"{policy.max_queue_size})")
        if self._waiting >= self.max_queue:
            raise QueueFull(f"model {self.name}: {self._waiting} requests already waiting (max_queue_size "
                            f"{self.max_queue}); retry later")
        wait_us = self._queue_timeout_us(timeout_us) if policy.timeout_action != "DELAY" else 0
        t0 = time.perf_counter()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._direct_slots.acquire(), min(timeout_s, wait_us / 1e6 if wait_us else 1e18))
        except asyncio.TimeoutError:
            if wait_us and wait_us / 1e6 < timeout_s:
                logger.info("model %s: a request waited its queue timeout (%d us) for an instance: rejected",
                            self.name, wait_us)
                raise QueueRejected(REQUEST_TIMEOUT_EXPIRED) from None
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
        return result, queued, (0, infer_ns, 0), batch

    async def _infer_batched(self, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
                             timeout_s: float, priority: int = 0, timeout_us: int = 0) -> Outcome:
        policy = self.policy
        limit = min(policy.max_queue_size or self.max_queue, self.max_queue)
        # the heap's length bounds the live count from above: count exactly only near a limit
        waiting = self._live_count() if len(self._queue) >= limit else len(self._queue)
        if policy.max_queue_size and waiting >= policy.max_queue_size:
            raise QueueRejected(f"Exceeds maximum queue size: model {self.name} has {waiting} requests waiting "
                                f"(dynamic_batching.default_queue_policy.max_queue_size {policy.max_queue_size})")
        if waiting >= self.max_queue:
            raise QueueFull(f"model {self.name}: queue full ({waiting} requests waiting, "
                            f"max_queue_size {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        level = (priority or policy.default_priority_level) if policy.priority_levels else 0
        pending = _Pending(feeds, list(outputs), batch, fut, time.perf_counter(), level)
        heapq.heappush(self._queue, (False, level, next(self._arrivals), pending))
        wait_us = self._queue_timeout_us(timeout_us)
        if wait_us:
            pending.expiry = loop.call_later(wait_us / 1e6, self._expire, pending, wait_us)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"model {self.name}: no result within {timeout_s:g} s") from None
        finally:
            if pending.expiry is not None:
                pending.expiry.cancel()

    def _expire(self, p: _Pending, wait_us: int) -> None:
        """A request still waiting at its queue timeout: rejected (REJECT), or sent behind every request still in
        time (DELAY)."""
        if not p.live:
            return
        if self.policy.timeout_action == "DELAY":
            p.delayed = True
            heapq.heappush(self._queue, (True, p.level, next(self._arrivals), p))
            return
        logger.info("model %s: a request waited its queue timeout (%d us) in the queue: rejected", self.name, wait_us)
        p.future.set_exception(QueueRejected(REQUEST_TIMEOUT_EXPIRED))

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

    def _head(self) -> _Pending | None:
        """The next request in order (priority level, then arrival; delayed ones last), dropping stale entries:
        requests cancelled, rejected or finished while waiting, and the old places of re-queued ones."""
        while self._queue:
            delayed, _, _, p = self._queue[0]
            if p.live and delayed == p.delayed:
                return p
            heapq.heappop(self._queue)
        return None

    def _take_batch(self) -> list[_Pending]:
        """Pop requests for one execution: same requested outputs, same shapes and types past the batch axis
        (a model with -1 dims gets requests of several shapes, which Triton batches only with ragged batching),
        total batch <= max_batch_size; requests stay in arrival order."""
        taken: list[_Pending] = []
        total = 0
        while (p := self._head()) is not None:
            if taken and (total + p.batch > self.max_batch_size or p.outputs != taken[0].outputs
                          or _shapes(p) != _shapes(taken[0])):
                break
            heapq.heappop(self._queue)
            p.taken = True
            taken.append(p)
            total += p.batch
        return taken

    def _start_worker(self, i: int) -> asyncio.Task[None]:
        task = asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}")
        task.add_done_callback(lambda t: self._worker_ended(t, i))
        return task

    def _worker_ended(self, task: asyncio.Task[None], i: int) -> None:
        """A batcher that died (a bug, not a failed execution: those fail their batch) is logged and replaced, so
        the model never sits READY with nobody taking its queue."""
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        logger.error("model %s: batcher %d stopped (%s: %s); starting a new one", self.name, i,
                     type(exc).__name__ if exc else "returned", exc, exc_info=exc)
        self.batcher_restarts += 1
        self._workers[i] = self._start_worker(i)
        self._wakeup.set()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while (head := self._head()) is None:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Triton's policy: wait for more requests until the batch is full or the oldest has waited
            # max_delay. The "eager" policy never waits: requests that queued during the previous
            # execution form the next batch, so a lone request pays no delay.
            oldest = head.enqueued
            while (not self.eager and sum(p.batch for p in self._live()) < self.max_batch_size
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
                total = sum(p.batch for p in batch)
                try:
                    if len(batch) == 1:
                        feeds = batch[0].feeds
                    else:
                        feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
                    input_ns = time.perf_counter_ns() - t_in
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
