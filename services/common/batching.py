"""Dynamic batching of concurrent requests through a blocking model.

Callers `submit()` one item each and await its result. A worker collects the items that
share a batch key (same model, same task) into batches of up to `max_batch_size`, waiting at
most `max_wait_s` for a batch to fill, and runs the model on a thread of its own so the event
loop never blocks. The queue is bounded: when it is full, `submit()` refuses at once with
RESOURCE_EXHAUSTED and a RetryInfo estimated from recent batch times. Items whose caller has
gone (cancelled) or whose deadline has passed are dropped before the model sees them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.common.tasks import stop_tasks

log = logging.getLogger("speechmesh.batching")

In = TypeVar("In")
Out = TypeVar("Out")

batch_size_hist = Histogram(
    "speechmesh_batch_size",
    "Items per model batch.",
    ["batcher"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
batch_seconds = Histogram(
    "speechmesh_batch_seconds",
    "Time the model took per batch.",
    ["batcher"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
queue_wait_seconds = Histogram(
    "speechmesh_batch_queue_wait_seconds",
    "Time an item waited before its batch ran.",
    ["batcher"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
queue_depth = Gauge("speechmesh_batch_queue_depth", "Items waiting for a batch.", ["batcher"])
dropped_total = Counter(
    "speechmesh_batch_dropped_total", "Items dropped before running.", ["batcher", "why"]
)


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    key: Hashable
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[Out]
    queued_at: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[In, Out]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Hashable, Sequence[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        batch_key: Callable[[In], Hashable] = lambda _: None,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batch_key = batch_key
        self._queues: dict[Hashable, collections.deque[_Pending[In, Out]]] = {}
        self._size = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
        self._worker: asyncio.Task[None] | None = None
        self._batch_time_s = 0.05  # running estimate, for RetryInfo
        self._depth = queue_depth.labels(name)

    @property
    def queued(self) -> int:
        return self._size

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        await stop_tasks(self._worker)
        self._worker = None
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(
                        Unavailable("shutting down", reason="SHUTTING_DOWN")
                    )
        self._queues.clear()
        self._size = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: In, timeout_s: float | None = None) -> Out:
        """Queues one item and waits for its result. `timeout_s` is the caller's remaining
        time: the item is dropped with DEADLINE_EXCEEDED if its batch cannot start in time."""
        if self._worker is None:
            raise Unavailable("model not started", reason="MODEL_NOT_READY", retry_after_s=1.0)
        if self._size >= self.max_queue:
            dropped_total.labels(self.name, "queue_full").inc()
            batches_ahead = self._size / self.max_batch_size + 1
            raise ResourceExhausted(
                f"{self.name} queue is full ({self.max_queue} waiting)",
                reason="QUEUE_FULL",
                retry_after_s=round(batches_ahead * self._batch_time_s, 3),
                metadata={"queue": self.name, "max_queue": str(self.max_queue)},
            )
        key = self.batch_key(item)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, collections.deque()).append(
            _Pending(item, key, deadline, future)
        )
        self._size += 1
        self._depth.set(self._size)
        self._arrived.set()
        return await future  # a cancelled caller cancels the future; the worker skips it

    def _oldest_key(self) -> Hashable:
        return min((q for q in self._queues.values() if q), key=lambda q: q[0].queued_at)[0].key

    def _take(self, key: Hashable) -> list[_Pending[In, Out]]:
        queue = self._queues[key]
        batch: list[_Pending[In, Out]] = []
        now = time.monotonic()
        while queue and len(batch) < self.max_batch_size:
            pending = queue.popleft()
            self._size -= 1
            if pending.future.done():  # the caller went away
                dropped_total.labels(self.name, "cancelled").inc()
            elif pending.deadline is not None and pending.deadline <= now:
                dropped_total.labels(self.name, "deadline").inc()
                pending.future.set_exception(
                    DeadlineExceeded("deadline passed while queued", reason="DEADLINE_IN_QUEUE")
                )
            else:
                batch.append(pending)
        if not queue:
            del self._queues[key]
        self._depth.set(self._size)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._size:
                self._arrived.clear()
                await self._arrived.wait()
            key = self._oldest_key()
            # Give a partial batch until the oldest item has waited max_wait_s to fill up.
            fill_by = self._queues[key][0].queued_at + self.max_wait_s
            while len(self._queues[key]) < self.max_batch_size:
                remaining = fill_by - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
            batch = self._take(key)
            if not batch:
                continue
            started = time.monotonic()
            for pending in batch:
                queue_wait_seconds.labels(self.name).observe(started - pending.queued_at)
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, key, [p.item for p in batch]
                )
            except Exception as exc:
                log.exception("batch failed", extra={"batcher": self.name, "size": len(batch)})
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - started
            self._batch_time_s = 0.8 * self._batch_time_s + 0.2 * elapsed
            batch_seconds.labels(self.name).observe(elapsed)
            batch_size_hist.labels(self.name).observe(len(batch))
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)


def remaining_time(context: Any) -> float | None:
    """The caller's remaining time in seconds, or None when it set no deadline."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, float(remaining))
