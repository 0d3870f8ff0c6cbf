"""Admission in one Redis round trip: check the key, then charge its rate limit (sliding
window log) and daily quota, atomically.

The window is a sorted set of charges scored by Redis's own clock, so every auth replica
sees the same time. Each member carries its cost; a running sum beside it avoids summing
the set on every call. A refusal says exactly when enough cost leaves the window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from redis.asyncio import Redis

from services.auth.tiers import ADMIN_TIER, LIMITS

WINDOW_MS = 60_000

# KEYS: key record hash, window zset, window meta hash (sum, seq), day counter
# ARGV: presented HMAC ("" when a verified token stands in for it), admin required (0/1),
#       cost, ms to UTC midnight, window ms, admin tier, then per tier 1..n: minute, day limit
# Returns {outcome, tier, owner, minute_used, day_used, retry_after_ms}
_ADMIT = """
local record = redis.call('HMGET', KEYS[1], 'hash', 'tier', 'owner', 'revoked')
if not record[1] then return {'unknown', 0, '', 0, 0, 0} end
local presented = ARGV[1]
if presented ~= '' then
  -- Constant time: every byte is compared whatever the first difference.
  local stored = record[1]
  if #stored ~= #presented then return {'invalid', 0, '', 0, 0, 0} end
  local diff = 0
  for i = 1, #stored do
    diff = bit.bor(diff, bit.bxor(string.byte(stored, i), string.byte(presented, i)))
  end
  if diff ~= 0 then return {'invalid', 0, '', 0, 0, 0} end
end
local tier = tonumber(record[2])
local owner = record[3]
if record[4] == '1' then return {'revoked', tier, owner, 0, 0, 0} end
if ARGV[2] == '1' and tier ~= tonumber(ARGV[6]) then return {'forbidden', tier, owner, 0, 0, 0} end

local cost = tonumber(ARGV[3])
local to_midnight = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local minute_limit = tonumber(ARGV[5 + 2 * tier]) or 0
local day_limit = tonumber(ARGV[6 + 2 * tier]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local used = 0
if minute_limit > 0 then
  used = tonumber(redis.call('HGET', KEYS[3], 'sum') or '0')
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if #expired > 0 then
    for _, member in ipairs(expired) do
      used = used - tonumber(string.match(member, ':(%d+)$'))
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
    if used < 0 then used = 0 end
    redis.call('HSET', KEYS[3], 'sum', used)
  end
end
local day_used = tonumber(redis.call('GET', KEYS[4]) or '0')

if minute_limit > 0 and used + cost > minute_limit then
  local need = used + cost - minute_limit
  local retry = window
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #entries, 2 do
    freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
    if freed >= need then
      retry = tonumber(entries[i + 1]) + window - now
      break
    end
  end
  return {'minute', tier, owner, used, day_used, retry}
end
if day_limit > 0 and day_used + cost > day_limit then
  return {'day', tier, owner, used, day_used, to_midnight}
end

if minute_limit > 0 then
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  redis.call('ZADD', KEYS[2], now, seq .. ':' .. cost)
  redis.call('HINCRBY', KEYS[3], 'sum', cost)
  redis.call('PEXPIRE', KEYS[2], window)
  redis.call('PEXPIRE', KEYS[3], window)
  used = used + cost
end
day_used = redis.call('INCRBY', KEYS[4], cost)
redis.call('PEXPIRE', KEYS[4], to_midnight + 3600000)
redis.call('HSET', KEYS[1], 'last_used_ms', now)
return {'ok', tier, owner, used, day_used, 0}
"""

# Limits in tier order, as the script reads them (tier n at ARGV[5+2n], ARGV[6+2n]).
_LIMIT_ARGS = [
    value
    for tier in range(1, max(LIMITS) + 1)
    for value in (LIMITS[tier].per_minute, LIMITS[tier].per_day)
]


class Outcome(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"  # no such key
    INVALID = "invalid"  # the secret does not match
    REVOKED = "revoked"
    FORBIDDEN = "forbidden"  # an admin method, and not an admin key
    MINUTE_LIMIT = "minute"
    DAY_LIMIT = "day"


@dataclass(frozen=True)
class Admission:
    outcome: Outcome
    tier: int
    owner: str
    minute_used: int
    day_used: int
    retry_after_s: float
    day_reset: dt.datetime


def next_utc_midnight(now: dt.datetime) -> dt.datetime:
    return (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


class Limiter:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._admit = redis.register_script(_ADMIT)

    def day_key(self, key_id: str, day: dt.date) -> str:
        return f"{self.prefix}day:{key_id}:{day:%Y%m%d}"

    async def admit(
        self, key_id: str, record_key: str, presented_hash: str, admin_required: bool, cost: int
    ) -> Admission:
        """Checks the key (and its secret's HMAC, unless empty) and charges `cost`."""
        now = dt.datetime.now(dt.UTC)
        reset = next_utc_midnight(now)
        to_midnight_ms = int((reset - now).total_seconds() * 1000)
        outcome, tier, owner, minute_used, day_used, retry_ms = await self._admit(
            keys=[
                record_key,
                f"{self.prefix}rl:{key_id}",
                f"{self.prefix}rlmeta:{key_id}",
                self.day_key(key_id, now.date()),
            ],
            args=[
                presented_hash,
                int(admin_required),
                cost,
                to_midnight_ms,
                WINDOW_MS,
                ADMIN_TIER,
                *_LIMIT_ARGS,
            ],
        )
        return Admission(
            outcome=Outcome(outcome.decode()),
            tier=int(tier),
            owner=owner.decode(),
            minute_used=int(minute_used),
            day_used=int(day_used),
            retry_after_s=int(retry_ms) / 1000,
            day_reset=reset,
        )

    async def requests_today(self, key_id: str) -> int:
        value = await self.redis.get(self.day_key(key_id, dt.datetime.now(dt.UTC).date()))
        return int(value or 0)

    async def minute_used(self, key_id: str) -> int:
        """Cost charged in the last minute (read-only, may include entries about to expire)."""
        now_s, now_us = await self.redis.time()
        now_ms = now_s * 1000 + now_us // 1000
        members: list[bytes] = await self.redis.zrangebyscore(  # type: ignore[assignment]
            f"{self.prefix}rl:{key_id}", now_ms - WINDOW_MS + 1, "+inf"
        )
        return sum(int(m.rsplit(b":", 1)[1]) for m in members)
