"""Small helpers the benchmarks share: percentiles and closed-loop load."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadResult:
    calls: int
    seconds: float
    latencies_s: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    @property
    def p99_ms(self) -> float:
        return self.percentile(99) * 1000


async def closed_loop(
    call: Callable[[int], Awaitable[object]], concurrency: int, total_calls: int
) -> LoadResult:
    """`concurrency` workers issue `total_calls` calls back to back; each call gets its index."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < total_calls:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(total_calls, time.perf_counter() - started, latencies)


def closed_loop_threads(
    call: Callable[[int], object], concurrency: int, total_calls: int
) -> LoadResult:
    """`closed_loop` for a blocking call: `concurrency` threads issue `total_calls` calls."""
    latencies: list[float] = []
    indexes = iter(range(total_calls))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                index = next(indexes, None)
            if index is None:
                return
            started = time.perf_counter()
            call(index)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(total_calls, time.perf_counter() - started, latencies)
