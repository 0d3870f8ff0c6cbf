"""The Whisper models the service runs, by name: built ones from the model cache, and any
a user brings (an optimum ONNX export, or a Hugging Face checkpoint exported on first use)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.asr.whisper_onnx import WhisperOnnx
from services.common.settings import model_cache_dir

log = logging.getLogger("speechmesh.asr.models")

PRECISIONS = ("fp32", "int8")


@dataclass
class LoadedModel:
    name: str
    precision: str
    runner: WhisperOnnx

    @property
    def multilingual(self) -> bool:
        return self.runner.multilingual

    @property
    def languages(self) -> list[str]:
        return self.runner.languages if self.multilingual else ["en"]


def cached_folder(name: str) -> tuple[Path, str]:
    """`whisper-base-int8` → (<cache>/asr/whisper-base/onnx-int8, "int8")."""
    base, _, precision = name.rpartition("-")
    if precision not in PRECISIONS or not base:
        raise ValueError(f"model {name!r}: expected <name>-<{'|'.join(PRECISIONS)}>")
    folder = model_cache_dir() / "asr" / base / f"onnx-{precision}"
    if not (folder / "encoder_model.onnx").is_file():
        raise FileNotFoundError(f"model {name!r} not built at {folder}: run `make models`")
    return folder, precision


def onnx_folder_for(folder: Path, name: str) -> Path:
    """An ONNX export folder for a user's model, exporting a PyTorch checkpoint once."""
    if (folder / "encoder_model.onnx").is_file():
        return folder
    target = model_cache_dir() / "asr" / "user" / name
    if not (target / "encoder_model.onnx").is_file():
        from optimum.onnxruntime import ORTModelForSpeechSeq2Seq  # torch only on this path
        from transformers import AutoProcessor

        log.info("exporting to onnx", extra={"model": name, "source": str(folder)})
        exported = ORTModelForSpeechSeq2Seq.from_pretrained(folder, export=True, use_merged=False)
        exported.save_pretrained(target)
        AutoProcessor.from_pretrained(folder).save_pretrained(target)
    return target


def load_models(names: list[str], extra: dict[str, Path], threads: int) -> dict[str, LoadedModel]:
    models: dict[str, LoadedModel] = {}
    for name in names:
        folder, precision = cached_folder(name)
        models[name] = LoadedModel(name, precision, WhisperOnnx(folder, threads=threads))
    for name, folder in extra.items():
        models[name] = LoadedModel(
            name, "fp32", WhisperOnnx(onnx_folder_for(Path(folder), name), threads=threads)
        )
    for model in models.values():
        model.runner.load()
        log.info("model loaded", extra={"model": model.name, "multilingual": model.multilingual})
    return models
