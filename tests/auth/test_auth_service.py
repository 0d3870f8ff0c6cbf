"""The auth service against a real Redis, over real gRPC."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac

import grpc
import jwt
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from services.auth.settings import DEV_HASH_PEPPER, DEV_JWT_SECRET, AuthSettings
from services.common.testing import error_details
from speechmesh.auth.v1 import auth_pb2
from tests.auth.conftest import ADMIN, AuthHarness

METHOD = "/speechmesh.gateway.v1.SpeechTranslationService/TranslateText"


async def expect_error(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def reason(error: grpc.aio.AioRpcError) -> str:
    return str(error_details(error)["ErrorInfo"].reason)


async def test_key_lifecycle(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_PRO, owner="bob")
    ok = await auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD))
    assert ok.principal.owner == "bob" and ok.principal.tier == auth_pb2.TIER_PRO
    assert ok.quota.minute_limit == 200 and ok.quota.minute_remaining == 199
    assert ok.quota.day_limit == 100_000 and ok.quota.day_remaining == 99_999

    listed = await auth.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(owner="bob"), metadata=ADMIN)
    assert [k.key_id for k in listed.keys] == [ok.principal.key_id]
    assert api_key not in str(listed), "a listing must never carry a secret"
    assert listed.keys[0].HasField("last_used_time")

    revoked = await auth.stub.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(key_id=ok.principal.key_id), metadata=ADMIN
    )
    assert revoked.key.revoked and revoked.key.HasField("revoke_time")
    error = await expect_error(
        auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(error) == "API_KEY_REVOKED"
    active = await auth.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(owner="bob"), metadata=ADMIN)
    assert not active.keys
    everything = await auth.stub.ListApiKeys(
        auth_pb2.ListApiKeysRequest(owner="bob", include_revoked=True), metadata=ADMIN
    )
    assert len(everything.keys) == 1


async def test_listing_pages(auth: AuthHarness) -> None:
    for i in range(5):
        await auth.create_key(owner=f"pager-{i % 2}")
    seen: list[str] = []
    token = ""
    while True:
        page = await auth.stub.ListApiKeys(
            auth_pb2.ListApiKeysRequest(page_size=2, page_token=token), metadata=ADMIN
        )
        seen += [k.key_id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    error = await expect_error(
        auth.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(page_token="garbage!"), metadata=ADMIN),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "page_token"


async def test_only_a_keyed_hash_is_stored(auth: AuthHarness, redis_url: str) -> None:
    api_key = await auth.create_key()
    await auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD))
    secret = api_key.split("_", 2)[2].encode()
    redis = Redis.from_url(redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{auth.service.settings.redis_prefix}*")]
        assert keys
        for key in keys:
            kind = (await redis.type(key)).decode()
            if kind == "hash":
                stored_value: object = await redis.hgetall(key)
            elif kind == "zset":
                stored_value = await redis.zrange(key, 0, -1, withscores=True)
            else:
                stored_value = await redis.get(key)
            assert secret not in repr(stored_value).encode()
        key_id = api_key.split("_")[1]
        stored = await redis.hget(f"{auth.service.settings.redis_prefix}key:{key_id}", "hash")
        pepper = DEV_HASH_PEPPER.encode()
        assert stored == hmac.new(pepper, api_key.encode(), hashlib.sha256).hexdigest().encode()
    finally:
        await redis.aclose()


async def test_free_tier_is_exact_under_50_concurrent_callers(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_FREE)
    request = auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD)
    results = await asyncio.gather(
        *(auth.stub.Authenticate(request) for _ in range(50)), return_exceptions=True
    )
    allowed = [r for r in results if isinstance(r, auth_pb2.AuthenticateResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(allowed) == 10 and len(refused) == 40
    assert sorted(r.quota.minute_remaining for r in allowed) == list(range(10))
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(error)
        assert details["ErrorInfo"].reason == "RATE_LIMITED"
        delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
        assert 55 < delay <= 60, delay
        violation = details["QuotaFailure"].violations[0]
        assert violation.subject == f"key:{allowed[0].principal.key_id}"
        assert "10 requests per minute" in violation.description


async def test_eleventh_call_in_a_minute_is_refused_with_the_right_retry(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_FREE)
    request = auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD)
    first = dt.datetime.now(dt.UTC)
    await auth.stub.Authenticate(request)
    await asyncio.sleep(1.0)
    for _ in range(9):
        await auth.stub.Authenticate(request)
    error = await expect_error(auth.stub.Authenticate(request), grpc.StatusCode.RESOURCE_EXHAUSTED)
    delay = error_details(error)["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
    # The first call leaves the window 60 s after it was made; that is when to retry.
    expected = 60 - (dt.datetime.now(dt.UTC) - first).total_seconds()
    assert abs(delay - expected) < 0.5, (delay, expected)


async def test_cost_is_charged_and_bounded(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_FREE)
    ok = await auth.stub.Authenticate(
        auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD, cost=7)
    )
    assert ok.quota.minute_remaining == 3
    await expect_error(
        auth.stub.Authenticate(
            auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD, cost=4)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    error = await expect_error(
        auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key, cost=5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "cost"


async def test_daily_quota_resets_at_utc_midnight(auth: AuthHarness, redis_url: str) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_FREE)
    key_id = api_key.split("_")[1]
    today = dt.datetime.now(dt.UTC)
    redis = Redis.from_url(redis_url)
    try:
        # 999 of today's 1,000 already spent (set directly: a day is too long to wait for).
        day_key = f"{auth.service.settings.redis_prefix}day:{key_id}:{today:%Y%m%d}"
        await redis.set(day_key, 999)
        request = auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD)
        last = await auth.stub.Authenticate(request)
        assert last.quota.day_remaining == 0
        error = await expect_error(
            auth.stub.Authenticate(request), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        details = error_details(error)
        assert details["ErrorInfo"].reason == "DAILY_QUOTA_EXCEEDED"
        midnight = (today + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
        assert abs(delay - (midnight - today).total_seconds()) < 5
        assert last.quota.day_reset_time.ToDatetime(dt.UTC) == midnight
        assert "1000 requests per day" in details["QuotaFailure"].violations[0].description
        assert (
            0 < await redis.pttl(day_key) <= (midnight - today).total_seconds() * 1000 + 3_700_000
        )
    finally:
        await redis.aclose()


async def test_usage_tracks_requests_today_and_last_use(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_BASIC)
    for _ in range(3):
        await auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key, method=METHOD))
    own = await auth.stub.GetUsage(auth_pb2.GetUsageRequest(), metadata=(("x-api-key", api_key),))
    assert own.key.requests_today == 3 and own.quota.minute_remaining == 47
    assert own.key.HasField("last_used_time")
    other = await auth.create_key()
    await expect_error(
        auth.stub.GetUsage(
            auth_pb2.GetUsageRequest(key_id=other.split("_")[1]), metadata=(("x-api-key", api_key),)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    by_admin = await auth.stub.GetUsage(
        auth_pb2.GetUsageRequest(key_id=own.key.key_id), metadata=ADMIN
    )
    assert by_admin.key.requests_today == 3


async def test_jwt_issue_verify_and_refusals(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_BASIC)
    issued = await auth.stub.IssueToken(auth_pb2.IssueTokenRequest(api_key=api_key, ttl_seconds=60))
    lifetime = issued.expire_time.ToDatetime(dt.UTC) - dt.datetime.now(dt.UTC)
    assert 55 < lifetime.total_seconds() <= 60
    ok = await auth.stub.Authenticate(
        auth_pb2.AuthenticateRequest(token=issued.token, method=METHOD)
    )
    assert ok.principal.key_id == api_key.split("_")[1]
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "HS256"

    claims = jwt.decode(issued.token, options={"verify_signature": False})
    now = dt.datetime.now(dt.UTC)
    forged = {
        "expired": jwt.encode(
            {**claims, "iat": now - dt.timedelta(hours=2), "exp": now - dt.timedelta(hours=1)},
            DEV_JWT_SECRET,
            algorithm="HS256",
        ),
        "wrong-alg": jwt.encode(claims, DEV_JWT_SECRET, algorithm="HS512"),
        "alg-none": jwt.encode(claims, None, algorithm="none"),
        "other-key": jwt.encode(claims, "another-secret-another-secret-xx", algorithm="HS256"),
        "tampered": issued.token[:-4] + ("AAAA" if not issued.token.endswith("AAAA") else "BBBB"),
        "wrong-audience": jwt.encode(
            {**claims, "aud": "elsewhere"}, DEV_JWT_SECRET, algorithm="HS256"
        ),
    }
    for name, token in forged.items():
        error = await expect_error(
            auth.stub.Authenticate(auth_pb2.AuthenticateRequest(token=token, method=METHOD)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert reason(error) == ("TOKEN_EXPIRED" if name == "expired" else "TOKEN_INVALID"), name

    await auth.stub.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(key_id=ok.principal.key_id), metadata=ADMIN
    )
    error = await expect_error(
        auth.stub.Authenticate(auth_pb2.AuthenticateRequest(token=issued.token, method=METHOD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(error) == "API_KEY_REVOKED"


async def test_token_lifetime_is_bounded(auth: AuthHarness) -> None:
    api_key = await auth.create_key()
    error = await expect_error(
        auth.stub.IssueToken(auth_pb2.IssueTokenRequest(api_key=api_key, ttl_seconds=86_400)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "ttl_seconds"
    await expect_error(
        auth.stub.IssueToken(auth_pb2.IssueTokenRequest(api_key="smk_0123456789abcdef_nope")),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_admin_rpcs_need_an_admin(auth: AuthHarness) -> None:
    api_key = await auth.create_key(auth_pb2.TIER_ENTERPRISE)
    user = (("x-api-key", api_key),)
    request = auth_pb2.CreateApiKeyRequest(owner="mallory", tier=auth_pb2.TIER_ADMIN)
    error = await expect_error(
        auth.stub.CreateApiKey(request, metadata=user), grpc.StatusCode.PERMISSION_DENIED
    )
    assert reason(error) == "ADMIN_REQUIRED"
    await expect_error(auth.stub.CreateApiKey(request), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(
        auth.stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=user),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        auth.stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id="0" * 16), metadata=user),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    admin_method = "/speechmesh.gateway.v1.AdminService/ClearCache"
    await expect_error(
        auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key, method=admin_method)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # An admin key created through the API works like the bootstrap one.
    admin = await auth.create_key(auth_pb2.TIER_ADMIN, owner="ops")
    created = await auth.stub.CreateApiKey(request, metadata=(("x-api-key", admin),))
    assert created.key.tier == auth_pb2.TIER_ADMIN
    token = (await auth.stub.IssueToken(auth_pb2.IssueTokenRequest(api_key=admin))).token
    await auth.stub.ListApiKeys(
        auth_pb2.ListApiKeysRequest(), metadata=(("authorization", f"Bearer {token}"),)
    )


async def test_bad_requests_are_refused_with_field_violations(auth: AuthHarness) -> None:
    error = await expect_error(
        auth.stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(owner=" ", description="x\x00y"), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {v.field for v in error_details(error)["BadRequest"].field_violations}
    assert fields == {"owner", "description", "tier"}
    await expect_error(
        auth.stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id="nope"), metadata=ADMIN),
        grpc.StatusCode.NOT_FOUND,
    )
    error = await expect_error(
        auth.stub.Authenticate(auth_pb2.AuthenticateRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    assert reason(error) == "CREDENTIALS_MISSING"
    for bad in ("", "smk_zz_x", "smk_0123456789abcdef_", "x" * 5000):
        await expect_error(
            auth.stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=bad + "!", method=METHOD)),
            grpc.StatusCode.UNAUTHENTICATED,
        )


def test_production_refuses_default_secrets() -> None:
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        AuthSettings(environment="production")
    with pytest.raises(ValidationError, match="HASH_PEPPER"):
        AuthSettings(environment="production", jwt_secret="s" * 40)
    AuthSettings(environment="production", jwt_secret="s" * 40, hash_pepper="p" * 40)
