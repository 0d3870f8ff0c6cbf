"""Silero VAD endpointing on real synthetic speech (espeak-ng) with silences between."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import soundfile

from services.asr.audio import to_model_rate
from services.asr.vad import Endpointer, SileroVad

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(Path(str(resources.files("silero_vad") / "data" / "silero_vad.onnx")))


def speech(tmp_path: Path, text: str) -> np.ndarray:
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return to_model_rate(samples, rate)


def test_two_utterances_are_found_whatever_the_chunking(vad: SileroVad, tmp_path: Path) -> None:
    words = speech(tmp_path, "Hello there, this is a test of the voice detector.")
    silence = np.zeros(16_000, np.float32)
    audio = np.concatenate([silence, words, silence, silence, words, silence])
    for chunk in (160, 1234, 16_000):
        endpointer = Endpointer(vad, silence_s=0.5, sentence_end_silence_s=0.3)
        found = []
        for start in range(0, len(audio), chunk):
            found += endpointer.feed(audio[start : start + chunk])
        # Each end comes after a pause and a likely end at the same sample (where its
        # silence began); a pause may also come mid-sentence, at the comma.
        for index, boundary in enumerate(found):
            if boundary.kind == "end":
                before = [b for b in found[:index] if b.kind in ("pause", "likely_end")]
                assert [(b.kind, b.sample) for b in before[-2:]] == [
                    ("pause", boundary.sample),
                    ("likely_end", boundary.sample),
                ], (chunk, found)
        # Speech after a pause resumes the utterance: the pause before it ended nothing.
        quiet = [b.kind for b in found if b.kind in ("pause", "resume", "end")]
        assert "resume" in quiet and quiet[-1] == "end", (chunk, found)  # resumed at the comma
        for before, after in itertools.pairwise(quiet):
            assert (before == "pause") == (after in ("resume", "end")), (chunk, quiet)
        found = [b for b in found if b.kind in ("start", "end")]
        kinds = [b.kind for b in found]
        assert kinds == ["start", "end", "start", "end"], (chunk, found)
        first_start = found[0].sample / 16_000
        assert 0.9 < first_start < 1.3
        second_start = found[2].sample / 16_000
        expected = (3 * 16_000 + len(words)) / 16_000
        assert abs(second_start - expected) < 0.3


def test_an_utterance_ended_at_a_likely_end_is_over(vad: SileroVad, tmp_path: Path) -> None:
    """Ended there, no end follows; the next words are a new start, even when they come
    in the same chunk as the likely end."""
    words = speech(tmp_path, "Hello there, this is a test of the voice detector.")
    gap = np.zeros(int(0.4 * 16_000), np.float32)  # a likely end (0.3 s), not an end (0.5 s)
    audio = np.concatenate([gap, words, gap, words, np.zeros(16_000, np.float32)])
    for chunk in (1234, len(audio)):
        endpointer = Endpointer(vad, silence_s=0.5, sentence_end_silence_s=0.3)
        found = []
        for start in range(0, len(audio), chunk):
            for boundary in endpointer.feed(audio[start : start + chunk]):
                found.append(boundary)
                if boundary.kind == "likely_end":
                    endpointer.end_utterance()
        kinds = [b.kind for b in found if b.kind not in ("pause", "resume")]
        assert kinds == ["start", "likely_end", "start", "likely_end"], (chunk, found)
        second_start = [b.sample for b in found if b.kind == "start"][1] / 16_000
        assert abs(second_start - (2 * len(gap) + len(words)) / 16_000) < 0.3


def test_silence_and_noise_are_not_speech(vad: SileroVad) -> None:
    rng = np.random.default_rng(0)
    endpointer = Endpointer(vad, silence_s=0.5)
    assert list(endpointer.feed(np.zeros(32_000, np.float32))) == []
    assert list(endpointer.feed((0.001 * rng.standard_normal(32_000)).astype(np.float32))) == []
