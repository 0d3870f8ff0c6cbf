"""Voice activity detection with Silero VAD on onnxruntime, for streaming endpointing.

The model takes 512-sample frames at 16 kHz (32 ms) preceded by the previous frame's last
64 samples, and carries a recurrent state between frames. `Endpointer` turns its speech
probabilities into utterances: speech starts when the probability crosses `threshold`, and
ends after `silence_s` below `threshold - 0.15` (Silero's own hysteresis). A "pause" comes
first, a short way into that silence, so the final result can be computed while the
silence is still being confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

FRAME = 512
CONTEXT = 64
RATE = 16_000
FRAME_S = FRAME / RATE
# Quiet this long is a pause worth a speculative final: short enough to save most of the
# silence wait, long enough that the gaps between words rarely trigger one.
PAUSE_S = 0.2


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
    kind: str  # "start", "pause" (speech may have ended here) or "end" (it has)
    sample: int  # position in the stream, in 16 kHz samples


class Endpointer:
    """Feeds audio of any chunk size through the VAD and reports utterance boundaries."""

    def __init__(self, vad: SileroVad, silence_s: float, threshold: float = 0.5) -> None:
        self.vad = vad
        self.state = VadState()
        self.silence_frames = max(1, round(silence_s / FRAME_S))
        pause_frames = max(1, round(PAUSE_S / FRAME_S))
        self.pause_frames = pause_frames if pause_frames < self.silence_frames else None
        self.on = threshold
        self.off = threshold - 0.15
        self.in_speech = False
        self._quiet = 0
        self._pending = np.zeros(0, np.float32)
        self._position = 0  # samples consumed by the VAD so far

    def feed(self, samples: np.ndarray) -> list[Boundary]:
        self._pending = np.concatenate([self._pending, samples])
        usable = len(self._pending) // FRAME * FRAME
        if not usable:
            return []
        frames = self._pending[:usable].reshape(-1, FRAME)
        self._pending = self._pending[usable:]
        boundaries = []
        for prob in self.vad.probabilities(self.state, frames):
            if not self.in_speech and prob >= self.on:
                self.in_speech = True
                self._quiet = 0
                boundaries.append(Boundary("start", self._position))
            elif self.in_speech:
                self._quiet = self._quiet + 1 if prob < self.off else 0
                # Where the silence began: the same sample for its pause and its end.
                silence_start = self._position + FRAME - self._quiet * FRAME
                if self._quiet >= self.silence_frames:
                    self.in_speech = False
                    boundaries.append(Boundary("end", silence_start))
                elif self._quiet == self.pause_frames:
                    boundaries.append(Boundary("pause", silence_start))
            self._position += FRAME
        return boundaries
