"""AuthService over gRPC: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import timestamp_pb2

from services.auth.authenticator import Authenticator, Principal, QuotaState
from services.auth.settings import AuthSettings
from services.auth.store import KeyRecord
from services.auth.tiers import LIMITS
from services.common.credentials import credentials_from_metadata
from services.common.errors import FieldViolation, InvalidArgument
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc

MAX_OWNER = 128
MAX_DESCRIPTION = 512
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _timestamp(ms: int) -> timestamp_pb2.Timestamp | None:
    if not ms:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def api_key_message(record: KeyRecord, requests_today: int = 0) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        key_id=record.key_id,
        owner=record.owner,
        tier=record.tier,  # type: ignore[arg-type]
        description=record.description,
        create_time=_timestamp(record.created_ms),
        revoked=record.revoked,
        revoke_time=_timestamp(record.revoked_ms),
        last_used_time=_timestamp(record.last_used_ms),
        requests_today=requests_today,
    )


def quota_message(quota: QuotaState) -> auth_pb2.Quota:
    reset = timestamp_pb2.Timestamp()
    reset.FromDatetime(quota.day_reset.astimezone(dt.UTC).replace(tzinfo=None))
    return auth_pb2.Quota(
        minute_limit=quota.minute_limit,
        minute_remaining=quota.minute_remaining,
        day_limit=quota.day_limit,
        day_remaining=quota.day_remaining,
        day_reset_time=reset,
    )


def principal_message(principal: Principal) -> auth_pb2.Principal:
    return auth_pb2.Principal(
        key_id=principal.key_id,
        owner=principal.owner,
        tier=principal.tier,  # type: ignore[arg-type]
    )


def _validate_text(field: str, value: str, limit: int, required: bool) -> list[FieldViolation]:
    if required and not value.strip():
        return [FieldViolation(field, "required")]
    if len(value) > limit:
        return [FieldViolation(field, f"at most {limit} characters")]
    if any(not ch.isprintable() for ch in value):
        return [FieldViolation(field, "must not contain control characters")]
    return []


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, authenticator: Authenticator, settings: AuthSettings) -> None:
        self.auth = authenticator
        self.settings = settings

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        return await self.auth.identify(*credentials_from_metadata(context.invocation_metadata()))

    async def _admin(self, context: grpc.aio.ServicerContext) -> Principal:
        return await self.auth.require_admin(
            *credentials_from_metadata(context.invocation_metadata())
        )

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreateApiKeyResponse:
        await self._admin(context)
        violations = _validate_text("owner", request.owner, MAX_OWNER, required=True)
        violations += _validate_text("description", request.description, MAX_DESCRIPTION, False)
        if request.tier not in LIMITS:
            violations.append(FieldViolation("tier", "must be one of TIER_FREE..TIER_ADMIN"))
        if violations:
            raise InvalidArgument("invalid API key request", violations)
        api_key, record = await self.auth.store.create(
            request.owner.strip(), request.tier, request.description
        )
        return auth_pb2.CreateApiKeyResponse(
            key_id=record.key_id, api_key=api_key, key=api_key_message(record)
        )

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeApiKeyResponse:
        await self._admin(context)
        if not request.key_id:
            raise InvalidArgument.field("key_id", "required")
        return auth_pb2.RevokeApiKeyResponse(
            key=api_key_message(await self.auth.store.revoke(request.key_id))
        )

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListApiKeysResponse:
        await self._admin(context)
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        records, next_token = await self.auth.store.list(
            request.owner, request.include_revoked, page_size, request.page_token
        )
        return auth_pb2.ListApiKeysResponse(
            keys=[api_key_message(r) for r in records], next_page_token=next_token
        )

    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthenticateResponse:
        principal, quota = await self.auth.authenticate(
            request.api_key, request.token, request.method, request.cost
        )
        return auth_pb2.AuthenticateResponse(
            principal=principal_message(principal), quota=quota_message(quota)
        )

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        ttl = request.ttl_seconds or self.settings.token_ttl_default_s
        if not 0 < ttl <= self.settings.token_ttl_max_s:
            raise InvalidArgument.field(
                "ttl_seconds", f"must be between 1 and {self.settings.token_ttl_max_s}"
            )
        if not request.api_key:
            raise InvalidArgument.field("api_key", "required")
        principal = await self.auth.identify(api_key=request.api_key)
        token, expires = self.auth.tokens.issue(
            principal.key_id, principal.owner, principal.tier, ttl
        )
        expire_time = timestamp_pb2.Timestamp()
        expire_time.FromDatetime(expires.replace(tzinfo=None))
        return auth_pb2.IssueTokenResponse(token=token, expire_time=expire_time)

    async def GetUsage(
        self, request: auth_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetUsageResponse:
        caller = await self._caller(context)
        key_id = request.key_id or caller.key_id
        if key_id != caller.key_id and not caller.is_admin:
            await self._admin(context)
        record, today, quota = await self.auth.usage(key_id)
        return auth_pb2.GetUsageResponse(
            key=api_key_message(record, today), quota=quota_message(quota)
        )
