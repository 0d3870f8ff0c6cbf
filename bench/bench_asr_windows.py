"""`make bench-asr-windows`: how wide a window a streamed utterance needs.

A stream decodes each utterance the voice detector cuts on its own. Whisper's encoder
always sees 30 s, so a 3 s utterance pays for 27 s of padding; the project's any-length
encoder export lets an utterance be encoded in its own length plus a margin (the asr
setting `stream_window_margin_s`), and a result that looks degenerate there (Whisper's
compression-ratio and log-probability rules) is decoded again in 30 s.

This runs the model directly (no gRPC) on the utterances a stream would cut, with the
service's silence (0.5 s), from `make bench-asr`'s clips: 12 espeak-ng sentences and the two
human recordings shipped by moonshine-voice. For each margin it prints the time to decode all
of them, how many were redone in 30 s, and the word error rate against the text spoken,
beside the 30 s window measured in the same run. The margins run in a shuffled order, twice,
so that a warm cache or a noisy minute does not favour one of them.

    python bench/bench_asr_windows.py [--model whisper-base-int8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_asr import Clip, make_clips, wer
from services.asr.models import cached_folder
from services.asr.settings import AsrSettings
from services.asr.streaming import PREROLL_S
from services.asr.vad import RATE, Endpointer, SileroVad
from services.asr.whisper_onnx import Transcription, WhisperOnnx
from services.common.settings import model_cache_dir

MARGINS: tuple[float | None, ...] = (None, 1.0, 2.0, 3.0, 4.0, 5.0, 8.0)
SILENCE_S = 0.5
ROUNDS = 2


def utterances(clip: Clip, vad: SileroVad) -> list[np.ndarray]:
    """The clip cut as a stream cuts it: from each start (less the pre-roll) to its end."""
    silence = np.zeros(RATE, np.float32)
    audio = np.concatenate([silence[: RATE // 2], clip.samples, silence])
    endpointer = Endpointer(vad, SILENCE_S)
    pieces, start = [], None
    for boundary in endpointer.feed(audio):
        if boundary.kind == "start" and start is None:
            start = max(0, boundary.sample - int(PREROLL_S * RATE))
        elif boundary.kind == "end" and start is not None:
            pieces.append(audio[start : boundary.sample])
            start = None
    if start is not None:
        pieces.append(audio[start:])
    return pieces


class CountingWhisper(WhisperOnnx):
    """Counts the utterances that generate() decodes again in 30 s after a short window."""

    def __init__(self, folder: Path, threads: int) -> None:
        super().__init__(folder, threads=threads)
        self.redone = 0
        self._depth = 0

    def generate(self, audios: Sequence[np.ndarray], **options: Any) -> list[Transcription]:
        if self._depth:  # generate() calls itself only to redo degenerate results
            self.redone += len(audios)
        self._depth += 1
        try:
            return super().generate(audios, **options)
        finally:
            self._depth -= 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="whisper-base-int8")
    args = parser.parse_args()
    folder, _ = cached_folder(args.model)
    model = CountingWhisper(folder, AsrSettings.model_fields["threads"].default)
    model.load()
    vad = SileroVad(model_cache_dir() / "asr" / "silero_vad.onnx")
    with tempfile.TemporaryDirectory(prefix="bench-asr-windows-") as tmp:
        clips = list(make_clips(Path(tmp)).values())
    cut = [(clip, utterances(clip, vad)) for clip in clips]
    lengths = sorted(len(p) / RATE for _, pieces in cut for p in pieces)
    language = "en" if model.multilingual else None
    model.generate([cut[0][1][0]], language=language)  # warm-up

    seconds: dict[float | None, list[float]] = defaultdict(list)
    redone: dict[float | None, list[int]] = defaultdict(list)
    errors: dict[float | None, dict[str, float]] = {}
    order = list(MARGINS)
    for _ in range(ROUNDS):
        random.shuffle(order)
        for margin in order:
            model.redone = 0
            began = time.perf_counter()
            per_clip = {}
            for clip, pieces in cut:
                texts = [
                    model.generate([piece], language=language, window_margin_s=margin)[0].text
                    for piece in pieces
                ]
                per_clip[clip.name] = wer(clip.text, " ".join(texts))
            seconds[margin].append(time.perf_counter() - began)
            redone[margin].append(model.redone)
            errors[margin] = per_clip  # greedy decoding: the same every round

    print(
        f"{args.model}: {len(lengths)} utterances from {len(clips)} clips, cut as a stream "
        f"cuts them ({SILENCE_S} s of silence): {lengths[0]:.1f}-{lengths[-1]:.1f} s long, "
        f"median {statistics.median(lengths):.1f} s; {ROUNDS} rounds, margins in shuffled order"
    )
    full = statistics.median(seconds[None])
    default = AsrSettings.model_fields["stream_window_margin_s"].default
    print(
        f"{'window':<16} | {'s (median)':>10} {'÷ 30 s':>7} | {'redone':>6} | "
        f"{'WER espeak':>10} {'beckett':>7} {'two_cities':>10}"
    )
    for margin in MARGINS:
        label = "30 s" if margin is None else f"length + {margin:g} s"
        if margin == default:
            label += " *"
        spoken = [e for name, e in errors[margin].items() if name.startswith("espeak")]
        took = statistics.median(seconds[margin])
        print(
            f"{label:<16} | {took:>10.1f} {took / full:>7.2f} | "
            f"{max(redone[margin]):>6} | {statistics.mean(spoken):>10.3f} "
            f"{errors[margin]['beckett']:>7.3f} {errors[margin]['two_cities']:>10.3f}"
        )
    print(
        "* the service's default (SPEECHMESH_ASR_STREAM_WINDOW_MARGIN_S). redone: utterances "
        "whose short-window result looked degenerate and were decoded again in 30 s. "
        "WER: mean over the 12 espeak sentences; the recordings one clip each."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
