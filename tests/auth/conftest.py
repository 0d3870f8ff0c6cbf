from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.common.server import Runtime
from services.common.testing import insecure_channel, running_service
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc

ADMIN_KEY = "test-bootstrap-admin-key"
ADMIN = (("x-api-key", ADMIN_KEY),)


def auth_settings(redis_url: str, redis_prefix: str, **overrides: object) -> AuthSettings:
    return AuthSettings(
        port=0,
        metrics_port=-1,
        host="127.0.0.1",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        admin_key=ADMIN_KEY,
        health_interval_s=0.2,
        access_log=False,
        **overrides,
    )


@dataclass
class AuthHarness:
    runtime: Runtime
    service: AuthService
    stub: auth_pb2_grpc.AuthServiceStub

    async def create_key(self, tier: int = auth_pb2.TIER_FREE, owner: str = "alice") -> str:
        response = await self.stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(owner=owner, tier=tier),
            metadata=ADMIN,  # type: ignore[arg-type]
        )
        return response.api_key


@pytest.fixture
async def auth(redis_url: str, redis_prefix: str) -> AsyncIterator[AuthHarness]:
    settings = auth_settings(redis_url, redis_prefix)
    service = AuthService(settings)
    async with running_service(service, settings) as runtime:
        async with insecure_channel(runtime.port) as channel:
            yield AuthHarness(runtime, service, auth_pb2_grpc.AuthServiceStub(channel))
