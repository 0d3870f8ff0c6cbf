"""AsrService over gRPC: protobuf in, recognition, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import grpc

from services.asr.audio import MODEL_RATE, AudioLimits, decode
from services.asr.recognizer import Recognition, Recognizer, TimedSegment
from services.asr.settings import AsrSettings
from services.asr.streaming import StreamSession, stream_config
from services.asr.whisper_onnx import Task
from services.common.batching import remaining_time
from services.common.cache import RedisCache, cache_key
from services.common.errors import InvalidArgument, Unavailable
from services.common.languages import language_field
from services.common.proto_time import duration
from speechmesh.asr.v1 import asr_pb2, asr_pb2_grpc

_TASKS: dict[int, Task] = {
    asr_pb2.TASK_UNSPECIFIED: "transcribe",
    asr_pb2.TASK_TRANSCRIBE: "transcribe",
    asr_pb2.TASK_TRANSLATE: "translate",
}


def task_of(task: int, field: str) -> Task:
    if task not in _TASKS:
        raise InvalidArgument.field(field, f"unknown task {task}")
    return _TASKS[task]


def segment_message(segment: TimedSegment) -> asr_pb2.Segment:
    return asr_pb2.Segment(
        text=segment.text,
        start_offset=duration(segment.start),
        end_offset=duration(segment.end),
        avg_logprob=segment.avg_logprob,
        words=[
            asr_pb2.Word(word=w.word, start_offset=duration(w.start), end_offset=duration(w.end))
            for w in segment.words
        ],
    )


def recognize_response(result: Recognition) -> asr_pb2.RecognizeResponse:
    return asr_pb2.RecognizeResponse(
        transcript=result.transcript,
        language=result.language,
        language_probability=result.language_probability,
        segments=[segment_message(s) for s in result.segments],
        audio_duration=duration(result.duration_s),
        model=result.model,
    )


class AsrServicer(asr_pb2_grpc.AsrServiceServicer):
    def __init__(self, cache: RedisCache, settings: AsrSettings) -> None:
        self.recognizer: Recognizer | None = None  # set once the models are loaded
        self.cache = cache
        self.settings = settings
        self.limits = AudioLimits(settings.max_audio_bytes, settings.max_audio_duration_s)

    def _ready(self) -> Recognizer:
        if self.recognizer is None:
            raise Unavailable("models are loading", reason="MODEL_NOT_READY", retry_after_s=5.0)
        return self.recognizer

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        language = language_field("language", request.language)
        task = task_of(request.task, "task")
        recognizer = self._ready()
        model = recognizer.model(request.model)
        recognizer.check(model, language, task)
        key = cache_key(
            model.name,
            task,
            language,
            str(request.word_timestamps),
            request.audio.SerializeToString(deterministic=True),
        )
        cached = await self.cache.get(key)
        if cached is not None:
            return asr_pb2.RecognizeResponse.FromString(cached)
        samples = await asyncio.to_thread(decode, request.audio, self.limits)
        result = await recognizer.recognize(
            samples,
            language=language,
            task=task,
            word_timestamps=request.word_timestamps,
            model_name=model.name,
            timeout_s=remaining_time(context),
        )
        response = recognize_response(result)
        await self.cache.set(key, response.SerializeToString())
        return response

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[asr_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("streaming_request") != "config":
            raise InvalidArgument.field("config", "the first message must carry the config")
        language = language_field("config.language", first.config.language)
        task = task_of(first.config.task, "config.task")
        config = stream_config(
            first.config,
            language,
            task,
            self.settings.silence_duration_s,
            self.settings.sentence_end_silence_s,
        )
        recognizer = self._ready()
        recognizer.check(recognizer.model(config.model), language, task)
        # Tells the caller the config is accepted, so it can send audio without racing a
        # refusal (the gateway waits for this).
        await context.send_initial_metadata(())

        async def chunks() -> AsyncGenerator[bytes, None]:
            async for request in request_iterator:
                if request.WhichOneof("streaming_request") != "audio_content":
                    raise InvalidArgument.field("config", "only the first message may carry config")
                yield request.audio_content

        session = StreamSession(
            recognizer,
            config,
            interim_interval_s=self.settings.interim_interval_s,
            max_utterance_s=self.settings.max_utterance_s,
            timeout_s=remaining_time(context),
            window_margin_s=self.settings.stream_window_margin_s or None,
        )
        # aclosing: a stream that ends early stops its session's work now, not when the
        # generators are collected.
        async with aclosing(chunks()) as audio, aclosing(session.run(audio)) as responses:
            async for response in responses:
                yield response

    async def ListModels(
        self, request: asr_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.ListModelsResponse:
        recognizer = self._ready()
        return asr_pb2.ListModelsResponse(
            models=[
                asr_pb2.ModelInfo(
                    name=m.name,
                    family="whisper",
                    multilingual=m.multilingual,
                    languages=m.languages,
                    can_translate=m.multilingual,
                    precision=m.precision,
                    is_default=m.name == recognizer.default_model,
                )
                for m in recognizer.models.values()
            ]
        )

    async def GetConfig(
        self, request: asr_pb2.GetConfigRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.GetConfigResponse:
        s = self.settings
        return asr_pb2.GetConfigResponse(
            sample_rate_hertz=MODEL_RATE,
            max_audio_bytes=s.max_audio_bytes,
            max_audio_duration=duration(s.max_audio_duration_s),
            default_model=s.default_model,
            max_batch_size=s.max_batch_size,
            max_queue_size=s.max_queue,
            default_silence_duration=duration(s.silence_duration_s),
            default_sentence_end_silence_duration=duration(s.sentence_end_silence_s),
            encodings=[
                asr_pb2.AUDIO_ENCODING_LINEAR16,
                asr_pb2.AUDIO_ENCODING_WAV,
                asr_pb2.AUDIO_ENCODING_FLAC,
                asr_pb2.AUDIO_ENCODING_OGG,
            ],
        )
