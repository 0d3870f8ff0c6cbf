"""The gateway's public and admin APIs: protobuf in, pipeline or downstream calls, out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from services.common.credentials import credentials_from_metadata
from services.common.errors import InvalidArgument, shown
from services.common.languages import language_field
from services.gateway.authn import Leases
from services.gateway.downstream import Downstream
from services.gateway.pipeline import Pipeline
from services.gateway.status import MeshStatus
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc


async def _config_then_audio(
    requests: AsyncIterator[Any], what: str
) -> tuple[Any, AsyncIterator[bytes]]:
    """Splits a streaming request into its first-message config and its audio chunks."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("streaming_request") != "config":
        raise InvalidArgument.field("config", f"the first message must carry the {what} config")

    async def chunks() -> AsyncIterator[bytes]:
        async for request in requests:
            if request.WhichOneof("streaming_request") != "audio_content":
                raise InvalidArgument.field("config", "only the first message may carry config")
            yield request.audio_content

    return first.config, chunks()


class SpeechTranslationServicer(gateway_pb2_grpc.SpeechTranslationServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def TranslateSpeech(
        self, request: gateway_pb2.TranslateSpeechRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TranslateSpeechResponse:
        return await self.pipeline.translate_speech(request, self.pipeline.deadline(context))

    async def TranslateText(
        self, request: gateway_pb2.TranslateTextRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TranslateTextResponse:
        return await self.pipeline.translate_text(request, self.pipeline.deadline(context))

    async def Transcribe(
        self, request: gateway_pb2.TranscribeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TranscribeResponse:
        return await self.pipeline.transcribe(request, self.pipeline.deadline(context))

    async def ListLanguages(
        self, request: gateway_pb2.ListLanguagesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListLanguagesResponse:
        return await self.pipeline.list_languages(self.pipeline.deadline(context))

    async def StreamingTranscribe(
        self,
        request_iterator: AsyncIterator[gateway_pb2.StreamingTranscribeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.StreamingTranscribeResponse]:
        config, chunks = await _config_then_audio(request_iterator, "recognition")
        deadline = self.pipeline.stream_deadline(context)
        async with aclosing(self.pipeline.stream_recognition(config, chunks, deadline)) as relay:
            async for response in relay:
                yield gateway_pb2.StreamingTranscribeResponse(
                    result=response.result if response.HasField("result") else None,
                    speech_event=response.speech_event,
                )

    async def StreamingTranslateSpeech(
        self,
        request_iterator: AsyncIterator[gateway_pb2.StreamingTranslateSpeechRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.StreamingTranslateSpeechResponse]:
        config, chunks = await _config_then_audio(request_iterator, "translation")
        target = language_field("config.target_language", config.target_language, required=True)
        deadline = self.pipeline.stream_deadline(context)
        # aclosing: leaving early (a failed translation) ends the asr stream at once.
        relay = self.pipeline.stream_recognition(config.recognition, chunks, deadline)
        async with aclosing(relay):
            async for response in relay:
                reply = gateway_pb2.StreamingTranslateSpeechResponse(
                    speech_event=response.speech_event
                )
                if response.HasField("result"):
                    reply.result.CopyFrom(response.result)
                    if response.result.is_final:
                        translation, stage = await self.pipeline.translate_final(
                            response.result, target, deadline
                        )
                        reply.translation = translation
                        reply.stages.append(stage)
                yield reply


class AdminServicer(gateway_pb2_grpc.AdminServiceServicer):
    """Admin calls; the authentication interceptor has already refused non-admins."""

    def __init__(
        self, auth: Downstream, pipeline: Pipeline, status: MeshStatus, leases: Leases
    ) -> None:
        self.auth = auth
        self.auth_stub = auth_pb2_grpc.AuthServiceStub(auth.channel)
        self.pipeline = pipeline
        self.status = status
        self.leases = leases

    def _forwarded_credentials(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[tuple[str, str], ...]:
        api_key, token = credentials_from_metadata(context.invocation_metadata())
        if api_key:
            return (("x-api-key", api_key),)
        return (("authorization", f"Bearer {token}"),)

    async def CreateApiKey(
        self, request: gateway_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateApiKeyResponse:
        created = await self.auth.call(
            self.auth_stub.CreateApiKey,
            auth_pb2.CreateApiKeyRequest(
                owner=request.owner, tier=request.tier, description=request.description
            ),
            self.pipeline.deadline(context),
            metadata=self._forwarded_credentials(context),
        )
        return gateway_pb2.CreateApiKeyResponse(
            key_id=created.key_id, api_key=created.api_key, key=created.key
        )

    async def RevokeApiKey(
        self, request: gateway_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RevokeApiKeyResponse:
        revoked = await self.auth.call(
            self.auth_stub.RevokeApiKey,
            auth_pb2.RevokeApiKeyRequest(key_id=request.key_id),
            self.pipeline.deadline(context),
            idempotent=True,
            metadata=self._forwarded_credentials(context),
        )
        # Auth announces it to every replica too; this one need not wait for the echo.
        self.leases.revoke(revoked.key.key_id)
        return gateway_pb2.RevokeApiKeyResponse(key=revoked.key)

    async def ListApiKeys(
        self, request: gateway_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListApiKeysResponse:
        listed = await self.auth.call(
            self.auth_stub.ListApiKeys,
            auth_pb2.ListApiKeysRequest(
                owner=request.owner,
                include_revoked=request.include_revoked,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
            self.pipeline.deadline(context),
            idempotent=True,
            metadata=self._forwarded_credentials(context),
        )
        return gateway_pb2.ListApiKeysResponse(
            keys=listed.keys, next_page_token=listed.next_page_token
        )

    async def ResetCircuitBreakers(
        self, request: gateway_pb2.ResetCircuitBreakersRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ResetCircuitBreakersResponse:
        names = list(request.downstreams) or list(self.status.downstreams)
        unknown = [n for n in names if n not in self.status.downstreams]
        if unknown:
            raise InvalidArgument.field(
                "downstreams",
                f"unknown {', '.join(shown(n) for n in unknown[:3])}; "
                f"known: {sorted(self.status.downstreams)}",
            )
        for name in names:
            self.status.downstreams[name].breaker.reset()
        return gateway_pb2.ResetCircuitBreakersResponse(downstreams=self.status.describe())

    async def ClearCache(
        self, request: gateway_pb2.ClearCacheRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ClearCacheResponse:
        everything = not (request.transcripts or request.translations)
        deleted = 0
        if request.transcripts or everything:
            deleted += await self.pipeline.speech_cache.clear()
        if request.translations or everything:
            deleted += await self.pipeline.text_cache.clear()
        return gateway_pb2.ClearCacheResponse(deleted_entries=deleted)

    async def GetMeshStatus(
        self, request: gateway_pb2.GetMeshStatusRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetMeshStatusResponse:
        await self.status.refresh()
        return gateway_pb2.GetMeshStatusResponse(
            downstreams=self.status.describe(), cache=await self.status.cache_stats()
        )
