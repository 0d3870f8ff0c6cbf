"""The asr service's wiring: models, VAD, batching recognizer, cache, servicer."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from services.asr.models import LoadedModel, load_models
from services.asr.recognizer import Recognizer
from services.asr.servicer import AsrServicer
from services.asr.settings import AsrSettings
from services.asr.vad import RATE, SileroVad
from services.common.cache import RedisCache
from services.common.redis import connect_redis
from services.common.server import GrpcService
from services.common.settings import model_cache_dir
from speechmesh.asr.v1 import asr_pb2, asr_pb2_grpc


class AsrService(GrpcService):
    name = "asr"
    service_names = (asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name,)

    def __init__(self, settings: AsrSettings) -> None:
        super().__init__()
        self.settings = settings
        self.redis = connect_redis(settings.redis_url, settings.redis_timeout_s)
        self.cache = RedisCache(
            self.redis,
            f"{settings.redis_prefix}transcripts:",
            settings.cache_ttl_s,
            "asr_transcripts",
        )
        self.recognizer: Recognizer | None = None
        # Registered before the models load (the port is bound first); it answers
        # UNAVAILABLE until start() hands it the recognizer.
        self.servicer = AsrServicer(self.cache, settings)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        asr_pb2_grpc.add_AsrServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Loads the models off the event loop (health answers NOT_SERVING meanwhile), then
        warms each one up so the first caller does not pay for it."""
        s = self.settings
        models: dict[str, LoadedModel] = await asyncio.to_thread(
            load_models, s.models, s.extra_models, s.threads
        )
        vad = SileroVad(model_cache_dir() / "asr" / "silero_vad.onnx")
        self.recognizer = Recognizer(
            models,
            s.default_model,
            vad,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
        )
        self.recognizer.start()
        warmup = np.zeros(RATE, np.float32)
        for model in models.values():
            await self.recognizer.recognize(
                warmup,
                language="en",
                task="transcribe",
                word_timestamps=False,
                model_name=model.name,
                timeout_s=None,
            )
        self.servicer.recognizer = self.recognizer

    async def is_ready(self) -> bool:
        return self.servicer.recognizer is not None

    async def stop(self) -> None:
        if self.recognizer:
            await self.recognizer.stop()
        await self.redis.aclose()
