from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from services.auth.service import AuthService
from services.common.server import Runtime
from services.common.testing import free_port, insecure_channel, running_service
from services.gateway.service import GatewayService
from services.gateway.settings import GatewaySettings
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.auth.conftest import ADMIN, auth_settings


def gateway_settings(redis_url: str, redis_prefix: str, **targets: Any) -> GatewaySettings:
    return GatewaySettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        redis_url=redis_url,
        redis_prefix=f"{redis_prefix}gw:",
        health_interval_s=0.2,
        access_log=False,
        breaker_fail_max=3,
        breaker_reset_s=1.0,
        retry_initial_backoff_s=0.01,
        **{
            "auth_target": f"127.0.0.1:{free_port()}",
            "asr_target": f"127.0.0.1:{free_port()}",
            "mt_target": f"127.0.0.1:{free_port()}",
            **targets,
        },
    )


@dataclass
class Edge:
    auth: Runtime
    gateway: Runtime
    service: GatewayService
    public: gateway_pb2_grpc.SpeechTranslationServiceStub
    admin: gateway_pb2_grpc.AdminServiceStub
    gateway_channel: grpc.aio.Channel

    async def create_key(self, tier: int = auth_pb2.TIER_FREE) -> str:
        created = await self.admin.CreateApiKey(
            gateway_pb2.CreateApiKeyRequest(owner="edge-test", tier=tier),  # type: ignore[arg-type]
            metadata=ADMIN,
        )
        return created.api_key


@pytest.fixture
async def edge(redis_url: str, redis_prefix: str) -> AsyncIterator[Edge]:
    """The real auth service and the gateway; asr and mt are not running."""
    a_settings = auth_settings(redis_url, redis_prefix)
    async with running_service(AuthService(a_settings), a_settings) as auth:
        g_settings = gateway_settings(redis_url, redis_prefix, auth_target=f"127.0.0.1:{auth.port}")
        service = GatewayService(g_settings)
        async with (
            running_service(service, g_settings) as gateway,
            insecure_channel(gateway.port) as channel,
        ):
            yield Edge(
                auth,
                gateway,
                service,
                gateway_pb2_grpc.SpeechTranslationServiceStub(channel),
                gateway_pb2_grpc.AdminServiceStub(channel),
                channel,
            )
