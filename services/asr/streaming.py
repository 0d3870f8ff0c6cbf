"""One streaming recognition: audio chunks in, interim and final results out.

The voice activity detector finds where each utterance starts and ends. While someone
speaks, an interim result of the utterance so far is sent every `interim_interval_s` of
speech (when asked for); when they fall silent for the configured time, the utterance is
recognized once more and sent as final. An utterance longer than `max_utterance_s` is
finalized and continues as the next one, so memory per stream stays bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import soxr

from services.asr.audio import check_channels, check_rate, pcm16_to_float
from services.asr.recognizer import Recognition, Recognizer
from services.asr.vad import RATE, Endpointer
from services.asr.whisper_onnx import Task
from services.common.errors import InvalidArgument
from services.common.proto_time import duration, seconds
from speechmesh.asr.v1 import asr_pb2

PREROLL_S = 0.2  # speech onsets are soft: keep a little audio before the detector fired
MIN_SILENCE_S = 0.1
MAX_SILENCE_S = 5.0


@dataclass(frozen=True)
class StreamConfig:
    rate: int
    channels: int
    language: str
    task: Task
    interim_results: bool
    single_utterance: bool
    silence_s: float
    model: str


def stream_config(
    config: asr_pb2.StreamingRecognitionConfig, language: str, task: Task, default_silence_s: float
) -> StreamConfig:
    if config.encoding not in (asr_pb2.AUDIO_ENCODING_UNSPECIFIED, asr_pb2.AUDIO_ENCODING_LINEAR16):
        raise InvalidArgument.field(
            "config.encoding", "streams carry raw LINEAR16 chunks; containers are not streamable"
        )
    if not config.sample_rate_hertz:
        raise InvalidArgument.field("config.sample_rate_hertz", "required")
    check_rate(config.sample_rate_hertz, "config.sample_rate_hertz")
    channels = config.channel_count or 1
    check_channels(channels, "config.channel_count")
    silence = (
        seconds(config.silence_duration)
        if config.HasField("silence_duration")
        else default_silence_s
    )
    if not MIN_SILENCE_S <= silence <= MAX_SILENCE_S:
        raise InvalidArgument.field(
            "config.silence_duration", f"must be between {MIN_SILENCE_S} and {MAX_SILENCE_S} s"
        )
    return StreamConfig(
        rate=config.sample_rate_hertz,
        channels=channels,
        language=language,
        task=task,
        interim_results=config.interim_results,
        single_utterance=config.single_utterance,
        silence_s=silence,
        model=config.model,
    )


class StreamSession:
    def __init__(
        self,
        recognizer: Recognizer,
        config: StreamConfig,
        *,
        interim_interval_s: float,
        max_utterance_s: float,
        timeout_s: float | None,
    ) -> None:
        self.recognizer = recognizer
        self.config = config
        self.endpointer = Endpointer(recognizer.vad, config.silence_s)
        self.resampler = (
            None
            if config.rate == RATE
            else soxr.ResampleStream(config.rate, RATE, 1, dtype="float32", quality="HQ")
        )
        self.interim_samples = int(interim_interval_s * RATE)
        self.max_samples = int(max_utterance_s * RATE)
        self.timeout_s = timeout_s
        self.heard = 0  # 16 kHz samples received so far
        self.utterance_index = 0
        self.utterance_start: int | None = None  # stream position of the current utterance
        self.recent = np.zeros(0, np.float32)  # audio since utterance start (or the pre-roll)
        self.recent_start = 0
        self.last_interim = 0

    def _to_model_rate(self, chunk: bytes, final: bool) -> np.ndarray:
        samples = pcm16_to_float(chunk, self.config.channels, "audio_content")
        mono = samples.mean(axis=1) if self.config.channels > 1 else samples[:, 0]
        if self.resampler is None:
            return np.ascontiguousarray(mono, np.float32)
        return self.resampler.resample_chunk(np.ascontiguousarray(mono, np.float32), last=final)

    async def _recognize(self, end: int) -> Recognition:
        assert self.utterance_start is not None
        samples = self.recent[self.utterance_start - self.recent_start : end - self.recent_start]
        return await self.recognizer.recognize(
            samples,
            language=self.config.language,
            task=self.config.task,
            word_timestamps=False,
            model_name=self.config.model,
            timeout_s=self.timeout_s,
            offset_s=self.utterance_start / RATE,
        )

    def _result(
        self, recognition: Recognition, end: int, final: bool
    ) -> asr_pb2.StreamingRecognizeResponse:
        assert self.utterance_start is not None
        return asr_pb2.StreamingRecognizeResponse(
            result=asr_pb2.StreamingRecognitionResult(
                transcript=recognition.transcript,
                is_final=final,
                utterance_index=self.utterance_index,
                start_offset=duration(self.utterance_start / RATE),
                end_offset=duration(end / RATE),
                language=recognition.language,
                segments=[
                    asr_pb2.Segment(
                        text=s.text,
                        start_offset=duration(s.start),
                        end_offset=duration(s.end),
                        avg_logprob=s.avg_logprob,
                    )
                    for s in recognition.segments
                ]
                if final
                else [],
            )
        )

    def _forget_before(self, position: int) -> None:
        drop = max(0, position - self.recent_start)
        self.recent = self.recent[drop:]
        self.recent_start += drop

    async def _finish(self, end: int) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        recognition = await self._recognize(end)
        if recognition.transcript:
            yield self._result(recognition, end, final=True)
            self.utterance_index += 1
        self.utterance_start = None
        self._forget_before(end)

    async def run(
        self, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        preroll = int(PREROLL_S * RATE)
        async for chunk in chunks:
            samples = self._to_model_rate(chunk, final=False)
            self.recent = np.concatenate([self.recent, samples])
            self.heard += len(samples)
            for boundary in self.endpointer.feed(samples):
                if boundary.kind == "start" and self.utterance_start is None:
                    self.utterance_start = max(self.recent_start, boundary.sample - preroll)
                    self.last_interim = self.utterance_start
                elif boundary.kind == "end" and self.utterance_start is not None:
                    async for response in self._finish(boundary.sample):
                        yield response
                        if self.config.single_utterance:
                            yield asr_pb2.StreamingRecognizeResponse(
                                speech_event=asr_pb2.SPEECH_EVENT_END_OF_SINGLE_UTTERANCE
                            )
                            return
            if self.utterance_start is None:
                self._forget_before(self.heard - preroll)
                continue
            if self.heard - self.utterance_start >= self.max_samples:
                async for response in self._finish(self.heard):
                    yield response
                self.utterance_start = self.heard
                self.last_interim = self.heard
            elif (
                self.config.interim_results
                and self.heard - self.last_interim >= self.interim_samples
            ):
                self.last_interim = self.heard
                interim = await self._recognize(self.heard)
                if interim.transcript:
                    yield self._result(interim, self.heard, final=False)
        # Half-close: whatever is still being said is final now.
        if self.resampler is not None:
            tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self.recent = np.concatenate([self.recent, tail])
            self.heard += len(tail)
        if self.utterance_start is not None:
            async for response in self._finish(self.heard):
                yield response
