"""The mt service's wiring: models, batchers, the Redis cache, servicer and UTF-8 guard."""

from __future__ import annotations

import asyncio

import grpc

from services.common.redis import connect_redis
from services.common.server import GrpcService
from services.mt.cache import TranslationCache
from services.mt.servicer import MtServicer
from services.mt.settings import MtSettings
from services.mt.translator import Translator
from speechmesh.mt.v1 import mt_pb2, mt_pb2_grpc


class MtService(GrpcService):
    name = "mt"
    service_names = (mt_pb2.DESCRIPTOR.services_by_name["MtService"].full_name,)

    def __init__(self, settings: MtSettings) -> None:
        super().__init__()
        self.settings = settings
        # Redis only caches here: readiness never depends on it, and with a zero TTL the
        # service does not talk to it at all.
        self.redis = (
            connect_redis(settings.redis_url, settings.redis_timeout_s)
            if settings.cache_ttl_s > 0
            else None
        )
        cache = (
            TranslationCache(self.redis, settings.redis_prefix, settings.cache_ttl_s)
            if self.redis is not None
            else None
        )
        self.translator = Translator(settings, cache)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        mt_pb2_grpc.add_MtServiceServicer_to_server(MtServicer(self.translator), server)

    async def start(self) -> None:
        # Off the loop, so health answers NOT_SERVING while models load and warm up.
        await asyncio.to_thread(self.translator.load)
        self.translator.start()

    async def is_ready(self) -> bool:
        return self.translator.ready

    async def stop(self) -> None:
        await self.translator.stop()
        if self.redis is not None:
            await self.redis.aclose()
