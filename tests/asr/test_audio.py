"""Audio decoding and the refusals of bad audio, on real encoded files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from services.asr.audio import AudioLimits, decode
from services.common.errors import InvalidArgument
from speechmesh.asr.v1 import asr_pb2

LIMITS = AudioLimits(max_bytes=2_000_000, max_duration_s=30)


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def violation(error: pytest.ExceptionInfo[InvalidArgument]) -> str:
    return error.value.violations[0].field


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_containers_decode_to_16k_mono(fmt: str) -> None:
    content = encoded(tone(1.0, 48_000, channels=2), 48_000, fmt)
    samples = decode(asr_pb2.Audio(content=content), LIMITS)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 16_000) < 50
    assert 0.15 < np.abs(samples).max() < 0.35


def test_raw_linear16_with_its_rate_and_channels() -> None:
    pcm = (tone(0.5, 8_000, channels=2) * 32767).astype("<i2").tobytes()
    audio = asr_pb2.Audio(
        content=pcm,
        encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
        sample_rate_hertz=8_000,
        channel_count=2,
    )
    samples = decode(audio, LIMITS)
    assert abs(len(samples) - 8_000) < 20


@pytest.mark.parametrize(
    ("audio", "field"),
    [
        (asr_pb2.Audio(), "audio.content"),
        (asr_pb2.Audio(content=b"definitely not audio" * 10), "audio.content"),
        (
            asr_pb2.Audio(content=b"\x00\x01", encoding=asr_pb2.AUDIO_ENCODING_LINEAR16),
            "audio.sample_rate_hertz",
        ),
        (
            asr_pb2.Audio(
                content=b"\x00\x01", encoding=asr_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=1
            ),
            "audio.sample_rate_hertz",
        ),
        (
            asr_pb2.Audio(
                content=b"\x00\x01",
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hertz=10_000_000,
            ),
            "audio.sample_rate_hertz",
        ),
        (
            asr_pb2.Audio(
                content=b"\x00\x01\x02",
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hertz=16_000,
            ),
            "audio.content",
        ),
        (
            asr_pb2.Audio(
                content=b"\x00\x01",
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hertz=16_000,
                channel_count=99,
            ),
            "audio.channel_count",
        ),
        (asr_pb2.Audio(content=b"\x00" * 3_000_000), "audio.content"),
    ],
)
def test_bad_audio_is_refused_with_the_field(audio: asr_pb2.Audio, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode(audio, LIMITS)
    assert violation(caught) == field


def test_truncated_files_are_refused() -> None:
    content = encoded(tone(1.0, 16_000), 16_000, "FLAC")
    with pytest.raises(InvalidArgument):
        decode(asr_pb2.Audio(content=content[: len(content) // 3]), LIMITS)
    wav = encoded(tone(1.0, 16_000), 16_000, "WAV")
    samples = decode(asr_pb2.Audio(content=wav[:200]), LIMITS)  # a cut WAV keeps what it has
    assert 0 < len(samples) < 200


def test_nan_and_inf_samples_are_refused() -> None:
    samples = tone(0.5, 16_000)
    samples[100] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        decode(asr_pb2.Audio(content=encoded(samples, 16_000, "WAV", "FLOAT")), LIMITS)
    samples[100] = np.inf
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        decode(asr_pb2.Audio(content=encoded(samples, 16_000, "WAV", "FLOAT")), LIMITS)


def test_duration_is_checked_from_the_header_before_decoding() -> None:
    content = encoded(tone(31.0, 8_000), 8_000, "FLAC")
    with pytest.raises(InvalidArgument, match="exceeds the 30 s limit"):
        decode(asr_pb2.Audio(content=content), LIMITS)


def test_a_declared_container_must_match() -> None:
    content = encoded(tone(0.5, 16_000), 16_000, "WAV")
    with pytest.raises(InvalidArgument) as caught:
        decode(asr_pb2.Audio(content=content, encoding=asr_pb2.AUDIO_ENCODING_FLAC), LIMITS)
    assert violation(caught) == "audio.encoding"
