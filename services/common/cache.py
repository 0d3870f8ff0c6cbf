"""A best-effort Redis cache of serialized results, with TTL and hit/miss metrics.

Best-effort: Redis being slow or down makes a lookup a miss and a store a no-op, never an
error for the caller — a cache must not turn a Redis outage into a service outage.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from prometheus_client import Counter
from redis.asyncio import Redis

from services.common.redis import REDIS_DOWN_ERRORS

log = logging.getLogger("speechmesh.cache")

lookups = Counter("speechmesh_cache_lookups_total", "Cache lookups.", ["cache", "result"])
errors = Counter("speechmesh_cache_errors_total", "Cache operations Redis failed.", ["cache"])


def cache_key(*parts: str | bytes) -> str:
    """A fixed-length digest of the parts, unambiguous about where each part ends."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class RedisCache:
    def __init__(self, redis: Redis, namespace: str, ttl_s: int, name: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.name = name
        self._hit = lookups.labels(name, "hit")
        self._miss = lookups.labels(name, "miss")
        self.hits = 0  # since start, for status reports (the metrics are the durable record)
        self.misses = 0

    def _full(self, key: str) -> str:
        return f"{self.namespace}{key}"

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.ttl_s <= 0:  # disabled: nothing was stored, so skip the round trip
            return [None] * len(keys)
        if not keys:
            return []
        try:
            values: list[bytes | None] = await self.redis.mget(  # type: ignore[assignment]
                [self._full(k) for k in keys]
            )
        except REDIS_DOWN_ERRORS:
            errors.labels(self.name).inc()
            values = [None] * len(keys)
        hits = sum(v is not None for v in values)
        self._hit.inc(hits)
        self._miss.inc(len(values) - hits)
        self.hits += hits
        self.misses += len(values) - hits
        return values

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many([key]))[0]

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items or self.ttl_s <= 0:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(self._full(key), value, ex=self.ttl_s)
                await pipe.execute()
        except REDIS_DOWN_ERRORS:
            errors.labels(self.name).inc()

    async def set(self, key: str, value: bytes) -> None:
        await self.set_many([(key, value)])

    async def clear(self) -> int:
        """Deletes every entry of this cache; returns how many."""
        deleted = 0
        batch: list[str | bytes] = []
        async for key in self.redis.scan_iter(match=f"{self.namespace}*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self.redis.unlink(*batch)
        return deleted

    async def count(self, limit: int = 100_000) -> int:
        """Entries stored, counted up to `limit` (a scan, so bounded)."""
        seen = 0
        async for _ in self.redis.scan_iter(match=f"{self.namespace}*", count=1000):
            seen += 1
            if seen >= limit:
                break
        return seen
