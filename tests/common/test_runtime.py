"""The shared runtime on a real server: error mapping, request ids, metrics, size limits,
streaming handlers, and readiness."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.errors import FieldViolation, InvalidArgument, ResourceExhausted
from services.common.logs import JsonFormatter
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from services.common.testing import error_details, insecure_channel, running_service


class ProbeService(GrpcService):
    """A minimal service with raw-bytes methods that misbehave on request."""

    name = "probe"
    service_names = ("test.Probe",)

    def __init__(self) -> None:
        super().__init__()
        self.ready = True

    async def is_ready(self) -> bool:
        return self.ready

    def add_to_server(self, server: grpc.aio.Server) -> None:
        async def echo(request: bytes, context: Any) -> bytes:
            if request == b"crash":
                raise RuntimeError("secret database password in a stack trace")
            if request == b"invalid":
                raise InvalidArgument("bad input", [FieldViolation("audio", "empty")])
            if request == b"busy":
                raise ResourceExhausted("queue full", reason="QUEUE_FULL", retry_after_s=0.25)
            return request

        async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
            for i in range(int(request)):
                yield str(i).encode()
            raise InvalidArgument.field("n", "ran out")

        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Probe",
                    {
                        "Echo": grpc.unary_unary_rpc_method_handler(echo),
                        "Count": grpc.unary_stream_rpc_method_handler(count),
                    },
                ),
            )
        )


def settings() -> ServiceSettings:
    return ServiceSettings(
        host="127.0.0.1", metrics_port=-1, health_interval_s=0.1, max_message_bytes=1024
    )


@pytest.fixture
async def probe() -> AsyncIterator[tuple[ProbeService, grpc.aio.Channel]]:
    service = ProbeService()
    async with running_service(service, settings()) as runtime:
        async with insecure_channel(runtime.port) as channel:
            yield service, channel


async def call(channel: grpc.aio.Channel, payload: bytes, **kwargs: Any) -> Any:
    return await channel.unary_unary("/test.Probe/Echo")(payload, **kwargs)


async def test_unexpected_errors_become_internal_without_internals(probe: Any, caplog: Any) -> None:
    _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, b"crash", metadata=(("x-request-id", "req-42"),))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "password" not in caught.value.details()
    assert "req-42" in caught.value.details()
    assert error_details(caught.value)["ErrorInfo"].metadata["request_id"] == "req-42"
    assert any("password" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_domain_errors_carry_code_and_details(probe: Any) -> None:
    _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, b"invalid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = error_details(caught.value)["BadRequest"].field_violations[0]
    assert (violation.field, violation.description) == ("audio", "empty")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, b"busy")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    delay = error_details(caught.value)["RetryInfo"].retry_delay
    assert delay.ToMilliseconds() == 250


async def test_request_id_is_taken_or_made_and_returned(probe: Any) -> None:
    _, channel = probe
    given = channel.unary_unary("/test.Probe/Echo")(b"hi", metadata=(("x-request-id", "abc-1"),))
    assert await given == b"hi"
    assert dict(await given.trailing_metadata())["x-request-id"] == "abc-1"
    made = channel.unary_unary("/test.Probe/Echo")(b"hi", metadata=(("x-request-id", "bad id!"),))
    await made
    request_id = dict(await made.trailing_metadata())["x-request-id"]
    assert request_id != "bad id!" and len(request_id) == 32


async def test_streaming_handlers_are_wrapped(probe: Any) -> None:
    _, channel = probe
    stream = channel.unary_stream("/test.Probe/Count")(b"3")
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in stream:
            received.append(item)
    assert received == [b"0", b"1", b"2"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_count_calls_by_code(probe: Any) -> None:
    _, channel = probe
    labels = {"grpc_service": "test.Probe", "grpc_method": "Echo", "grpc_type": "unary"}
    before = (
        REGISTRY.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}
        )
        or 0
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call(channel, b"invalid")
    after = REGISTRY.get_sample_value(
        "grpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}
    )
    assert after == before + 1
    assert REGISTRY.get_sample_value("grpc_server_handling_seconds_count", labels)


async def test_oversized_messages_are_refused(probe: Any) -> None:
    _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, b"x" * 4096)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_readiness_follows_the_service(probe: Any) -> None:
    service, channel = probe
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="test.Probe")
    updates = health.Watch(request, timeout=5)
    assert (await updates.read()).status == health_pb2.HealthCheckResponse.SERVING
    service.ready = False
    assert (await updates.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    service.ready = True
    assert (await updates.read()).status == health_pb2.HealthCheckResponse.SERVING
    updates.cancel()


def test_json_logs_carry_extra_fields() -> None:
    record = logging.makeLogRecord({"msg": "hello %s", "args": ("you",), "levelname": "INFO"})
    record.method = "/a/b"
    entry = json.loads(JsonFormatter("svc").format(record))
    assert entry["msg"] == "hello you" and entry["service"] == "svc" and entry["method"] == "/a/b"
