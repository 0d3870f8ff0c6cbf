"""One pybreaker circuit breaker per downstream, its state shared across gateway replicas.

pybreaker keeps state in memory and is synchronous; the hot path stays that way (no Redis
round trip per call). A background sync publishes local state changes to Redis and applies
newer changes made by other replicas, so a downstream that one replica found dead is
skipped by all of them within `breaker_sync_interval_s`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import grpc
import pybreaker
from prometheus_client import Gauge
from redis.asyncio import Redis

from services.common.redis import REDIS_DOWN_ERRORS

log = logging.getLogger("speechmesh.gateway.breaker")

# A caller's own mistakes never open a breaker; only signs that the downstream is unwell.
FAILURE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)
STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_OPEN: 1, pybreaker.STATE_HALF_OPEN: 2}

breaker_state = Gauge(
    "speechmesh_gateway_breaker_state",
    "Circuit breaker state per downstream: 0 closed, 1 open, 2 half-open.",
    ["downstream"],
)


class CutShortByDeadline(Exception):
    """Raised inside a breaker for a downstream call that the caller's deadline cancelled:
    a failure, as its DEADLINE_EXCEEDED would have been. (A cancellation that is not at the
    deadline, a caller giving up early, says nothing about the downstream.)"""

    def __init__(self, cancelled: BaseException) -> None:
        super().__init__("the caller's deadline passed during the call")
        self.cancelled = cancelled


def _not_a_failure(error: BaseException) -> bool:
    if isinstance(error, CutShortByDeadline):
        return False
    return not (isinstance(error, grpc.aio.AioRpcError) and error.code() in FAILURE_CODES)


class SharedBreaker(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self, name: str, fail_max: int, reset_s: float) -> None:
        self.name = name
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_s,
            exclude=[_not_a_failure],
            listeners=[self],
            throw_new_error_on_trip=False,
            name=name,
        )
        self.changed_ms = 0  # when the local state last changed (ours or applied from Redis)
        self._dirty = False
        self._applying_remote = False
        breaker_state.labels(name).set(0)

    # pybreaker listener hook: runs inside the breaker's lock, so only note the change here.
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changed_ms = int(time.time() * 1000)
        breaker_state.labels(self.name).set(STATE_VALUES.get(new_state.name, 0))
        log.warning(
            "circuit breaker changed",
            extra={
                "downstream": self.name,
                "from": old_state.name if old_state else None,
                "to": new_state.name,
            },
        )
        if not self._applying_remote:
            self._dirty = True

    @property
    def state(self) -> str:
        return str(self.breaker.current_state)

    @property
    def consecutive_failures(self) -> int:
        return int(self.breaker.fail_counter)

    def retry_after_s(self) -> float:
        opened_at = self.breaker._state_storage.opened_at
        if opened_at is None:
            return self.breaker.reset_timeout
        reopen_at = opened_at + dt.timedelta(seconds=self.breaker.reset_timeout)
        left = reopen_at - dt.datetime.now(dt.UTC)
        return max(0.0, left.total_seconds())

    def reset(self) -> None:
        self.breaker.close()

    async def sync(self, redis: Redis, key: str) -> None:
        """Publishes our newer state, or adopts another replica's newer one."""
        try:
            if self._dirty:
                self._dirty = False
                await redis.hset(key, mapping={"state": self.state, "changed_ms": self.changed_ms})
                return
            remote: dict[bytes, bytes] = await redis.hgetall(key)  # type: ignore[assignment]
        except REDIS_DOWN_ERRORS:
            return  # each replica keeps its own view until Redis is back
        if not remote:
            return
        state = remote[b"state"].decode()
        changed_ms = int(remote[b"changed_ms"])
        if changed_ms <= self.changed_ms or state == self.state:
            return
        self._applying_remote = True
        try:
            if state == pybreaker.STATE_OPEN:
                self.breaker.open()
            elif state == pybreaker.STATE_CLOSED:
                self.breaker.close()
        finally:
            self._applying_remote = False
        self.changed_ms = changed_ms
