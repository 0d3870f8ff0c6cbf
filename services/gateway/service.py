"""The gateway's wiring: downstream channels and breakers, auth, pipeline, caches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from services.common.cache import RedisCache
from services.common.redis import connect_redis
from services.common.server import GrpcService
from services.common.tasks import stop_tasks
from services.gateway.authn import AuthenticationInterceptor
from services.gateway.downstream import Downstream, RetryBudget
from services.gateway.pipeline import Pipeline
from services.gateway.servicer import AdminServicer, SpeechTranslationServicer
from services.gateway.settings import GatewaySettings
from services.gateway.status import MeshStatus
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayService(GrpcService):
    name = "gateway"
    service_names = (
        gateway_pb2.DESCRIPTOR.services_by_name["SpeechTranslationService"].full_name,
        gateway_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    )

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__()
        self.settings = settings
        self.redis = connect_redis(settings.redis_url, settings.redis_timeout_s)
        budget = RetryBudget(settings.retry_budget_ratio)
        self.downstreams = {
            name: Downstream(name, target, settings, budget)
            for name, target in (
                ("auth", settings.auth_target),
                ("asr", settings.asr_target),
                ("mt", settings.mt_target),
            )
        }
        prefix, ttl = settings.redis_prefix, settings.cache_ttl_s
        speech_cache = RedisCache(self.redis, f"{prefix}cache:speech:", ttl, "gateway_speech")
        text_cache = RedisCache(self.redis, f"{prefix}cache:text:", ttl, "gateway_text")
        self.pipeline = Pipeline(
            self.downstreams["asr"],
            self.downstreams["mt"],
            speech_cache,
            text_cache,
            default_deadline_s=settings.default_deadline_s,
            stream_default_deadline_s=settings.stream_default_deadline_s,
            max_audio_bytes=settings.max_audio_bytes,
        )
        self.status = MeshStatus(
            self.downstreams, [speech_cache, text_cache], settings.downstream_health_timeout_s
        )
        self._authentication = AuthenticationInterceptor(
            self.downstreams["auth"],
            self.redis,
            settings.default_deadline_s,
            settings.auth_lease_s,
            settings.auth_charge_interval_s,
        )
        self._breaker_sync: asyncio.Task[None] | None = None

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        return (self._authentication,)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_SpeechTranslationServiceServicer_to_server(
            SpeechTranslationServicer(self.pipeline), server
        )
        gateway_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(
                self.downstreams["auth"], self.pipeline, self.status, self._authentication.leases
            ),
            server,
        )

    async def start(self) -> None:
        self._breaker_sync = asyncio.create_task(self._sync_breakers())
        await self._authentication.start()

    async def _sync_breakers(self) -> None:
        while True:
            for name, downstream in self.downstreams.items():
                await downstream.breaker.sync(
                    self.redis, f"{self.settings.redis_prefix}breaker:{name}"
                )
            await asyncio.sleep(self.settings.breaker_sync_interval_s)

    async def is_ready(self) -> bool:
        return await self.status.refresh()

    async def stop(self) -> None:
        await self._authentication.stop()  # charges what leases admitted: auth still needed
        await stop_tasks(self._breaker_sync)
        for downstream in self.downstreams.values():
            await downstream.close()
        await self.redis.aclose()
