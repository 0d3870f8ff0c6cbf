"""The gateway's edge with the real auth service: every call authorized by auth (leased
verdicts charged in batches), refusals passed through with their details, admin calls for
admins only, fail closed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.redis import connect_redis
from services.common.testing import error_details, insecure_channel, running_service
from services.gateway.authn import CHARGE_DEADLINE_S, AuthenticationInterceptor
from services.gateway.downstream import Downstream, RetryBudget
from services.gateway.service import GatewayService
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.auth.conftest import ADMIN
from tests.gateway.conftest import Edge, gateway_settings

CHARGES = "speechmesh_gateway_auth_lease_charges_total"
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


async def refused(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def test_calls_without_a_valid_credential_are_refused(edge: Edge) -> None:
    request = gateway_pb2.ListLanguagesRequest()
    error = await refused(edge.public.ListLanguages(request), grpc.StatusCode.UNAUTHENTICATED)
    assert error_details(error)["ErrorInfo"].reason == "CREDENTIALS_MISSING"
    error = await refused(
        edge.public.ListLanguages(request, metadata=(("x-api-key", "smk_0123456789abcdef_x"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_details(error)["ErrorInfo"].reason == "API_KEY_INVALID"
    await refused(
        edge.public.ListLanguages(request, metadata=(("authorization", "Bearer not.a.jwt"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_quota_is_charged_per_request_and_reported(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_FREE)
    call = edge.public.ListLanguages(
        gateway_pb2.ListLanguagesRequest(), metadata=(("x-api-key", key),)
    )
    await call
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-ratelimit-remaining-minute"] == "9"
    assert trailing["x-ratelimit-remaining-day"] == "999"
    assert len(trailing["x-request-id"]) == 32
    for _ in range(9):
        await edge.public.ListLanguages(
            gateway_pb2.ListLanguagesRequest(), metadata=(("x-api-key", key),)
        )
    error = await refused(
        edge.public.ListLanguages(
            gateway_pb2.ListLanguagesRequest(), metadata=(("x-api-key", key),)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    details = error_details(error)
    assert details["ErrorInfo"].reason == "RATE_LIMITED"
    assert 50 < details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() <= 60
    assert details["QuotaFailure"].violations[0].subject.startswith("key:")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def leased() -> float:
    return sample("speechmesh_gateway_auth_leased_total")


async def requests_today(edge: Edge, key: str) -> int:
    """What auth has charged the key today."""
    async with insecure_channel(edge.auth.port) as channel:
        usage = await auth_pb2_grpc.AuthServiceStub(channel).GetUsage(
            auth_pb2.GetUsageRequest(key_id=key.split("_")[1]), metadata=ADMIN
        )
    return usage.key.requests_today


async def test_a_known_credential_is_leased_and_its_calls_charged_in_batches(
    edge: Edge,
) -> None:
    key = await edge.create_key(auth_pb2.TIER_PRO)  # 200 a minute
    meta = (("x-api-key", key),)
    before, charges = leased(), sample(CHARGES, outcome="charged")
    await edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
    assert leased() == before  # first call: auth's verdict asked for
    for expected_remaining in range(198, 178, -1):
        call = edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
        await call
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-ratelimit-remaining-minute"] == str(expected_remaining)
    assert leased() == before + 20
    # Charged within a charge interval or two (0.2 s), and in fewer calls than calls made.
    for _ in range(50):
        if await requests_today(edge, key) == 21:
            break
        await asyncio.sleep(0.05)
    assert await requests_today(edge, key) == 21
    assert 1 <= sample(CHARGES, outcome="charged") - charges < 20


async def test_revoking_through_the_gateway_ends_the_lease_at_once(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_PRO)
    meta = (("x-api-key", key),)
    for _ in range(2):
        await edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
    await edge.admin.RevokeApiKey(
        gateway_pb2.RevokeApiKeyRequest(key_id=key.split("_")[1]), metadata=ADMIN
    )
    error = await refused(
        edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_details(error)["ErrorInfo"].reason == "API_KEY_REVOKED"


async def test_a_revocation_announced_by_auth_ends_the_lease(
    edge: Edge, redis_url: str, redis_prefix: str
) -> None:
    """Revoked at auth directly (as another replica's admin call would be): the lease, long
    and not due a charge, ends when auth's announcement arrives."""
    settings = gateway_settings(
        redis_url,
        redis_prefix,
        auth_target=f"127.0.0.1:{edge.auth.port}",
        auth_lease_s=60.0,
        auth_charge_interval_s=60.0,
    )
    key = await edge.create_key(auth_pb2.TIER_PRO)
    meta = (("x-api-key", key),)
    async with (
        running_service(GatewayService(settings), settings) as gateway,
        insecure_channel(gateway.port) as channel,
        insecure_channel(edge.auth.port) as auth_channel,
    ):
        public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
        before = leased()
        for _ in range(2):
            await public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
        assert leased() == before + 1
        await auth_pb2_grpc.AuthServiceStub(auth_channel).RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(key_id=key.split("_")[1]), metadata=ADMIN
        )
        await asyncio.sleep(0.2)  # the announcement's way through Redis
        await refused(
            public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert leased() == before + 1


async def test_a_lease_never_admits_past_the_quota(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_FREE)  # 10 a minute
    meta = (("x-api-key", key),)
    before = leased()
    for _ in range(10):
        await edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
    assert leased() == before + 9
    # The 11th goes to auth, after the leased calls were charged: auth refuses it.
    error = await refused(
        edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert error_details(error)["ErrorInfo"].reason == "RATE_LIMITED"
    assert await requests_today(edge, key) == 10


async def test_concurrent_first_calls_never_lease_past_the_quota(edge: Edge) -> None:
    """Calls that reach auth together are charged in an order the gateway cannot see; the
    lease leaves room for those still waiting, so a burst gets exactly the quota."""
    key = await edge.create_key(auth_pb2.TIER_FREE)  # 10 a minute
    meta = (("x-api-key", key),)

    async def call() -> bool:
        try:
            await edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            return False
        return True

    async def staggered(index: int) -> bool:
        await asyncio.sleep(index * 0.0005)  # arriving while earlier verdicts are on their way
        return await call()

    admitted = sum(await asyncio.gather(*(staggered(i) for i in range(30))))
    assert admitted == 10
    assert await requests_today(edge, key) == 10


async def test_jwt_works_at_the_edge(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_PRO)
    async with insecure_channel(edge.auth.port) as channel:
        token = (
            await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                auth_pb2.IssueTokenRequest(api_key=key)
            )
        ).token
    await edge.public.ListLanguages(
        gateway_pb2.ListLanguagesRequest(), metadata=(("authorization", f"Bearer {token}"),)
    )


async def test_admin_calls_need_an_admin(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_ENTERPRISE)
    error = await refused(
        edge.admin.GetMeshStatus(
            gateway_pb2.GetMeshStatusRequest(), metadata=(("x-api-key", key),)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_details(error)["ErrorInfo"].reason == "ADMIN_REQUIRED"
    listed = await edge.admin.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=ADMIN)
    assert any(k.key_id == key.split("_")[1] for k in listed.keys)
    revoked = await edge.admin.RevokeApiKey(
        gateway_pb2.RevokeApiKeyRequest(key_id=key.split("_")[1]), metadata=ADMIN
    )
    assert revoked.key.revoked
    await refused(
        edge.public.ListLanguages(
            gateway_pb2.ListLanguagesRequest(), metadata=(("x-api-key", key),)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_mesh_status_and_breaker_reset(edge: Edge) -> None:
    status = await edge.admin.GetMeshStatus(gateway_pb2.GetMeshStatusRequest(), metadata=ADMIN)
    by_name = {d.name: d for d in status.downstreams}
    assert by_name["auth"].serving == gateway_pb2.SERVING_STATE_SERVING
    assert by_name["asr"].serving == gateway_pb2.SERVING_STATE_NOT_SERVING
    assert all(d.breaker == gateway_pb2.BREAKER_STATE_CLOSED for d in status.downstreams)
    reset = await edge.admin.ResetCircuitBreakers(
        gateway_pb2.ResetCircuitBreakersRequest(downstreams=["mt"]), metadata=ADMIN
    )
    assert len(reset.downstreams) == 3
    error = await refused(
        edge.admin.ResetCircuitBreakers(
            gateway_pb2.ResetCircuitBreakersRequest(downstreams=["nope"]), metadata=ADMIN
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "downstreams"


async def test_health_follows_required_downstreams(edge: Edge) -> None:
    async with insecure_channel(edge.gateway.port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        name = "speechmesh.gateway.v1.SpeechTranslationService"
        # asr is not running: the gateway is alive but not ready.
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == 1
        check = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_auth_down_fails_closed(edge: Edge) -> None:
    known = await edge.create_key(auth_pb2.TIER_PRO)
    unknown = await edge.create_key(auth_pb2.TIER_PRO)
    request = gateway_pb2.ListLanguagesRequest()
    for _ in range(2):  # the second leased, so there is a charge to fail
        await edge.public.ListLanguages(request, metadata=(("x-api-key", known),))
    await edge.auth.stop()
    await asyncio.sleep(0.5)  # past a charge interval: the lease's charge has failed
    # Both fail closed: a credential auth never saw, and one whose lease could not charge.
    for key in (unknown, known):
        error = await refused(
            edge.public.ListLanguages(request, metadata=(("x-api-key", key),)),
            grpc.StatusCode.UNAVAILABLE,
        )
        # The failed charges may have opened auth's breaker already.
        assert error_details(error)["ErrorInfo"].reason in {"AUTH_ERROR", "CIRCUIT_OPEN"}


async def test_bad_requests_are_refused_before_any_downstream(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_PRO)
    meta = (("x-api-key", key),)
    error = await refused(
        edge.public.TranslateText(gateway_pb2.TranslateTextRequest(texts=["hi"]), metadata=meta),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "target_language"
    error = await refused(
        edge.public.TranslateSpeech(
            gateway_pb2.TranslateSpeechRequest(target_language="pt"), metadata=meta
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "audio.content"
    error = await refused(
        edge.public.TranslateText(
            gateway_pb2.TranslateTextRequest(texts=["hi"], target_language="not a language!"),
            metadata=meta,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_invalid_utf8_is_refused_naming_the_field(edge: Edge) -> None:
    # texts[0] = b"\xff\xfe" (not UTF-8), target_language = "pt", as raw wire bytes.
    raw = b"\x0a\x02\xff\xfe" + b"\x1a\x02pt"
    call = edge.gateway_channel.unary_unary(
        "/speechmesh.gateway.v1.SpeechTranslationService/TranslateText"
    )
    error = await refused(call(raw, metadata=ADMIN), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_details(error)["BadRequest"].field_violations[0].field == "texts[0]"


async def test_shutdown_charges_every_lease_within_one_charge_deadline(
    redis_url: str, redis_prefix: str
) -> None:
    """At shutdown the leases' uncharged calls go to auth. An auth that never answers holds
    that up CHARGE_DEADLINE_S in all, not that much per lease."""
    asked: list[int] = []

    async def never_answers(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        asked.append(auth_pb2.AuthenticateRequest.FromString(request).cost)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    handler = grpc.unary_unary_rpc_method_handler(never_answers)
    silent = grpc.aio.server()
    silent.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(AUTH_SERVICE, {"Authenticate": handler}),)
    )
    port = silent.add_insecure_port("127.0.0.1:0")
    await silent.start()
    settings = gateway_settings(redis_url, redis_prefix, auth_target=f"127.0.0.1:{port}")
    auth = Downstream("auth", settings.auth_target, settings, RetryBudget(0.2))
    redis = connect_redis(redis_url)
    interceptor = AuthenticationInterceptor(auth, redis, 5.0, lease_s=60, charge_interval_s=60)
    try:
        verdict = auth_pb2.AuthenticateResponse(principal=auth_pb2.Principal(key_id="k"))
        for key in ("a", "b", "c"):
            credential = (key, "", "/m")
            interceptor.leases.grant(credential, verdict, time.monotonic())
            assert interceptor.leases.admit(credential) is not None
        began = time.monotonic()
        await interceptor.stop()
        took = time.monotonic() - began
    finally:
        await auth.close()
        await redis.aclose()
        await silent.stop(0)
    assert asked == [1, 1, 1]  # every lease's call was sent to be charged
    assert took < 2 * CHARGE_DEADLINE_S, f"shutdown took {took:.1f} s"
