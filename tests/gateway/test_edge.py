"""The gateway's edge with the real auth service: every call authenticated, refusals
passed through with their details, admin calls for admins only, fail closed."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.testing import error_details, insecure_channel
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2
from tests.auth.conftest import ADMIN
from tests.gateway.conftest import Edge


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


def overlapped(verdict: str) -> float:
    value = REGISTRY.get_sample_value(
        "speechmesh_gateway_auth_overlapped_total", {"verdict": verdict}
    )
    return value or 0.0


async def test_a_known_credential_runs_while_auth_checks_and_a_refusal_still_wins(
    edge: Edge,
) -> None:
    key = await edge.create_key(auth_pb2.TIER_PRO)
    meta = (("x-api-key", key),)
    admitted, refused_late = overlapped("admitted"), overlapped("refused")
    await edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
    assert overlapped("admitted") == admitted  # first call: authenticated before the handler
    call = edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
    await call
    assert overlapped("admitted") == admitted + 1
    assert dict(await call.trailing_metadata())["x-ratelimit-remaining-minute"] == "198"

    await edge.admin.RevokeApiKey(
        gateway_pb2.RevokeApiKeyRequest(key_id=key.split("_")[1]), metadata=ADMIN
    )
    # The handler would refuse this target as INVALID_ARGUMENT; auth's verdict wins, and
    # says nothing about the request to a caller it does not know.
    bad_target = gateway_pb2.TranslateTextRequest(texts=["hi"], target_language="not a language!")
    error = await refused(
        edge.public.TranslateText(bad_target, metadata=meta), grpc.StatusCode.UNAUTHENTICATED
    )
    assert error_details(error)["ErrorInfo"].reason == "API_KEY_REVOKED"
    assert overlapped("refused") == refused_late + 1
    await refused(
        edge.public.TranslateText(bad_target, metadata=meta), grpc.StatusCode.UNAUTHENTICATED
    )
    assert overlapped("refused") == refused_late + 1  # refused once: authenticated first again


async def test_a_spent_quota_is_never_overlapped(edge: Edge) -> None:
    key = await edge.create_key(auth_pb2.TIER_FREE)  # 10 a minute
    meta = (("x-api-key", key),)
    admitted, refused_late = overlapped("admitted"), overlapped("refused")
    for _ in range(10):
        await edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta)
    assert overlapped("admitted") == admitted + 9
    await refused(
        edge.public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=meta),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert overlapped("refused") == refused_late


async def test_jwt_works_at_the_edge(edge: Edge) -> None:
    from speechmesh.auth.v1 import auth_pb2_grpc

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
    await edge.public.ListLanguages(request, metadata=(("x-api-key", known),))
    await edge.auth.stop()
    # Both paths fail closed: authenticated first (unknown) and overlapped (known).
    for key in (unknown, known):
        error = await refused(
            edge.public.ListLanguages(request, metadata=(("x-api-key", key),)),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error_details(error)["ErrorInfo"].reason == "AUTH_ERROR"


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
