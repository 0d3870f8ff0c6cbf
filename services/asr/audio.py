"""Audio in: validate, decode and convert to 16 kHz mono float32, refusing bad input with
field violations before anything large is allocated."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

from services.common.errors import InvalidArgument
from speechmesh.asr.v1 import asr_pb2

MODEL_RATE = 16_000
MIN_RATE = 4_000
MAX_RATE = 192_000
MAX_CHANNELS = 8
_CONTAINER_FORMATS = {
    asr_pb2.AUDIO_ENCODING_WAV: {"WAV", "WAVEX", "RF64"},
    asr_pb2.AUDIO_ENCODING_FLAC: {"FLAC"},
    asr_pb2.AUDIO_ENCODING_OGG: {"OGG"},
}


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int
    max_duration_s: float


def _refuse(field: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field, description, reason="BAD_AUDIO")


def check_rate(rate: int, field: str) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise _refuse(field, f"must be between {MIN_RATE} and {MAX_RATE} Hz, got {rate}")


def check_channels(channels: int, field: str) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise _refuse(field, f"must be between 1 and {MAX_CHANNELS}, got {channels}")


def pcm16_to_float(data: bytes, channels: int, field: str) -> np.ndarray:
    """Raw little-endian int16 PCM → float32 [frames, channels]."""
    if len(data) % (2 * channels):
        raise _refuse(
            field,
            f"LINEAR16 with {channels} channel(s) needs a multiple of "
            f"{2 * channels} bytes, got {len(data)}",
        )
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels)


def to_model_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """[frames, channels] at `rate` → mono float32 at 16 kHz."""
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != MODEL_RATE:
        mono = soxr.resample(mono, rate, MODEL_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def decode(audio: asr_pb2.Audio, limits: AudioLimits, field: str = "audio") -> np.ndarray:
    """The clip as 16 kHz mono float32 samples in [-1, 1]."""
    content = audio.content
    if not content:
        raise _refuse(f"{field}.content", "required: WAV/FLAC/OGG bytes or raw LINEAR16")
    if len(content) > limits.max_bytes:
        raise _refuse(
            f"{field}.content", f"{len(content)} bytes exceeds the {limits.max_bytes} limit"
        )
    if audio.encoding == asr_pb2.AUDIO_ENCODING_LINEAR16:
        channels = audio.channel_count or 1
        check_channels(channels, f"{field}.channel_count")
        if not audio.sample_rate_hertz:
            raise _refuse(f"{field}.sample_rate_hertz", "required for LINEAR16")
        check_rate(audio.sample_rate_hertz, f"{field}.sample_rate_hertz")
        duration = len(content) / (2 * channels * audio.sample_rate_hertz)
        _check_duration(duration, limits, field)
        samples, rate = (
            pcm16_to_float(content, channels, f"{field}.content"),
            audio.sample_rate_hertz,
        )
    else:
        samples, rate = _decode_container(audio, limits, field)
    if samples.shape[0] == 0:
        raise _refuse(f"{field}.content", "contains no samples")
    if not np.isfinite(samples).all():
        raise _refuse(f"{field}.content", "contains NaN or infinite samples")
    return to_model_rate(np.clip(samples, -1.0, 1.0), rate)


def _check_duration(duration_s: float, limits: AudioLimits, field: str) -> None:
    if duration_s > limits.max_duration_s:
        raise _refuse(
            f"{field}.content",
            f"{duration_s:.1f} s of audio exceeds the {limits.max_duration_s:.0f} s limit",
        )


def _decode_container(
    audio: asr_pb2.Audio, limits: AudioLimits, field: str
) -> tuple[np.ndarray, int]:
    try:
        info = soundfile.info(io.BytesIO(audio.content))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _refuse(f"{field}.content", "not a WAV, FLAC or OGG file (or truncated)") from exc
    expected = _CONTAINER_FORMATS.get(audio.encoding)
    if expected and info.format not in expected:
        raise _refuse(
            f"{field}.encoding",
            f"says {asr_pb2.AudioEncoding.Name(audio.encoding)} but the content is {info.format}",
        )
    check_rate(info.samplerate, f"{field}.content")
    check_channels(info.channels, f"{field}.content")
    # The header's claim is checked before decoding, so a huge claim never allocates.
    _check_duration(info.frames / info.samplerate, limits, field)
    try:
        samples, rate = soundfile.read(io.BytesIO(audio.content), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise _refuse(f"{field}.content", "the audio data is corrupt or truncated") from exc
    return samples, int(rate)
