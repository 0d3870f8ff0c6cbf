"""Downstream calls against a real gRPC server that misbehaves on request: retries,
breakers (and their sharing through Redis), deadlines, the retry budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from services.common.errors import DeadlineExceeded, DownstreamError, Unavailable
from services.common.settings import ServiceSettings
from services.common.testing import running_service
from services.gateway.downstream import Deadline, Downstream, RetryBudget
from services.gateway.settings import GatewaySettings
from tests.common.test_runtime import ProbeService


@dataclass
class Script:
    """What the fake downstream answers next: a queue of status codes (OK when empty)."""

    codes: list[grpc.StatusCode] = field(default_factory=list)
    calls: int = 0
    seen_timeouts: list[float] = field(default_factory=list)
    seen_request_ids: list[str] = field(default_factory=list)


class ScriptedService(ProbeService):
    name = "scripted"
    service_names = ("test.Scripted",)

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script

    def add_to_server(self, server: grpc.aio.Server) -> None:
        async def answer(request: bytes, context: Any) -> bytes:
            self.script.calls += 1
            self.script.seen_timeouts.append(context.time_remaining())
            self.script.seen_request_ids.append(dict(context.invocation_metadata())["x-request-id"])
            if request == b"slow":
                await asyncio.sleep(5)
            if self.script.codes:
                code = self.script.codes.pop(0)
                await context.abort(code, f"scripted {code.name}")
            return b"ok:" + request

        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Scripted", {"Answer": grpc.unary_unary_rpc_method_handler(answer)}
                ),
            )
        )


def gateway_settings(**overrides: Any) -> GatewaySettings:
    defaults: dict[str, Any] = {
        "retry_initial_backoff_s": 0.01,
        "retry_max_backoff_s": 0.05,
        "breaker_fail_max": 3,
        "breaker_reset_s": 0.5,
    }
    return GatewaySettings(**{**defaults, **overrides})


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Script, int]]:
    script = Script()
    settings = ServiceSettings(host="127.0.0.1", metrics_port=-1, access_log=False)
    async with running_service(ScriptedService(script), settings) as runtime:
        yield script, runtime.port


def downstream(
    port: int, settings: GatewaySettings | None = None, budget: RetryBudget | None = None
) -> Downstream:
    return Downstream(
        "probe", f"127.0.0.1:{port}", settings or gateway_settings(), budget or RetryBudget(1.0)
    )


def answer(d: Downstream) -> Any:
    return d.channel.unary_unary("/test.Scripted/Answer")


def soon(seconds: float = 5.0) -> Deadline:
    return Deadline(time.monotonic() + seconds)


async def test_a_single_transient_unavailable_is_retried(scripted: tuple[Script, int]) -> None:
    script, port = scripted
    d = downstream(port)
    script.codes = [grpc.StatusCode.UNAVAILABLE]
    assert await d.call(answer(d), b"x", soon(), idempotent=False) == b"ok:x"
    assert script.calls == 2
    await d.close()


async def test_only_the_retryable_codes_are_retried(scripted: tuple[Script, int]) -> None:
    script, port = scripted
    d = downstream(port)
    script.codes = [grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(DownstreamError) as caught:
        await d.call(answer(d), b"x", soon())
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and script.calls == 1
    # DEADLINE_EXCEEDED is retried only for idempotent calls.
    script.codes, script.calls = [grpc.StatusCode.DEADLINE_EXCEEDED], 0
    with pytest.raises(DownstreamError):
        await d.call(answer(d), b"x", soon(), idempotent=False)
    assert script.calls == 1
    script.codes, script.calls = [grpc.StatusCode.DEADLINE_EXCEEDED], 0
    assert await d.call(answer(d), b"x", soon(), idempotent=True) == b"ok:x"
    assert script.calls == 2
    await d.close()


async def test_attempts_are_capped(scripted: tuple[Script, int]) -> None:
    script, port = scripted
    d = downstream(port, gateway_settings(retry_max_attempts=3, breaker_fail_max=10))
    script.codes = [grpc.StatusCode.UNAVAILABLE] * 5
    with pytest.raises(DownstreamError) as caught:
        await d.call(answer(d), b"x", soon())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and script.calls == 3
    await d.close()


async def test_the_downstream_sees_the_callers_remaining_time(scripted: tuple[Script, int]) -> None:
    script, port = scripted
    d = downstream(port)
    await d.call(answer(d), b"x", soon(2.0))
    assert 1.5 < script.seen_timeouts[-1] <= 2.0
    with pytest.raises(DownstreamError) as caught:
        await d.call(answer(d), b"slow", soon(0.3))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(DeadlineExceeded):
        await d.call(answer(d), b"x", soon(-1))
    await d.close()


async def test_retries_never_outlive_the_deadline(scripted: tuple[Script, int]) -> None:
    script, port = scripted
    d = downstream(
        port,
        gateway_settings(
            retry_max_attempts=10,
            retry_initial_backoff_s=0.2,
            retry_max_backoff_s=0.2,
            breaker_fail_max=50,
        ),
    )
    script.codes = [grpc.StatusCode.UNAVAILABLE] * 10
    started = time.monotonic()
    with pytest.raises(DownstreamError):
        await d.call(answer(d), b"x", soon(0.5))
    assert time.monotonic() - started < 0.6
    await d.close()


async def test_breaker_opens_fails_fast_then_half_opens_and_closes(
    scripted: tuple[Script, int],
) -> None:
    script, port = scripted
    d = downstream(port, gateway_settings(retry_max_attempts=1))
    for _ in range(3):
        script.codes = [grpc.StatusCode.UNAVAILABLE]
        with pytest.raises(DownstreamError):
            await d.call(answer(d), b"x", soon())
    assert d.breaker.state == "open"
    calls = script.calls
    with pytest.raises(Unavailable) as caught:
        await d.call(answer(d), b"x", soon())
    assert script.calls == calls, "an open breaker must not reach the downstream"
    assert caught.value.reason == "CIRCUIT_OPEN" and 0 < caught.value.retry_after_s <= 0.5
    await asyncio.sleep(0.55)
    assert await d.call(answer(d), b"x", soon()) == b"ok:x"  # the half-open trial succeeds
    assert d.breaker.state == "closed"
    await d.close()


async def test_callers_mistakes_never_open_the_breaker(scripted: tuple[Script, int]) -> None:
    script, port = scripted
    d = downstream(port)
    for _ in range(6):
        script.codes = [grpc.StatusCode.INVALID_ARGUMENT]
        with pytest.raises(DownstreamError):
            await d.call(answer(d), b"x", soon())
    assert d.breaker.state == "closed"
    await d.close()


async def test_retry_budget_caps_retries() -> None:
    budget = RetryBudget(ratio=0.2, floor=0)
    for _ in range(10):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]


async def test_breaker_state_is_shared_through_redis(
    scripted: tuple[Script, int], redis_url: str, redis_prefix: str
) -> None:
    script, port = scripted
    redis = Redis.from_url(redis_url)
    key = f"{redis_prefix}breaker:probe"
    replica_a = downstream(port, gateway_settings(retry_max_attempts=1, breaker_reset_s=30))
    replica_b = downstream(port, gateway_settings(retry_max_attempts=1, breaker_reset_s=30))
    try:
        for _ in range(3):
            script.codes = [grpc.StatusCode.UNAVAILABLE]
            with pytest.raises(DownstreamError):
                await replica_a.call(answer(replica_a), b"x", soon())
        await replica_a.breaker.sync(redis, key)
        await replica_b.breaker.sync(redis, key)
        assert replica_b.breaker.state == "open"
        with pytest.raises(Unavailable):
            await replica_b.call(answer(replica_b), b"x", soon())
        replica_b.breaker.reset()  # an admin reset on one replica reaches the other
        await replica_b.breaker.sync(redis, key)
        await replica_a.breaker.sync(redis, key)
        assert replica_a.breaker.state == "closed"
    finally:
        await replica_a.close()
        await replica_b.close()
        await redis.aclose()


async def test_request_id_and_details_travel(scripted: tuple[Script, int]) -> None:
    from services.common.logs import request_id_var

    script, port = scripted
    d = downstream(port)
    token = request_id_var.set("trace-me")
    try:
        await d.call(answer(d), b"x", soon())
    finally:
        request_id_var.reset(token)
    assert script.seen_request_ids[-1] == "trace-me"
    await d.close()
