"""Settings of the asr service (env prefix SPEECHMESH_ASR_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

# What a stream may ask for (and the defaults must be) as the silence that ends an utterance.
MIN_SILENCE_S = 0.1
MAX_SILENCE_S = 5.0


class AsrSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SPEECHMESH_ASR_", extra="ignore")

    port: int = 50051
    metrics_port: int = 9151
    max_message_bytes: int = 32 * 1024 * 1024

    models: list[str] = Field(
        default=["whisper-base-int8", "whisper-tiny.en-int8"],
        description="Models to load from the model cache, as <name>-<fp32|int8>.",
    )
    default_model: str = Field(
        default="whisper-base-int8",
        description="The model used when a request names none (whisper-tiny.en-int8 for "
        "English-only deployments).",
    )
    extra_models: dict[str, Path] = Field(
        default_factory=dict,
        description="More models by name: a Hugging Face Whisper checkpoint or an optimum ONNX "
        'export folder (JSON, e.g. {"whisper-small": "/models/whisper-small"}).',
    )
    threads: int = Field(default=2, ge=1, description="onnxruntime threads per inference.")

    max_batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=10.0, ge=0)
    max_queue: int = Field(default=64, ge=1)

    max_audio_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    max_audio_duration_s: float = Field(default=600.0, gt=0)

    silence_duration_s: float = Field(
        default=0.5,
        ge=MIN_SILENCE_S,
        le=MAX_SILENCE_S,
        description="Silence that ends a streaming utterance by default.",
    )
    sentence_end_silence_s: float = Field(
        default=0.3,
        ge=MIN_SILENCE_S,
        le=MAX_SILENCE_S,
        description="Shorter silence that ends a streaming utterance by default when its "
        "transcript so far ends a sentence (. ? !); a stream gets at most its "
        "silence_duration, and not below it turns this off.",
    )
    interim_interval_s: float = Field(
        default=1.0, gt=0, description="Speech between two interim results of a stream."
    )
    stream_window_margin_s: float = Field(
        default=5.0,
        ge=0,
        description="Streams only: encode an utterance in a window of its length plus this "
        "margin instead of Whisper's 30 s (about 3x less work on short utterances; "
        "degenerate results are redone in 30 s). 0 keeps 30 s windows. Margins under 3 s "
        "have many results redone (`make bench-asr-windows`).",
    )
    max_utterance_s: float = Field(
        default=30.0, gt=0, le=30, description="A longer utterance is finalized and continued."
    )
    cache_ttl_s: int = Field(default=86_400, ge=0, description="Transcript cache TTL; 0 disables.")
    redis_prefix: str = "sm:asr:"
    redis_timeout_s: float = Field(default=0.5, gt=0)
