"""Who is calling, may they call this, and have they calls left: the auth domain logic."""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass

from prometheus_client import Counter

from services.auth.limiter import Admission, Limiter, Outcome, next_utc_midnight
from services.auth.store import KeyRecord, KeyStore, split_api_key
from services.auth.tiers import LIMITS, TierLimits, is_admin_method, tier_name
from services.auth.tokens import TokenIssuer
from services.common.errors import (
    InvalidArgument,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
)
from speechmesh.auth.v1 import auth_pb2

BOOTSTRAP_ADMIN_ID = "bootstrap-admin"
MAX_COST = 1000

authentications = Counter(
    "speechmesh_auth_authenticate_total", "Authenticate outcomes.", ["result"]
)
quota_rejections = Counter(
    "speechmesh_auth_quota_rejections_total",
    "Calls refused for a rate limit or daily quota.",
    ["tier", "limit"],
)


@dataclass(frozen=True)
class Principal:
    key_id: str
    owner: str
    tier: int

    @property
    def is_admin(self) -> bool:
        return self.tier == auth_pb2.TIER_ADMIN


@dataclass(frozen=True)
class QuotaState:
    minute_limit: int
    minute_remaining: int
    day_limit: int
    day_remaining: int
    day_reset: dt.datetime

    @classmethod
    def after(
        cls, limits: TierLimits, minute_used: int, day_used: int, reset: dt.datetime
    ) -> QuotaState:
        return cls(
            minute_limit=limits.per_minute,
            minute_remaining=max(0, limits.per_minute - minute_used) if limits.per_minute else 0,
            day_limit=limits.per_day,
            day_remaining=max(0, limits.per_day - day_used) if limits.per_day else 0,
            day_reset=reset,
        )


def _principal(record: KeyRecord) -> Principal:
    return Principal(record.key_id, record.owner, record.tier)


class Authenticator:
    def __init__(
        self, store: KeyStore, limiter: Limiter, tokens: TokenIssuer, admin_key: str | None
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.tokens = tokens
        self._admin_key_hash = store.hash_secret(admin_key) if admin_key else None

    def _is_bootstrap_admin(self, api_key: str) -> bool:
        return self._admin_key_hash is not None and hmac.compare_digest(
            self.store.hash_secret(api_key), self._admin_key_hash
        )

    async def identify(self, api_key: str = "", token: str = "") -> Principal:
        """Checks a credential without charging anything."""
        if api_key and token:
            raise InvalidArgument.field("token", "set api_key or token, not both")
        if api_key:
            if self._is_bootstrap_admin(api_key):
                return Principal(BOOTSTRAP_ADMIN_ID, "bootstrap", auth_pb2.TIER_ADMIN)
            key_id = split_api_key(api_key)
            record = await self.store.get(key_id) if key_id else None
            if record is None or not self.store.matches(api_key, record):
                raise Unauthenticated("API key invalid", reason="API_KEY_INVALID")
        elif token:
            claims = self.tokens.verify(token)
            record = await self.store.get(claims.key_id)
            if record is None:
                raise Unauthenticated("token invalid", reason="TOKEN_INVALID")
        else:
            raise Unauthenticated(
                "no credential: send x-api-key or authorization: Bearer <token>",
                reason="CREDENTIALS_MISSING",
            )
        if record.revoked:
            raise Unauthenticated(
                "API key revoked", reason="API_KEY_REVOKED", metadata={"key_id": record.key_id}
            )
        return _principal(record)

    async def authenticate(
        self, api_key: str, token: str, method: str, cost: int
    ) -> tuple[Principal, QuotaState]:
        """Identifies the caller, checks the method is allowed, and charges `cost`: one Redis
        round trip for the whole decision."""
        if cost < 0 or cost > MAX_COST:
            raise InvalidArgument.field("cost", f"must be between 0 and {MAX_COST}")
        try:
            principal, quota = await self._admit(api_key, token, method, cost or 1)
        except ServiceError as exc:
            authentications.labels(exc.reason.lower()).inc()
            raise
        authentications.labels("ok").inc()
        return principal, quota

    async def _admit(
        self, api_key: str, token: str, method: str, cost: int
    ) -> tuple[Principal, QuotaState]:
        admin_required = is_admin_method(method)
        if api_key and token:
            raise InvalidArgument.field("token", "set api_key or token, not both")
        if api_key and self._is_bootstrap_admin(api_key):
            principal = Principal(BOOTSTRAP_ADMIN_ID, "bootstrap", auth_pb2.TIER_ADMIN)
            reset = next_utc_midnight(dt.datetime.now(dt.UTC))
            return principal, QuotaState.after(LIMITS[auth_pb2.TIER_ADMIN], 0, 0, reset)
        if api_key:
            key_id, presented = split_api_key(api_key), self.store.hash_secret(api_key)
            if key_id is None:
                raise Unauthenticated("API key invalid", reason="API_KEY_INVALID")
        elif token:
            key_id, presented = self.tokens.verify(token).key_id, ""
        else:
            raise Unauthenticated(
                "no credential: send x-api-key or authorization: Bearer <token>",
                reason="CREDENTIALS_MISSING",
            )
        async with self.store.guard():
            admission = await self.limiter.admit(
                key_id, self.store.record_key(key_id), presented, admin_required, cost
            )
        principal = Principal(key_id, admission.owner, admission.tier)
        match admission.outcome:
            case Outcome.OK:
                limits = LIMITS[admission.tier]
                return principal, QuotaState.after(
                    limits, admission.minute_used, admission.day_used, admission.day_reset
                )
            case Outcome.UNKNOWN | Outcome.INVALID if token:
                raise Unauthenticated("token invalid", reason="TOKEN_INVALID")
            case Outcome.UNKNOWN | Outcome.INVALID:
                raise Unauthenticated("API key invalid", reason="API_KEY_INVALID")
            case Outcome.REVOKED:
                raise Unauthenticated(
                    "API key revoked", reason="API_KEY_REVOKED", metadata={"key_id": key_id}
                )
            case Outcome.FORBIDDEN:
                raise PermissionDenied(
                    f"{method} needs an admin key",
                    reason="ADMIN_REQUIRED",
                    metadata={"key_id": key_id, "method": method},
                )
            case _:
                raise self._refusal(principal, admission)

    @staticmethod
    def _refusal(principal: Principal, admission: Admission) -> ResourceExhausted:
        tier = tier_name(principal.tier)
        limits = LIMITS[principal.tier]
        quota_rejections.labels(tier, admission.outcome.value).inc()
        if admission.outcome is Outcome.MINUTE_LIMIT:
            limit, reason, what = limits.per_minute, "RATE_LIMITED", "requests per minute"
        else:
            limit, reason, what = limits.per_day, "DAILY_QUOTA_EXCEEDED", "requests per day (UTC)"
        return ResourceExhausted(
            f"{tier} tier allows {limit} {what}; retry in {admission.retry_after_s:.1f}s",
            reason=reason,
            retry_after_s=admission.retry_after_s,
            violations=[QuotaViolation(f"key:{principal.key_id}", f"{tier} tier: {limit} {what}")],
            metadata={"key_id": principal.key_id, "tier": tier, "limit": str(limit)},
        )

    async def require_admin(self, api_key: str, token: str) -> Principal:
        principal = await self.identify(api_key, token)
        if not principal.is_admin:
            raise PermissionDenied(
                "this call needs an admin key",
                reason="ADMIN_REQUIRED",
                metadata={"key_id": principal.key_id},
            )
        return principal

    async def usage(self, key_id: str) -> tuple[KeyRecord, int, QuotaState]:
        record = await self.store.require(key_id)
        limits = LIMITS[record.tier]
        async with self.store.guard():
            today = await self.limiter.requests_today(key_id)
            minute = await self.limiter.minute_used(key_id)
        reset = next_utc_midnight(dt.datetime.now(dt.UTC))
        return record, today, QuotaState.after(limits, minute, today, reset)
