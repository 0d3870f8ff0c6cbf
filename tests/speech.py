"""Test speech shared by the tests and benchmarks: espeak-ng sentences made per session,
and the two human recordings moonshine-voice ships, all as 16 kHz mono float32."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from services.asr.build_models import package_folder

ASSETS = package_folder("moonshine_voice") / "assets"
RATE = 16_000

BECKETT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."
TWO_CITIES = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
    "was the season of Light, it was the season of Darkness, it was the spring of hope, it "
    "was the winter of despair, we had everything before us, we had nothing before us, we "
    "were all going direct to Heaven, we were all going direct the other way, in short, the "
    "period was so far like the present period, that some of its noisiest authorities "
    "insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only."
)
ENGLISH = (
    "Could you please send me the report before noon?",
    "We are going for a walk in the park this afternoon.",
    "I would like a cup of coffee with milk and two slices of toast.",
    "Please turn off the lights when you leave the room.",
)
# whisper-base names espeak-ng's Portuguese reliably only for some sentences; this is one.
PORTUGUESE = "Eu não sei o que fazer, mas acho que você tem razão. Vamos embora daqui."


def resampled(source: Path, target: Path) -> np.ndarray:
    """`source` as 16 kHz mono float32 (written to `target` on the way).

    `-D`: sox dithers with fresh random noise by default, so the same text made a slightly
    different clip on every run, and whisper-base heard "send" as "end" in about one run of
    twelve (it failed CI once). Without dither a clip is the same on every run.
    """
    subprocess.run(
        ["sox", "-q", str(source), "-D", "-r", str(RATE), "-c", "1", str(target)], check=True
    )
    audio, rate = soundfile.read(target, dtype="float32")
    assert rate == RATE
    return np.asarray(audio, np.float32)


def spoken(
    folder: Path, name: str, text: str, voice: str = "en-us", speed: int = 150
) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz mono float32 (files `name*.wav` in `folder`)."""
    raw = folder / f"{name}-22k.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    return resampled(raw, folder / f"{name}.wav")


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """name -> 16 kHz mono float32 speech."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make system-deps`")
    folder = tmp_path_factory.mktemp("speech")
    out = {f"en{i}": spoken(folder, f"en{i}", text) for i, text in enumerate(ENGLISH)}
    out["pt"] = spoken(folder, "pt", PORTUGUESE, voice="pt", speed=110)
    out["beckett"] = resampled(ASSETS / "beckett.wav", folder / "beckett.wav")
    out["two_cities"] = resampled(ASSETS / "two_cities.wav", folder / "two_cities.wav")
    return out


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
