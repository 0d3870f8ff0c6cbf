"""The gateway's domain: compose asr → mt, degrade when mt is away, cache results.

Routing: speech whose target is English goes through Whisper's own speech → English
translation when the ASR model can do it; otherwise the transcript goes to MT, which pivots
through English when it has no direct pair. A target equal to the spoken language needs no
translation at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.cache import RedisCache, cache_key
from services.common.errors import (
    DeadlineExceeded,
    DownstreamError,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from services.common.languages import language_field
from services.common.proto_time import duration
from services.gateway.breakers import FAILURE_CODES
from services.gateway.downstream import Deadline, Downstream
from speechmesh.asr.v1 import asr_pb2, asr_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2
from speechmesh.mt.v1 import mt_pb2, mt_pb2_grpc

log = logging.getLogger("speechmesh.gateway")

ENGLISH = "en"
CAPABILITIES_TTL_S = 60.0


def degradable(error: ServiceError) -> bool:
    """Whether a stage failure means 'the service is away' (degrade) rather than 'no'."""
    return isinstance(error, Unavailable | DeadlineExceeded) or (
        isinstance(error, DownstreamError) and error.code in FAILURE_CODES
    )


@dataclass
class Capabilities:
    """What the downstreams can do, refreshed at most every CAPABILITIES_TTL_S."""

    speech_languages: list[str] = field(default_factory=list)
    can_translate_speech: bool = False
    text_pairs: list[mt_pb2.LanguagePair] = field(default_factory=list)
    fetched_at: float = 0.0


class Pipeline:
    def __init__(
        self,
        asr: Downstream,
        mt: Downstream,
        speech_cache: RedisCache,
        text_cache: RedisCache,
        default_deadline_s: float,
        stream_default_deadline_s: float,
        max_audio_bytes: int,
    ) -> None:
        self.asr = asr
        self.mt = mt
        self.asr_stub = asr_pb2_grpc.AsrServiceStub(asr.channel)
        self.mt_stub = mt_pb2_grpc.MtServiceStub(mt.channel)
        self.speech_cache = speech_cache
        self.text_cache = text_cache
        self.default_deadline_s = default_deadline_s
        self.stream_default_deadline_s = stream_default_deadline_s
        self.max_audio_bytes = max_audio_bytes
        self._capabilities = Capabilities()

    def deadline(self, context: Any) -> Deadline:
        return Deadline.from_context(context, self.default_deadline_s)

    def stream_deadline(self, context: Any) -> Deadline:
        return Deadline.from_context(context, self.stream_default_deadline_s)

    def _check_audio_size(self, audio: asr_pb2.Audio) -> None:
        # Refused here, so audio asr would refuse anyway never crosses the mesh.
        if len(audio.content) > self.max_audio_bytes:
            raise InvalidArgument.field(
                "audio.content",
                f"{len(audio.content)} bytes; at most {self.max_audio_bytes} per request",
            )

    # --- capabilities -------------------------------------------------------------------

    async def capabilities(self, deadline: Deadline) -> Capabilities:
        if time.monotonic() - self._capabilities.fetched_at < CAPABILITIES_TTL_S:
            return self._capabilities
        models: Any
        pairs: Any
        models, pairs = await asyncio.gather(
            self.asr.call(
                self.asr_stub.ListModels, asr_pb2.ListModelsRequest(), deadline, idempotent=True
            ),
            self.mt.call(
                self.mt_stub.ListLanguagePairs,
                mt_pb2.ListLanguagePairsRequest(),
                deadline,
                idempotent=True,
            ),
            return_exceptions=True,
        )
        fresh = Capabilities(fetched_at=time.monotonic())
        if isinstance(models, asr_pb2.ListModelsResponse):
            default = next((m for m in models.models if m.is_default), None)
            fresh.speech_languages = sorted({lang for m in models.models for lang in m.languages})
            fresh.can_translate_speech = bool(default and default.can_translate)
        if isinstance(pairs, mt_pb2.ListLanguagePairsResponse):
            fresh.text_pairs = list(pairs.pairs)
        if isinstance(models, BaseException) or isinstance(pairs, BaseException):
            fresh.fetched_at = 0.0  # partial: ask again next time
        self._capabilities = fresh
        return fresh

    async def list_languages(self, deadline: Deadline) -> gateway_pb2.ListLanguagesResponse:
        caps = await self.capabilities(deadline)
        routes = []
        speech = set(caps.speech_languages)
        for pair in caps.text_pairs:
            steps = [f"mt:{m}" for m in pair.models]
            kinds = [False, True] if pair.source_language in speech else [False]
            for is_speech in kinds:
                routes.append(
                    gateway_pb2.LanguageRoute(
                        source_language=pair.source_language,
                        target_language=pair.target_language,
                        steps=["asr:transcribe", *steps] if is_speech else steps,
                        pivot=pair.pivot,
                        speech=is_speech,
                    )
                )
        if caps.can_translate_speech:
            for language in sorted(speech - {ENGLISH}):
                routes.append(
                    gateway_pb2.LanguageRoute(
                        source_language=language,
                        target_language=ENGLISH,
                        steps=["asr:translate"],
                        speech=True,
                    )
                )
        return gateway_pb2.ListLanguagesResponse(
            transcription_languages=caps.speech_languages, routes=routes
        )

    # --- text ---------------------------------------------------------------------------

    async def translate_text(
        self, request: gateway_pb2.TranslateTextRequest, deadline: Deadline
    ) -> gateway_pb2.TranslateTextResponse:
        mt_request = mt_pb2.TranslateRequest(
            texts=request.texts,
            source_language=language_field(
                "source_language", request.source_language, required=False
            ),
            target_language=language_field(
                "target_language", request.target_language, required=True
            ),
            glossary=request.glossary,
            do_not_translate=request.do_not_translate,
        )
        if not request.texts:
            raise InvalidArgument.field("texts", "at least one text is required")
        key = cache_key("text", mt_request.SerializeToString(deterministic=True))
        cached = await self.text_cache.get(key)
        if cached is not None:
            return gateway_pb2.TranslateTextResponse.FromString(cached)
        translated = await self.mt.call(
            self.mt_stub.Translate, mt_request, deadline, idempotent=True
        )
        response = gateway_pb2.TranslateTextResponse(translations=translated.translations)
        await self.text_cache.set(key, response.SerializeToString())
        return response

    # --- speech -------------------------------------------------------------------------

    async def recognize(
        self, request: asr_pb2.RecognizeRequest, deadline: Deadline
    ) -> asr_pb2.RecognizeResponse:
        return await self.asr.call(self.asr_stub.Recognize, request, deadline, idempotent=True)

    async def transcribe(
        self, request: gateway_pb2.TranscribeRequest, deadline: Deadline
    ) -> gateway_pb2.TranscribeResponse:
        self._check_audio_size(request.audio)
        asr_request = asr_pb2.RecognizeRequest(
            audio=request.audio,
            language=language_field("language", request.language),
            task=request.task,
            word_timestamps=request.word_timestamps,
        )
        key = cache_key("transcribe", asr_request.SerializeToString(deterministic=True))
        cached = await self.speech_cache.get(key)
        if cached is not None:
            return gateway_pb2.TranscribeResponse.FromString(cached)
        result = await self.recognize(asr_request, deadline)
        response = gateway_pb2.TranscribeResponse(
            transcript=result.transcript,
            language=result.language,
            language_probability=result.language_probability,
            segments=result.segments,
            audio_duration=result.audio_duration,
        )
        await self.speech_cache.set(key, response.SerializeToString())
        return response

    async def translate_speech(
        self, request: gateway_pb2.TranslateSpeechRequest, deadline: Deadline
    ) -> gateway_pb2.TranslateSpeechResponse:
        source = language_field("source_language", request.source_language)
        target = language_field("target_language", request.target_language, required=True)
        if not request.audio.content:
            raise InvalidArgument.field("audio.content", "required")
        self._check_audio_size(request.audio)
        key = cache_key("speech", request.SerializeToString(deterministic=True))
        cached = await self.speech_cache.get(key)
        if cached is not None:
            return gateway_pb2.TranslateSpeechResponse.FromString(cached)

        started = time.perf_counter()
        recognized = await self.recognize(
            asr_pb2.RecognizeRequest(audio=request.audio, language=source), deadline
        )
        asr_stage = gateway_pb2.StageStatus(
            stage="asr",
            state=gateway_pb2.STAGE_STATE_OK,
            models=[recognized.model],
            latency=duration(time.perf_counter() - started),
        )
        translation, mt_stage = await self._translate_utterance(
            request.audio, recognized.transcript, recognized.language, target, deadline
        )
        response = gateway_pb2.TranslateSpeechResponse(
            transcript=recognized.transcript,
            detected_language=recognized.language,
            language_probability=recognized.language_probability,
            translation=translation,
            segments=recognized.segments,
            stages=[asr_stage, mt_stage],
            target_language=target,
        )
        if mt_stage.state in (gateway_pb2.STAGE_STATE_OK, gateway_pb2.STAGE_STATE_SKIPPED):
            await self.speech_cache.set(key, response.SerializeToString())
        return response

    async def _translate_utterance(
        self,
        audio: asr_pb2.Audio | None,
        transcript: str,
        language: str,
        target: str,
        deadline: Deadline,
    ) -> tuple[str, gateway_pb2.StageStatus]:
        """The translation of one transcript, and how the translation stage went. Only the
        mt stage's unavailability is absorbed; the caller's own mistakes still fail."""
        started = time.perf_counter()

        def stage(state: Any, message: str = "", models: list[str] | None = None) -> Any:
            return gateway_pb2.StageStatus(
                stage="mt",
                state=state,
                message=message,
                models=models or [],
                latency=duration(time.perf_counter() - started),
            )

        if not transcript.strip() or language == target:
            return transcript, stage(gateway_pb2.STAGE_STATE_SKIPPED, "nothing to translate")
        try:
            if (
                target == ENGLISH
                and audio is not None
                and (await self.capabilities(deadline)).can_translate_speech
            ):
                english = await self.recognize(
                    asr_pb2.RecognizeRequest(
                        audio=audio, language=language, task=asr_pb2.TASK_TRANSLATE
                    ),
                    deadline,
                )
                return english.transcript, stage(
                    gateway_pb2.STAGE_STATE_OK, models=[f"asr:{english.model}"]
                )
            translated = await self.mt.call(
                self.mt_stub.Translate,
                mt_pb2.TranslateRequest(
                    texts=[transcript], source_language=language, target_language=target
                ),
                deadline,
                idempotent=True,
            )
            result = translated.translations[0]
            return result.text, stage(gateway_pb2.STAGE_STATE_OK, models=list(result.models))
        except ServiceError as error:
            if degradable(error):
                log.warning("translation stage unavailable", extra={"error": error.message})
                return "", stage(gateway_pb2.STAGE_STATE_UNAVAILABLE, error.message)
            if isinstance(error, DownstreamError) and error.code in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                return "", stage(gateway_pb2.STAGE_STATE_FAILED, error.message)
            raise

    # --- streaming ----------------------------------------------------------------------

    async def stream_recognition(
        self,
        config: asr_pb2.StreamingRecognitionConfig,
        audio_chunks: AsyncIterator[bytes],
        deadline: Deadline,
    ) -> AsyncGenerator[asr_pb2.StreamingRecognizeResponse, None]:
        """Relays a stream to asr and its results back. Whichever side ends first ends the
        other: a bad message from the caller cancels the asr stream and is refused at once,
        and asr's refusal stops the relay of the caller's audio."""
        call = self.asr.open_stream(self.asr_stub.StreamingRecognize, deadline)

        async def pump() -> None:
            try:
                await call.write(asr_pb2.StreamingRecognizeRequest(config=config))
                # asr answers the config with its initial metadata, or refuses it by ending
                # the call. Audio written into that refusal would race the status, and gRPC
                # core would report the lost race as INTERNAL instead of asr's refusal.
                await call.initial_metadata()
                async for chunk in audio_chunks:
                    if call.done():
                        return
                    await call.write(asr_pb2.StreamingRecognizeRequest(audio_content=chunk))
                await call.done_writing()
            except asyncio.InvalidStateError:
                return  # asr has ended the call; the reading side reports how

        def on_pump_done(task: asyncio.Task[None]) -> None:
            failure = None if task.cancelled() else task.exception()
            if failure is not None and not isinstance(failure, grpc.aio.AioRpcError):
                call.cancel()  # the caller's stream broke: stop reading asr's results

        pumping = asyncio.create_task(pump())
        pumping.add_done_callback(on_pump_done)
        error: BaseException | None = None
        try:
            async for response in call:
                yield response
        except asyncio.CancelledError:
            failure = None if not pumping.done() or pumping.cancelled() else pumping.exception()
            if failure is None or isinstance(failure, grpc.aio.AioRpcError):
                raise
            raise failure from None
        except grpc.aio.AioRpcError as exc:
            error = exc
            raise DownstreamError("asr", exc) from exc
        finally:
            pumping.cancel()
            call.cancel()
            # Wait for the pump, so it never reads the caller's stream after we answered.
            await asyncio.wait([pumping])
            self.asr.record_stream_outcome(error)

    async def translate_final(
        self, result: asr_pb2.StreamingRecognitionResult, target: str, deadline: Deadline
    ) -> tuple[str, gateway_pb2.StageStatus]:
        return await self._translate_utterance(
            None, result.transcript, result.language, target, deadline
        )
