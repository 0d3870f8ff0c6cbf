"""Auth fails closed when Redis goes away, says so through health, and recovers; SIGTERM
drains in-flight calls."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth.service import AuthService
from services.common.testing import (
    RedisServer,
    error_details,
    free_port,
    insecure_channel,
    running_service,
)
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.auth.conftest import ADMIN, ADMIN_KEY, auth_settings

AUTH_SERVICE = "speechmesh.auth.v1.AuthService"
ROOT = Path(__file__).resolve().parents[2]


async def wait_for_status(
    health: health_pb2_grpc.HealthStub, service: str, wanted: int, timeout_s: float = 5.0
) -> None:
    stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    async for update in stream:
        if update.status == wanted:
            stream.cancel()
            return
    raise AssertionError(f"{service} never became {wanted}")


async def test_redis_outage_fails_closed_then_recovers(redis_prefix: str) -> None:
    with RedisServer() as server:
        settings = auth_settings(server.url, redis_prefix)
        async with running_service(AuthService(settings), settings) as runtime:
            async with insecure_channel(runtime.port) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                created = await stub.CreateApiKey(
                    auth_pb2.CreateApiKeyRequest(owner="o", tier=auth_pb2.TIER_PRO), metadata=ADMIN
                )
                request = auth_pb2.AuthenticateRequest(api_key=created.api_key, method="/a/b")
                await stub.Authenticate(request)
                check = await health.Check(health_pb2.HealthCheckRequest(service=AUTH_SERVICE))
                assert check.status == health_pb2.HealthCheckResponse.SERVING

                server.stop()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Authenticate(request)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                details = error_details(caught.value)
                assert details["ErrorInfo"].reason == "AUTH_STORE_UNAVAILABLE"
                assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
                await wait_for_status(
                    health, AUTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING
                )
                # Liveness stays up: the process is fine, only readiness follows Redis.
                overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert overall.status == health_pb2.HealthCheckResponse.SERVING

                server.start()
                await wait_for_status(health, AUTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
                recovered = await stub.Authenticate(request)
                assert recovered.quota.minute_remaining == 198


async def test_health_and_reflection(redis_url: str, redis_prefix: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    settings = auth_settings(redis_url, redis_prefix)
    async with running_service(AuthService(settings), settings) as runtime:
        async with insecure_channel(runtime.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", AUTH_SERVICE):
                response = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert response.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health.Check(health_pb2.HealthCheckRequest(service="no.Such"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for r in responses for s in r.list_services_response.service}
            assert {AUTH_SERVICE, "grpc.health.v1.Health"} <= names

        await runtime.stop()
        assert (
            runtime.health._server_status[AUTH_SERVICE]
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )


def test_sigterm_drains_an_in_flight_call(redis_prefix: str) -> None:
    with RedisServer() as server:
        _run_drain(server, redis_prefix)


def _run_drain(server: RedisServer, redis_prefix: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
        "SPEECHMESH_AUTH_PORT": str(port),
        "SPEECHMESH_AUTH_HOST": "127.0.0.1",
        "SPEECHMESH_AUTH_METRICS_PORT": "-1",
        "SPEECHMESH_AUTH_REDIS_URL": server.url,
        "SPEECHMESH_AUTH_REDIS_PREFIX": redis_prefix,
        "SPEECHMESH_AUTH_GRACE_PERIOD_S": "10",
        "SPEECHMESH_ADMIN_KEY": ADMIN_KEY,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.auth"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        asyncio.run(_drain_scenario(port, server, process))
        assert process.wait(15) == 0
        assert b'"msg": "stopped"' in (process.stdout.read() if process.stdout else b"")
    finally:
        if process.poll() is None:
            process.kill()


async def _drain_scenario(port: int, server: RedisServer, process: subprocess.Popen[bytes]) -> None:
    async with insecure_channel(port) as channel:
        async with asyncio.timeout(20):
            await channel.channel_ready()
        health = health_pb2_grpc.HealthStub(channel)
        await wait_for_status(health, AUTH_SERVICE, health_pb2.HealthCheckResponse.SERVING, 20)
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        created = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(owner="o", tier=auth_pb2.TIER_PRO), metadata=ADMIN
        )
        # Freeze Redis so the next Authenticate is still in flight at SIGTERM.
        server.pause()
        started = time.monotonic()
        in_flight = asyncio.ensure_future(
            stub.Authenticate(auth_pb2.AuthenticateRequest(api_key=created.api_key, method="/a/b"))
        )
        await asyncio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # Draining: health already says NOT_SERVING and the in-flight call is still running.
        assert not in_flight.done()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Authenticate(
                auth_pb2.AuthenticateRequest(api_key=created.api_key), timeout=2
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, "new calls are refused"
        server.resume()
        response = await in_flight
        assert response.principal.key_id == created.key_id
        assert time.monotonic() - started > 0.5, "the call was meant to be in flight at SIGTERM"
