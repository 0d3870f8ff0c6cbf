"""One streaming recognition: audio chunks in, interim and final results out.

The voice activity detector finds where each utterance starts and ends. While someone
speaks, an interim result of the utterance so far is sent every `interim_interval_s` of
speech (when asked for, computed while audio keeps coming in); when they fall silent for
the configured time, the utterance is recognized once more and sent as final. That final
recognition starts at the first short pause, speculatively, so most of it is done by the
time the silence is confirmed; an interim still computing then gives way to it (the
speculation is sent as the interim if speech goes on), and no interim starts during a
pause, so interims never delay a final. When speech resumes, the speculation is dropped
(queued, it never runs; running, its decoding stops) unless it stands in for an interim.
When its words end a sentence, a shorter silence (`sentence_end_silence_s`) ends the
utterance: a finished sentence is answered sooner, while a pause mid-sentence still waits
for the full silence. An utterance longer than `max_utterance_s` is finalized and
continues as the next one, so memory per stream stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soxr
from prometheus_client import Counter

from services.asr.audio import check_channels, check_rate, pcm16_to_float
from services.asr.recognizer import Recognition, Recognizer
from services.asr.settings import MAX_SILENCE_S, MIN_SILENCE_S
from services.asr.vad import RATE, Endpointer
from services.asr.whisper_onnx import Task
from services.common.errors import InvalidArgument
from services.common.proto_time import duration, seconds
from speechmesh.asr.v1 import asr_pb2

PREROLL_S = 0.2  # speech onsets are soft: keep a little audio before the detector fired
# A transcript ending like this ends a sentence (with the CJK full stop, fullwidth ? and !,
# the Arabic ? and the Devanagari danda); a trailing ellipsis says it trails off.
SENTENCE_ENDS = (".", "?", "!", "\u3002", "\uff1f", "\uff01", "\u061f", "\u0964")
EndedBy = Literal["silence", "sentence_end", "max_length", "half_close"]
CLOSING_QUOTES = "\"'\u201d\u2019\u00bb)"

utterance_ends = Counter(
    "speechmesh_asr_utterance_ends_total",
    "Streamed utterances finalized, by what ended them: the full silence, a shorter one "
    "after a finished sentence, the length limit, or the caller's half-close.",
    ["by"],
)


def _succeeded(task: asyncio.Task[Recognition]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _usable(task: asyncio.Task[Recognition]) -> bool:
    """Still running, or done with a result: a failed speculation is not the final's."""
    return not task.done() or _succeeded(task)


def ends_sentence(transcript: str) -> bool:
    text = transcript.rstrip().rstrip(CLOSING_QUOTES).rstrip()
    return text.endswith(SENTENCE_ENDS) and not text.endswith("...")


@dataclass(frozen=True)
class StreamConfig:
    rate: int
    channels: int
    language: str
    task: Task
    interim_results: bool
    single_utterance: bool
    silence_s: float
    sentence_end_silence_s: float | None  # None: only the full silence ends an utterance
    model: str


def _silence(config: asr_pb2.StreamingRecognitionConfig, field: str, default_s: float) -> float:
    silence = seconds(getattr(config, field)) if config.HasField(field) else default_s
    if not MIN_SILENCE_S <= silence <= MAX_SILENCE_S:
        raise InvalidArgument.field(
            f"config.{field}", f"must be between {MIN_SILENCE_S} and {MAX_SILENCE_S} s"
        )
    return silence


def stream_config(
    config: asr_pb2.StreamingRecognitionConfig,
    language: str,
    task: Task,
    default_silence_s: float,
    default_sentence_end_silence_s: float,
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
    silence = _silence(config, "silence_duration", default_silence_s)
    sentence_end = _silence(
        config, "sentence_end_silence_duration", min(default_sentence_end_silence_s, silence)
    )
    return StreamConfig(
        rate=config.sample_rate_hertz,
        channels=channels,
        language=language,
        task=task,
        interim_results=config.interim_results,
        single_utterance=config.single_utterance,
        silence_s=silence,
        sentence_end_silence_s=sentence_end if sentence_end < silence else None,
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
        window_margin_s: float | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.config = config
        self.endpointer = Endpointer(
            recognizer.vad, config.silence_s, sentence_end_silence_s=config.sentence_end_silence_s
        )
        self.resampler = (
            None
            if config.rate == RATE
            else soxr.ResampleStream(config.rate, RATE, 1, dtype="float32", quality="HQ")
        )
        self.interim_samples = int(interim_interval_s * RATE)
        self.max_samples = int(max_utterance_s * RATE)
        self.timeout_s = timeout_s
        self.window_margin_s = window_margin_s
        self.heard = 0  # 16 kHz samples received so far
        self.utterance_index = 0
        self.utterance_start: int | None = None  # stream position of the current utterance
        self.recent = np.zeros(0, np.float32)  # audio since utterance start (or the pre-roll)
        self.recent_start = 0
        self.last_interim = 0
        # (end sample, task): a final computed early, at a pause, and an interim in progress
        # (the same task when the speculation stands in for an interim it replaced)
        self.speculation: tuple[int, asyncio.Task[Recognition]] | None = None
        self.interim: tuple[int, asyncio.Task[Recognition]] | None = None

    def _to_model_rate(self, chunk: bytes, final: bool) -> np.ndarray:
        samples = pcm16_to_float(chunk, self.config.channels, "audio_content")
        mono = samples.mean(axis=1) if self.config.channels > 1 else samples[:, 0]
        if self.resampler is None:
            return np.ascontiguousarray(mono, np.float32)
        return self.resampler.resample_chunk(np.ascontiguousarray(mono, np.float32), last=final)

    def _recognize(self, end: int) -> asyncio.Task[Recognition]:
        """Starts recognizing the current utterance up to `end`. The audio is taken now,
        so the buffers may move on while the task waits for the model."""
        assert self.utterance_start is not None
        samples = self.recent[self.utterance_start - self.recent_start : end - self.recent_start]
        task = asyncio.create_task(
            self.recognizer.recognize(
                samples,
                language=self.config.language,
                task=self.config.task,
                word_timestamps=False,
                model_name=self.config.model,
                timeout_s=self.timeout_s,
                offset_s=self.utterance_start / RATE,
                window_margin_s=self.window_margin_s,
            )
        )
        # A speculation may be dropped after it failed; its error is not news then.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

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

    def _speculate(self, end: int) -> None:
        """A pause: recognize the utterance as if it ended here, so the final result is
        (nearly) ready when the silence is confirmed."""
        interim_pending = self.interim is not None and not self.interim[1].done()
        self._drop_speculation()
        task = self._recognize(end)
        self.speculation = (end, task)
        if interim_pending:
            # The speculation hears all the interim would, and more: it takes the interim's
            # place (sent as one if speech goes on) instead of waiting for the CPU behind it.
            # A caller streaming faster than real time so sees fewer interims.
            if self.interim is not None:
                self.interim[1].cancel()
            self.interim = (end, task)

    def _interim_is_speculation(self) -> bool:
        return (
            self.speculation is not None
            and self.interim is not None
            and self.interim[1] is self.speculation[1]
        )

    def _speech_resumed(self) -> None:
        """The pause was no end: its speculation is no final, and its work (which would
        run on until the next pause replaced it) is for nothing, unless it stands in for an
        interim, which is sent when it is done."""
        if not self._interim_is_speculation():
            self._drop_speculation()

    def _drop_speculation(self) -> None:
        if self.speculation is not None:
            task = self.speculation[1]
            task.cancel()  # nothing, if it is done
            if self._interim_is_speculation() and not _succeeded(task):
                self.interim = None  # a finished stand-in is still sent as the interim
            self.speculation = None

    async def _ends_sentence(self, end: int) -> bool:
        """Whether the utterance, as speculated at this silence, ends a sentence. Waits for
        the speculation (started at the pause, so mostly done): reading audio stops
        meanwhile, which delays nothing that could be answered sooner."""
        if self.speculation is None or self.speculation[0] != end:
            return False
        task = self.speculation[1]
        await asyncio.wait({task})
        # A speculation that failed says nothing here: the full silence decides, and the
        # final is recognized afresh then.
        return _succeeded(task) and ends_sentence(task.result().transcript)

    async def _finish(
        self, end: int, by: EndedBy
    ) -> AsyncGenerator[asr_pb2.StreamingRecognizeResponse, None]:
        speculation = self.speculation
        if speculation is not None and speculation[0] == end and _usable(speculation[1]):
            task = speculation[1]
            self.speculation = None
        else:
            self._drop_speculation()
            task = self._recognize(end)
        try:
            if self.interim is not None and self.interim[1] is not task:
                # Sent before the final: it was queued first (a pause would have replaced
                # it, so this is a half-close or the length limit), and is mostly done.
                interim_end, interim = self.interim
                recognition = await interim
                if recognition.transcript:
                    yield self._result(recognition, interim_end, final=False)
            self.interim = None
            recognition = await task
        finally:
            task.cancel()  # the stream ended meanwhile: stop its decoding (nothing if done)
        utterance_ends.labels(by).inc()
        if recognition.transcript:
            yield self._result(recognition, end, final=True)
            self.utterance_index += 1
        self.utterance_start = None
        self._forget_before(end)

    def _finished_interim(self) -> asr_pb2.StreamingRecognizeResponse | None:
        if self.interim is None or not self.interim[1].done():
            return None
        end, task = self.interim
        standing_in = self._interim_is_speculation()
        if standing_in and self.endpointer.paused:
            return None  # still quiet: this may be the final, which is sent as such
        self.interim = None
        if standing_in and not _succeeded(task):
            return None  # the final is recognized afresh, as for any failed speculation
        recognition = task.result()  # its error, if any, ends the stream like a final's
        return self._result(recognition, end, final=False) if recognition.transcript else None

    async def run(
        self, chunks: AsyncIterator[bytes]
    ) -> AsyncGenerator[asr_pb2.StreamingRecognizeResponse, None]:
        try:
            async with aclosing(self._run(chunks)) as responses:
                async for response in responses:
                    yield response
        finally:
            self._drop_speculation()
            if self.interim is not None:
                self.interim[1].cancel()

    async def _run(
        self, chunks: AsyncIterator[bytes]
    ) -> AsyncGenerator[asr_pb2.StreamingRecognizeResponse, None]:
        preroll = int(PREROLL_S * RATE)
        async for chunk in chunks:
            samples = self._to_model_rate(chunk, final=False)
            self.recent = np.concatenate([self.recent, samples])
            self.heard += len(samples)
            for boundary in self.endpointer.feed(samples):
                if self.utterance_start is None:
                    if boundary.kind == "start":
                        self.utterance_start = max(self.recent_start, boundary.sample - preroll)
                        self.last_interim = self.utterance_start
                    continue
                if boundary.kind == "pause":
                    self._speculate(boundary.sample)
                    continue
                if boundary.kind == "resume":
                    self._speech_resumed()
                    continue
                by: EndedBy
                if boundary.kind == "likely_end" and await self._ends_sentence(boundary.sample):
                    self.endpointer.end_utterance()
                    by = "sentence_end"
                elif boundary.kind == "end":
                    by = "silence"
                else:
                    continue
                said = False
                async with aclosing(self._finish(boundary.sample, by)) as finished:
                    async for response in finished:
                        yield response
                        said = said or response.result.is_final
                if said and self.config.single_utterance:
                    # After the final, not the interim sent before it.
                    yield asr_pb2.StreamingRecognizeResponse(
                        speech_event=asr_pb2.SPEECH_EVENT_END_OF_SINGLE_UTTERANCE
                    )
                    return
            interim = self._finished_interim()
            if interim is not None:
                yield interim
            if self.utterance_start is None:
                self._forget_before(self.heard - preroll)
                continue
            if self.heard - self.utterance_start >= self.max_samples:
                self._drop_speculation()
                async with aclosing(self._finish(self.heard, "max_length")) as finished:
                    async for response in finished:
                        yield response
                self.utterance_start = self.heard
                self.last_interim = self.heard
            elif (
                self.config.interim_results
                and self.interim is None  # one at a time: interims never queue up
                and not self.endpointer.paused  # the speculation is the newest news then
                and self.heard - self.last_interim >= self.interim_samples
            ):
                # Not awaited: reading audio (and finding the end of speech) goes on while
                # the interim is computed; it is sent with the next chunk after it is ready.
                self.last_interim = self.heard
                self.interim = (self.heard, self._recognize(self.heard))
        # Half-close: whatever is still being said is final now.
        if self.resampler is not None:
            tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self.recent = np.concatenate([self.recent, tail])
            self.heard += len(tail)
        if self.utterance_start is not None:
            async with aclosing(self._finish(self.heard, "half_close")) as finished:
                async for response in finished:
                    yield response
