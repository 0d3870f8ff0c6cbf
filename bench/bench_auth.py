"""`make bench-auth`: Authenticate calls/s and p50/p99 at concurrency 1 and 50, beside a
plain Redis PING round trip measured in the same run — the floor auth cannot go below.

The auth service runs as its own process (as deployed); keys rotate over 64 enterprise keys
so the rate limiter does real work without refusing calls.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from bench.stats import LoadResult, closed_loop
from services.common.testing import RedisServer, free_port, insecure_channel
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-admin-key"
CALLS = {1: 2000, 50: 8000}
METHOD = "/speechmesh.gateway.v1.SpeechTranslationService/TranslateText"


async def wait_serving(channel: object) -> None:
    health = health_pb2_grpc.HealthStub(channel)  # type: ignore[arg-type]
    for _ in range(200):
        try:
            response = await health.Check(
                health_pb2.HealthCheckRequest(service="speechmesh.auth.v1.AuthService")
            )
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("auth did not become ready")


async def measure(redis_url: str, port: int) -> list[tuple[int, LoadResult, LoadResult]]:
    redis = Redis.from_url(redis_url)
    rows = []
    async with insecure_channel(port) as channel:
        await wait_serving(channel)
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        keys = [
            (
                await stub.CreateApiKey(
                    auth_pb2.CreateApiKeyRequest(owner=f"bench-{i}", tier=auth_pb2.TIER_ENTERPRISE),
                    metadata=(("x-api-key", ADMIN_KEY),),
                )
            ).api_key
            for i in range(64)
        ]
        requests = [auth_pb2.AuthenticateRequest(api_key=k, method=METHOD) for k in keys]

        async def authenticate(i: int) -> object:
            return await stub.Authenticate(requests[i % len(requests)])

        async def ping(_: int) -> object:
            return await redis.ping()

        for concurrency, total in CALLS.items():
            await closed_loop(authenticate, concurrency, 200)  # warm-up
            await closed_loop(ping, concurrency, 200)
            auth_result = await closed_loop(authenticate, concurrency, total)
            ping_result = await closed_loop(ping, concurrency, total)
            rows.append((concurrency, auth_result, ping_result))
    await redis.aclose()
    return rows


def main() -> int:
    port = free_port()
    with RedisServer() as redis_server:
        env = {
            **os.environ,
            "SPEECHMESH_AUTH_PORT": str(port),
            "SPEECHMESH_AUTH_HOST": "127.0.0.1",
            "SPEECHMESH_AUTH_METRICS_PORT": "-1",
            "SPEECHMESH_AUTH_REDIS_URL": redis_server.url,
            "SPEECHMESH_AUTH_ACCESS_LOG": "false",
            "SPEECHMESH_AUTH_LOG_LEVEL": "WARNING",
            "SPEECHMESH_ADMIN_KEY": ADMIN_KEY,
        }
        auth = subprocess.Popen([sys.executable, "-m", "services.auth"], env=env, cwd=ROOT)
        try:
            rows = asyncio.run(measure(redis_server.url, port))
        finally:
            auth.terminate()
            auth.wait(20)
    print(
        f"\nAuthenticate (auth service over gRPC, own process) vs Redis PING (same client), "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'conc':>4} | {'auth calls/s':>12} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'PING/s':>8} {'p50 ms':>7} {'p99 ms':>7} | {'rate ratio':>10} {'p50 ratio':>9}"
    )
    for concurrency, a, p in rows:
        print(
            f"{concurrency:>4} | {a.rate:>12.0f} {a.p50_ms:>7.2f} {a.p99_ms:>7.2f} | "
            f"{p.rate:>8.0f} {p.p50_ms:>7.2f} {p.p99_ms:>7.2f} | "
            f"{a.rate / p.rate:>10.2f} {a.p50_ms / p.p50_ms:>9.1f}"
        )
    print(
        "rate ratio = auth calls/s ÷ PING/s (1.0 would be the Redis floor); "
        "p50 ratio = auth p50 ÷ PING p50"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
