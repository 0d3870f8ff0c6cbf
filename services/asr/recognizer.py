"""Recognition: validate the request against the model, batch clips across callers, split
long audio at its quietest points, cache transcripts.

Long audio (more than one 30 s Whisper window) is cut where the voice activity detector
hears the least speech, between 15 and 30 s into each piece, and the pieces are decoded as
one batch — faster than Whisper's sequential seeking, and no word is cut in half unless
someone speaks for 15 s without a pause.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter

from services.asr.models import LoadedModel
from services.asr.vad import FRAME, RATE, SileroVad, VadState
from services.asr.whisper_onnx import Segment, Task, Transcription
from services.common.batching import DynamicBatcher
from services.common.errors import InvalidArgument, NotFound, shown

WINDOW = 30 * RATE
MIN_PIECE = 15 * RATE

abandoned_total = Counter(
    "speechmesh_asr_abandoned_in_batch_total",
    "Recognitions cancelled while their batch ran (the caller gone or past its deadline, or "
    "a stream's speculation or interim superseded); their decoding stopped at the next step.",
)


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class TimedSegment:
    text: str
    start: float
    end: float
    avg_logprob: float
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class Recognition:
    transcript: str
    language: str
    language_probability: float
    segments: list[TimedSegment]
    duration_s: float
    model: str


@dataclass(frozen=True)
class _Job:
    model: str
    task: Task
    samples: np.ndarray
    language: str | None
    window_margin_s: float | None = None  # see WhisperOnnx.generate
    # Set when the caller stops waiting: decoding stops for it even mid-batch.
    gone: threading.Event = field(default_factory=threading.Event, compare=False)


def interpolate_words(segment: Segment) -> list[Word]:
    """Word times spread over the segment by character count: the ONNX export has no
    cross-attention outputs to align words exactly, so these are estimates."""
    words = re.findall(r"\s*\S+", segment.text)
    if not words:
        return []
    total = sum(len(w.strip()) for w in words)
    span = segment.end - segment.start
    found, at = [], segment.start
    for word in words:
        end = at + span * len(word.strip()) / total
        found.append(Word(word, round(at, 3), round(end, 3)))
        at = end
    return found


def split_points(samples: np.ndarray, vad: SileroVad) -> list[int]:
    """Where to cut audio longer than one window: the least speech-like frame between
    15 and 30 s into each piece."""
    if len(samples) <= WINDOW:
        return []
    usable = len(samples) // FRAME * FRAME
    probs = vad.probabilities(VadState(), samples[:usable].reshape(-1, FRAME))
    cuts, start = [], 0
    while len(samples) - start > WINDOW:
        first, last = (start + MIN_PIECE) // FRAME, min((start + WINDOW) // FRAME, len(probs)) - 1
        # The latest among the quietest frames keeps pieces long (fewer windows to decode).
        quiet = probs[first : last + 1]
        best = first + len(quiet) - 1 - int(np.argmin(quiet[::-1]))
        start = best * FRAME
        cuts.append(start)
    return cuts


class Recognizer:
    def __init__(
        self,
        models: dict[str, LoadedModel],
        default_model: str,
        vad: SileroVad,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
    ) -> None:
        if default_model not in models:
            raise ValueError(f"default model {default_model!r} is not among {sorted(models)}")
        self.models = models
        self.default_model = default_model
        self.vad = vad
        # Jobs of one model and task share batches; every segment needs timestamps.
        self.batcher: DynamicBatcher[_Job, Transcription] = DynamicBatcher(
            "asr",
            self._run_batch,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            batch_key=lambda job: (job.model, job.task, job.window_margin_s),
        )

    def start(self) -> None:
        self.batcher.start()

    def model(self, name: str) -> LoadedModel:
        model = self.models.get(name or self.default_model)
        if model is None:
            raise NotFound(
                f"model {shown(name)} is not loaded; see ListModels",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name},
            )
        return model

    def check(self, model: LoadedModel, language: str, task: Task) -> None:
        """Refuses what the model cannot do, naming the field."""
        if language and language not in model.languages:
            raise InvalidArgument.field(
                "language",
                f"{model.name} does not know {shown(language)}"
                + ("" if model.multilingual else " (it is English-only)"),
                reason="UNSUPPORTED_LANGUAGE",
            )
        if task == "translate" and not model.multilingual:
            raise InvalidArgument.field(
                "task",
                f"{model.name} is English-only and cannot translate",
                reason="UNSUPPORTED_TASK",
            )

    def _run_batch(self, key: Hashable, jobs: Sequence[_Job]) -> list[Transcription]:
        first = jobs[0]
        stopped: set[int] = set()

        def abandoned(item: int) -> bool:
            # Asked only of items still decoding (or about to be decoded again).
            if jobs[item].gone.is_set():
                stopped.add(item)
            return item in stopped

        results = self.models[first.model].runner.generate(
            [j.samples for j in jobs],
            language=[j.language for j in jobs],
            task=first.task,
            timestamps=True,
            window_margin_s=first.window_margin_s,
            abandoned=abandoned,
        )
        abandoned_total.inc(len(stopped))
        return results

    async def _submit(self, job: _Job, timeout_s: float | None) -> Transcription:
        try:
            return await self.batcher.submit(job, timeout_s)
        finally:
            # Cancelled or past its deadline: the batch it is in stops decoding it. (After
            # a result, the batch is over and this changes nothing.)
            job.gone.set()

    async def recognize(
        self,
        samples: np.ndarray,
        *,
        language: str,
        task: Task,
        word_timestamps: bool,
        model_name: str,
        timeout_s: float | None,
        offset_s: float = 0.0,
        window_margin_s: float | None = None,
    ) -> Recognition:
        model = self.model(model_name)
        self.check(model, language, task)
        cuts = await asyncio.to_thread(split_points, samples, self.vad)
        bounds = list(zip([0, *cuts], [*cuts, len(samples)], strict=True))
        pieces = [samples[a:b] for a, b in bounds]
        detected = None
        if not language and model.multilingual:
            # The first piece decides the language the others are decoded in; with the
            # language given (or only one known), all pieces go at once and share a batch.
            detected = await self._submit(
                _Job(model.name, task, pieces[0], None, window_margin_s), timeout_s
            )
        chosen = language or (detected and detected.language) or "en"
        pending = [
            asyncio.ensure_future(
                self._submit(_Job(model.name, task, piece, chosen, window_margin_s), timeout_s)
            )
            for piece in (pieces if detected is None else pieces[1:])
        ]
        try:
            decoded = await asyncio.gather(*pending)
        finally:
            for job in pending:  # one failed: the others' work is for nothing
                job.cancel()
        results = decoded if detected is None else [detected, *decoded]
        segments = []
        for (start, end), piece in zip(bounds, results, strict=True):
            at = offset_s + start / RATE
            piece_segments = piece.segments or (
                [Segment(0.0, (end - start) / RATE, piece.text)] if piece.text.strip() else []
            )
            for s in piece_segments:
                timed = Segment(round(at + s.start, 3), round(at + s.end, 3), s.text)
                segments.append(
                    TimedSegment(
                        text=s.text.strip(),
                        start=timed.start,
                        end=timed.end,
                        avg_logprob=piece.avg_logprob,
                        words=interpolate_words(timed) if word_timestamps else [],
                    )
                )
        return Recognition(
            transcript=" ".join(s.text for s in segments if s.text),
            language=chosen,
            language_probability=float(detected.language_probability or 0.0) if detected else 1.0,
            segments=segments,
            duration_s=len(samples) / RATE,
            model=model.name,
        )

    async def stop(self) -> None:
        await self.batcher.stop()
