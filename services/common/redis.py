"""Async Redis connections with timeouts short enough to fail closed, not hang."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What "Redis is unreachable" looks like to callers; anything else is a bug.
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def connect_redis(url: str, timeout_s: float = 2.0) -> Redis:
    """A pooled client; connections are opened lazily, so this never blocks."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        # Callers decide about retries (and fail closed); hidden retries would multiply the
        # time a dead Redis holds every request.
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


async def redis_alive(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except REDIS_DOWN_ERRORS:
        return False
