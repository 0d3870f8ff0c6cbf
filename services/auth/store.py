"""API keys in Redis. Only an HMAC of each secret is stored; the secret is shown once.

A key looks like `smk_<key_id>_<secret>`: the id lets the store find the record in one
lookup, and the HMAC of the whole string is compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from services.common.credentials import REVOKED_KEYS_CHANNEL
from services.common.errors import InvalidArgument, NotFound, Unavailable, shown
from services.common.redis import REDIS_DOWN_ERRORS

KEY_PREFIX = "smk"
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class KeyRecord:
    key_id: str
    owner: str
    tier: int
    description: str
    key_hash: str
    created_ms: int
    revoked: bool
    revoked_ms: int
    last_used_ms: int

    @classmethod
    def from_redis(cls, key_id: str, raw: dict[bytes, bytes]) -> KeyRecord:
        def text(field: str) -> str:
            return raw.get(field.encode(), b"").decode()

        def number(field: str) -> int:
            return int(raw.get(field.encode(), b"0") or 0)

        return cls(
            key_id=key_id,
            owner=text("owner"),
            tier=number("tier"),
            description=text("description"),
            key_hash=text("hash"),
            created_ms=number("created_ms"),
            revoked=text("revoked") == "1",
            revoked_ms=number("revoked_ms"),
            last_used_ms=number("last_used_ms"),
        )


def split_api_key(api_key: str) -> str | None:
    """The key id inside a well-formed API key, else None."""
    parts = api_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not _KEY_ID.match(parts[1]) or not parts[2]:
        return None
    return parts[1]


class KeyStore:
    def __init__(
        self, redis: Redis, prefix: str, pepper: bytes, on_unavailable: Callable[[], None]
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.pepper = pepper
        self.on_unavailable = on_unavailable

    def record_key(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}keys"

    def hash_secret(self, api_key: str) -> str:
        return hmac.new(self.pepper, api_key.encode(), hashlib.sha256).hexdigest()

    def matches(self, api_key: str, record: KeyRecord) -> bool:
        return hmac.compare_digest(self.hash_secret(api_key), record.key_hash)

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Maps a Redis outage to UNAVAILABLE (fail closed) and tells health at once."""
        try:
            yield
        except REDIS_DOWN_ERRORS as exc:
            self.on_unavailable()
            raise Unavailable(
                "the credential store is unavailable",
                reason="AUTH_STORE_UNAVAILABLE",
                retry_after_s=1.0,
            ) from exc

    async def create(self, owner: str, tier: int, description: str) -> tuple[str, KeyRecord]:
        async with self.guard():
            while True:
                key_id = secrets.token_hex(8)
                api_key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
                now_ms = int(time.time() * 1000)
                record = KeyRecord(
                    key_id, owner, tier, description, self.hash_secret(api_key), now_ms, False, 0, 0
                )
                fields: dict[Any, Any] = {
                    "owner": owner,
                    "tier": tier,
                    "description": description,
                    "hash": record.key_hash,
                    "created_ms": now_ms,
                    "revoked": "0",
                }
                # HSETNX on the hash field guards the (astronomically unlikely) id collision.
                if await self.redis.hsetnx(self.record_key(key_id), "hash", record.key_hash):
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.hset(self.record_key(key_id), mapping=fields)
                        pipe.zadd(self.index_key, {key_id: now_ms})
                        await pipe.execute()
                    return api_key, record

    async def get(self, key_id: str) -> KeyRecord | None:
        async with self.guard():
            raw: dict[bytes, bytes] = await self.redis.hgetall(  # type: ignore[assignment]
                self.record_key(key_id)
            )
        return KeyRecord.from_redis(key_id, raw) if raw else None

    async def require(self, key_id: str) -> KeyRecord:
        record = await self.get(key_id) if _KEY_ID.match(key_id) else None
        if record is None:
            raise NotFound(
                f"API key {shown(key_id)} not found",
                reason="API_KEY_NOT_FOUND",
                metadata={"key_id": key_id},
            )
        return record

    async def revoke(self, key_id: str) -> KeyRecord:
        record = await self.require(key_id)
        if not record.revoked:
            record.revoked, record.revoked_ms = True, int(time.time() * 1000)
            async with self.guard():
                await self.redis.hset(
                    self.record_key(key_id),
                    mapping={"revoked": "1", "revoked_ms": record.revoked_ms},
                )
        async with self.guard():  # again for a repeated revoke: a gateway may have missed it
            await self.redis.publish(REVOKED_KEYS_CHANNEL, key_id)
        return record

    async def list(
        self, owner: str, include_revoked: bool, page_size: int, page_token: str
    ) -> tuple[list[KeyRecord], str]:
        """Keys oldest first; the page token is the creation-ordered offset to resume at."""
        offset = _decode_page_token(page_token)
        found: list[KeyRecord] = []
        async with self.guard():
            while len(found) < page_size:
                ids: list[bytes] = await self.redis.zrange(  # type: ignore[assignment]
                    self.index_key, offset, offset + 4 * page_size - 1
                )
                if not ids:
                    return found, ""
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key_id in ids:
                        pipe.hgetall(self.record_key(key_id.decode()))
                    raws = await pipe.execute()
                for key_id, raw in zip(ids, raws, strict=True):
                    offset += 1
                    if not raw:
                        continue
                    record = KeyRecord.from_redis(key_id.decode(), raw)
                    if (owner and record.owner != owner) or (
                        record.revoked and not include_revoked
                    ):
                        continue
                    found.append(record)
                    if len(found) == page_size:
                        break
            more = await self.redis.zcard(self.index_key) > offset
        return found, _encode_page_token(offset) if more else ""


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
        if kind != "o" or offset < 0:
            raise ValueError(token)
    except ValueError as exc:
        raise InvalidArgument.field("page_token", "not a token from a previous response") from exc
    return offset
