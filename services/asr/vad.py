"""Voice activity detection with Silero VAD on onnxruntime, for streaming endpointing.

The model takes 512-sample frames at 16 kHz (32 ms) preceded by the previous frame's last
64 samples, and carries a recurrent state between frames. `Endpointer` turns its speech
probabilities into utterances: speech starts when the probability crosses `threshold`, and
ends after `silence_s` below `threshold - 0.15` (Silero's own hysteresis). A "pause" comes
first, a short way into that silence, so the final result can be computed while the
silence is still being confirmed. With `sentence_end_silence_s`, a "likely_end" comes
between them: the caller may end the utterance there when its words say it is over.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

FRAME = 512
CONTEXT = 64
RATE = 16_000
FRAME_S = FRAME / RATE
# Quiet this long is a pause worth a speculative final: one frame, so the final is (nearly)
# decoded by the time even a short silence is confirmed; on 2 cores decoding a 3 s utterance
# takes ~250 ms, the longest part of the wait. The gaps between words seldom reach one
# frame below the off threshold: on the benchmark's clips 22 pauses came per 12 utterance
# ends of espeak-ng speech and 21 per 8 in a human recording (14 and 19 at two frames,
# whose finals came 30-40 ms later: p50 509-534 ms against 470-493 ms in two runs of
# bench-asr's latency part). A stream has at most one speculation: the next pause cancels
# the last, and speech resuming drops it (at no cost while it is still queued; running, its
# decoding stops at the next step).
PAUSE_S = FRAME_S


class SileroVad:
    """The shared model; each stream keeps its own `VadState`. Thread-safe (onnxruntime
    sessions may be run concurrently)."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._rate = np.array(RATE, dtype=np.int64)

    def probabilities(self, state: VadState, frames: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample frame in `frames` [n, 512], in order."""
        probs = np.empty(len(frames), dtype=np.float32)
        for i, frame in enumerate(frames):
            window = np.concatenate([state.context, frame])[None, :]
            output, state.recurrent = self.session.run(
                None, {"input": window, "state": state.recurrent, "sr": self._rate}
            )
            state.context = frame[-CONTEXT:]
            probs[i] = float(output[0, 0])
        return probs


@dataclass
class VadState:
    recurrent: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))


@dataclass
class Boundary:
    # "start"; "pause" (speech may have ended here); "resume" (it had not: speech again
    # after a pause); "likely_end" (it has, if the words say so); "end" (it has)
    kind: Literal["start", "pause", "resume", "likely_end", "end"]
    sample: int  # position in the stream, in 16 kHz samples


class Endpointer:
    """Feeds audio of any chunk size through the VAD and reports utterance boundaries."""

    def __init__(
        self,
        vad: SileroVad,
        silence_s: float,
        threshold: float = 0.5,
        sentence_end_silence_s: float | None = None,
    ) -> None:
        self.vad = vad
        self.state = VadState()
        self.silence_frames = max(1, round(silence_s / FRAME_S))

        def before_end(seconds: float | None) -> int | None:
            """Frames of quiet for a boundary before the end; None if it would not come first."""
            if seconds is None:
                return None
            frames = max(1, round(seconds / FRAME_S))
            return frames if frames < self.silence_frames else None

        self.likely_end_frames = before_end(sentence_end_silence_s)
        self.pause_frames = before_end(PAUSE_S)  # one frame: never after the likely end
        self.on = threshold
        self.off = threshold - 0.15
        self.in_speech = False
        self._quiet = 0
        self._pending = np.zeros(0, np.float32)
        self._position = 0  # samples consumed by the VAD so far

    def feed(self, samples: np.ndarray) -> Iterator[Boundary]:
        """The boundaries in `samples` (with what was left over from the last feed), judged
        frame by frame as the caller takes them, so an utterance it ends at a "likely_end"
        is over before the frames after that are judged. Take them all."""
        self._pending = np.concatenate([self._pending, samples])
        usable = len(self._pending) // FRAME * FRAME
        frames = self._pending[:usable].reshape(-1, FRAME)
        self._pending = self._pending[usable:]
        first, self._position = self._position, self._position + usable
        return self._boundaries(first, self.vad.probabilities(self.state, frames) if usable else [])

    def _boundaries(self, first: int, probabilities: Iterable[float]) -> Iterator[Boundary]:
        for index, prob in enumerate(probabilities):
            position = first + index * FRAME
            if not self.in_speech and prob >= self.on:
                self.in_speech = True
                self._quiet = 0
                yield Boundary("start", position)
            elif self.in_speech:
                if prob >= self.off:
                    resumed, self._quiet = self.paused, 0
                    if resumed:
                        yield Boundary("resume", position)
                    continue
                self._quiet += 1
                # Where the silence began: the same sample for its pause, likely end and end.
                silence_start = position + FRAME - self._quiet * FRAME
                if self._quiet >= self.silence_frames:
                    self.in_speech = False
                    yield Boundary("end", silence_start)
                else:
                    if self._quiet == self.pause_frames:
                        yield Boundary("pause", silence_start)
                    if self._quiet == self.likely_end_frames:
                        yield Boundary("likely_end", silence_start)

    @property
    def paused(self) -> bool:
        """In an utterance, quiet since its last "pause" (the speaker may be done)."""
        return self.in_speech and self.pause_frames is not None and self._quiet >= self.pause_frames

    def end_utterance(self) -> None:
        """The caller ended the utterance at a "likely_end": no "end" follows it, and the
        next frame of speech is a new "start"."""
        self.in_speech = False
        self._quiet = 0
