"""The translation cache: one Redis entry per (model leg, beam, sentence), best-effort.

Entries are keyed by what decides a model's output: the model's name and build, the
language pair, the beam width and the sentence as the model sees it (protected spans
already replaced by placeholders, so a glossary target never leaks between requests).
Lookups are one MGET per leg; stores run in the background so a slow Redis costs a caller
at most one lookup timeout, and an unreachable one only misses (see
services.common.cache).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from redis.asyncio import Redis

from services.common.cache import RedisCache, cache_key


class TranslationCache:
    def __init__(self, redis: Redis, prefix: str, ttl_s: int) -> None:
        self._cache = RedisCache(redis, f"{prefix}tr:", ttl_s, "mt")
        self._writes: set[asyncio.Task[None]] = set()

    @staticmethod
    def key(model: str, version: str, source: str, target: str, beam: int, text: str) -> str:
        return cache_key(model, version, source, target, str(beam), text)

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        values = await self._cache.get_many(keys)
        return [None if value is None else value.decode() for value in values]

    def put_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Stores in the background; the caller already has its answer."""
        if not items:
            return
        task = asyncio.create_task(
            self._cache.set_many([(key, text.encode()) for key, text in items])
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Waits for the stores in flight (at shutdown, so none is lost mid-write)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
