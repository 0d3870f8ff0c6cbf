"""Settings of the mt service (env prefix SPEECHMESH_MT_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.languages import normalize_language
from services.common.settings import ServiceSettings, model_cache_dir
from services.mt.registry import parse_pair

Precision = Literal["fp32", "int8"]


def _bergamot_defaults() -> dict[str, Path]:
    # What `make models` builds (services.mt.build_models).
    root = model_cache_dir() / "mt"
    return {"en-pt": root / "bergamot-en-pt", "pt-en": root / "bergamot-pt-en"}


def _export_root() -> Path:
    return model_cache_dir() / "mt"


class MtSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPEECHMESH_MT_", extra="ignore", protected_namespaces=()
    )

    port: int = 50052
    metrics_port: int = 9152

    bergamot_models: dict[str, Path] = Field(
        default_factory=_bergamot_defaults,
        description="Language pair (`en-pt`) -> folder built by services.mt.build_models; "
        "JSON in SPEECHMESH_MT_BERGAMOT_MODELS.",
    )
    hf_models: dict[str, Path] = Field(
        default_factory=dict,
        description="Language pair (`es-en`) -> Hugging Face seq2seq checkpoint folder, run "
        "through an ONNX export; JSON in SPEECHMESH_MT_HF_MODELS. A multilingual checkpoint "
        "(NLLB, M2M100) may serve several pairs.",
    )
    hf_export_dir: Path = Field(
        default_factory=_export_root,
        description="Where Hugging Face checkpoints are exported to ONNX (once per checkpoint).",
    )
    pivot_language: str = Field(
        default="en", description="Language to pivot through when no direct model exists."
    )
    precision: Precision = Field(default="int8", description="Model weights: int8 or fp32.")
    threads: int = Field(default=1, ge=1, description="onnxruntime threads per model.")

    max_texts: int = Field(default=64, gt=0, description="Texts per Translate call.")
    max_text_chars: int = Field(default=5000, gt=0, description="Characters per text.")
    max_sentence_chars: int = Field(
        default=400,
        ge=50,
        description="Longer sentences are cut at clause or word boundaries before the model.",
    )
    max_beam_size: int = Field(default=8, ge=1)

    max_batch_size: int = Field(default=16, gt=0, description="Sentences per model batch.")
    max_wait_ms: float = Field(
        default=3.0, ge=0, description="How long a batch may wait to fill up."
    )
    max_queue: int = Field(
        default=2048,
        gt=0,
        description="Sentences waiting per model; beyond it calls get RESOURCE_EXHAUSTED.",
    )

    cache_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="Translation cache TTL; 0 disables the cache."
    )
    redis_prefix: str = Field(default="sm:mt:", description="Prefix of every Redis key.")
    redis_timeout_s: float = Field(
        default=0.2,
        gt=0,
        description="Redis is only a cache here: a slow one must cost little before a miss.",
    )

    @field_validator("pivot_language")
    @classmethod
    def _pivot_is_a_language(cls, code: str) -> str:
        language = normalize_language(code)
        if language is None:
            raise ValueError(f"{code!r} is not a language code")
        return language

    @field_validator("bergamot_models", "hf_models")
    @classmethod
    def _pairs_are_language_pairs(cls, models: dict[str, Path]) -> dict[str, Path]:
        for pair in models:
            parse_pair(pair)
        return models

    @model_validator(mode="after")
    def _some_model(self) -> MtSettings:
        if not self.bergamot_models and not self.hf_models:
            raise ValueError("no models: set SPEECHMESH_MT_BERGAMOT_MODELS or _HF_MODELS")
        return self
