"""The dynamic batcher with a real blocking function on its own thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence

import pytest

from services.common.batching import DynamicBatcher
from services.common.errors import DeadlineExceeded, ResourceExhausted


class SlowDoubler:
    """Doubles numbers, taking `delay_s` per batch; records what each batch held."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.threads: set[str] = set()

    def __call__(self, key: Hashable, items: Sequence[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.batches.append((key, list(items)))
        time.sleep(self.delay_s)
        return [2 * i for i in items]


def batcher(model: SlowDoubler, **overrides: object) -> DynamicBatcher[int, int]:
    options: dict[str, object] = {"max_batch_size": 8, "max_wait_s": 0.02, "max_queue": 64}
    options.update(overrides)
    return DynamicBatcher("test", model, **options)  # type: ignore[arg-type]


async def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    model = SlowDoubler()
    b = batcher(model)
    b.start()
    try:
        results = await asyncio.gather(*(b.submit(i) for i in range(20)))
    finally:
        await b.stop()
    assert results == [2 * i for i in range(20)]
    assert max(len(items) for _, items in model.batches) == 8
    assert len(model.batches) <= 4
    assert model.threads and threading.current_thread().name not in model.threads


async def test_event_loop_stays_free_while_the_model_runs() -> None:
    b = batcher(SlowDoubler(delay_s=0.3))
    b.start()
    try:
        work = asyncio.ensure_future(b.submit(1))
        ticks = 0
        while not work.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks > 10
    finally:
        await b.stop()


async def test_batches_never_mix_keys() -> None:
    model = SlowDoubler()
    b = DynamicBatcher(
        "test", model, max_batch_size=8, max_wait_s=0.02, max_queue=64, batch_key=lambda i: i % 2
    )
    b.start()
    try:
        await asyncio.gather(*(b.submit(i) for i in range(16)))
    finally:
        await b.stop()
    for key, items in model.batches:
        assert {i % 2 for i in items} == {key}


async def test_a_full_queue_refuses_with_retry_info() -> None:
    b = batcher(SlowDoubler(delay_s=0.2), max_queue=4, max_batch_size=2)
    b.start()
    try:
        accepted = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
        await asyncio.sleep(0)  # the worker takes the first batch (2 items) off the queue
        more = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as refused:
            await b.submit(99)
        assert refused.value.reason == "QUEUE_FULL"
        assert refused.value.retry_after_s and refused.value.retry_after_s > 0
        assert len(await asyncio.gather(*accepted, *more)) == 6
    finally:
        await b.stop()


async def test_items_past_their_deadline_or_cancelled_are_dropped() -> None:
    model = SlowDoubler(delay_s=0.2)
    b = batcher(model, max_batch_size=1)
    b.start()
    try:
        first = asyncio.ensure_future(b.submit(1))
        late = asyncio.ensure_future(b.submit(2, timeout_s=0.05))
        gone = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.05)
        gone.cancel()
        assert await first == 2
        with pytest.raises(DeadlineExceeded):
            await late
        await asyncio.sleep(0.3)
    finally:
        await b.stop()
    assert [items for _, items in model.batches] == [[1]]


async def test_stop_ends_the_worker_even_as_an_item_arrives() -> None:
    """Python 3.11's asyncio.wait_for drops a cancellation that lands in the same loop
    iteration as the awaited event: stop() then waited for the worker forever (a CI run
    hung 300 s in an mt test's teardown). An item that wakes the filling worker just as
    stop() cancels it is that race, every time."""
    b = batcher(SlowDoubler(), max_wait_s=10.0)
    b.start()
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.01)  # the worker is waiting for the batch to fill
    second = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0)  # the second item wakes the worker...
    async with asyncio.timeout(5):
        await b.stop()  # ...in the iteration that cancels it
    for caller in (first, second):
        with pytest.raises(Exception, match="shutting down"):
            await caller
