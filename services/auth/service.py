"""The auth service's wiring: Redis, key store, limiter, tokens, servicer."""

from __future__ import annotations

import grpc

from services.auth.authenticator import Authenticator
from services.auth.limiter import Limiter
from services.auth.servicer import AuthServicer
from services.auth.settings import AuthSettings
from services.auth.store import KeyStore
from services.auth.tokens import TokenIssuer
from services.common.redis import connect_redis, redis_alive
from services.common.server import GrpcService
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc


class AuthService(GrpcService):
    name = "auth"
    service_names = (auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,)

    def __init__(self, settings: AuthSettings) -> None:
        super().__init__()
        self.settings = settings
        self.redis = connect_redis(settings.redis_url, settings.redis_timeout_s)
        store = KeyStore(
            self.redis,
            settings.redis_prefix,
            settings.hash_pepper.get_secret_value().encode(),
            on_unavailable=self.request_health_check,
        )
        self.authenticator = Authenticator(
            store,
            Limiter(self.redis, settings.redis_prefix),
            TokenIssuer(
                settings.jwt_secret.get_secret_value(), settings.jwt_issuer, settings.jwt_audience
            ),
            settings.admin_key.get_secret_value() if settings.admin_key else None,
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(self.authenticator, self.settings), server
        )

    async def is_ready(self) -> bool:
        return await redis_alive(self.redis)

    async def stop(self) -> None:
        await self.redis.aclose()
