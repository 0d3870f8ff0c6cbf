"""Hugging Face seq2seq translation checkpoints (Marian/opus-mt, NLLB, M2M100, ...) run
through optimum's ONNX export on onnxruntime.

A checkpoint folder is exported once into the model cache:

    <export_root>/hf-<folder name>-<fingerprint>/
        fp32/     encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx,
                  config.json, generation_config.json
        int8/     the same, weights dynamically quantized to int8
        tokenizer/
        .stamp

`decoder_with_past_model.onnx` carries the self- and cross-attention keys/values between
steps, so after the first step the decoder never recomputes the encoder's projections.
The merged decoder is not used: dynamic quantization leaves it unchanged.

This module imports torch (optimum's ORT classes need it); the service imports it only
when a Hugging Face model is configured.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort
from optimum.onnxruntime import ORTModelForSeq2SeqLM
from transformers import AutoTokenizer

from services.common.languages import normalize_language
from services.mt.settings import Precision

log = logging.getLogger("speechmesh.mt.hf")

# Bump when the export changes, so existing exports are redone.
EXPORT_VERSION = 1
_VERSIONED = ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")
_ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
_CONFIG_FILES = ("config.json", "generation_config.json")
# Language tokens of multilingual checkpoints: M2M100 `__pt__`, NLLB `por_Latn`,
# mBART-50 `pt_XX`, multi-target Marian `>>pt<<`.
_LANGUAGE_TOKEN = re.compile(
    r"^(?:__[a-z]{2,3}__|[a-z]{3}_[A-Z][a-z]{3}|[a-z]{2}_[A-Z]{2}|>>[a-z]{2,3}(?:_[A-Za-z]+)?<<)$"
)


def fingerprint(folder: Path) -> str:
    """Changes when the checkpoint's files or the exporting packages change."""
    digest = hashlib.sha256(f"export={EXPORT_VERSION}".encode())
    for package in _VERSIONED:
        digest.update(f";{package}={importlib.metadata.version(package)}".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f";{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def ensure_export(folder: Path, export_root: Path) -> Path:
    """The checkpoint's export folder, exporting it first when missing or stale."""
    target = export_root / f"hf-{folder.name}-{fingerprint(folder)}"
    if (target / ".stamp").is_file():
        return target
    export_root.mkdir(parents=True, exist_ok=True)
    # Two processes starting together export once: the second finds the stamp.
    with (export_root / ".hf-export.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".stamp").is_file():
            _export(folder, target)
    return target


def _export(folder: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("exporting to onnx", extra={"checkpoint": str(folder), "target": str(target)})
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        work = Path(tmp) / target.name
        model = ORTModelForSeq2SeqLM.from_pretrained(folder, export=True, local_files_only=True)
        model.save_pretrained(work / "fp32")
        AutoTokenizer.from_pretrained(folder).save_pretrained(work / "tokenizer")
        (work / "int8").mkdir()
        for name in _ONNX_FILES:
            quantize_dynamic(
                work / "fp32" / name, work / "int8" / name, weight_type=QuantType.QInt8
            )
        for name in _CONFIG_FILES:
            if (work / "fp32" / name).is_file():
                shutil.copyfile(work / "fp32" / name, work / "int8" / name)
        (work / ".stamp").write_text(folder.name)
        work.rename(target)
    log.info("exported", extra={"checkpoint": str(folder), "target": str(target)})


class HfSeq2Seq:
    """One checkpoint, possibly multilingual. `load()` once, then `translate()` from one
    thread at a time (the tokenizer's source language is set per call)."""

    def __init__(
        self, folder: Path, export_root: Path, precision: Precision = "int8", threads: int = 1
    ) -> None:
        self.folder = folder
        self.export_root = export_root
        self.precision = precision
        self.threads = threads
        self._model: Any = None
        self._tokenizer: Any = None
        self._language_tokens: dict[str, str] = {}
        self.version = ""

    def load(self) -> None:
        export = ensure_export(self.folder, self.export_root)
        self.version = export.name
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self._model = ORTModelForSeq2SeqLM.from_pretrained(
            export / self.precision,
            use_cache=True,
            use_merged=False,
            session_options=options,
            provider="CPUExecutionProvider",
            local_files_only=True,
        )
        self._tokenizer = AutoTokenizer.from_pretrained(export / "tokenizer")
        self._language_tokens = language_tokens(self._tokenizer)

    def translate(self, texts: list[str], beam_size: int, source: str, target: str) -> list[str]:
        tokenizer, model = self._tokenizer, self._model
        if model is None:
            raise RuntimeError("load() first")
        texts, options = select_languages(tokenizer, self._language_tokens, texts, source, target)
        inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        outputs = model.generate(**inputs, **options, num_beams=max(1, beam_size))
        return [str(text) for text in tokenizer.batch_decode(outputs, skip_special_tokens=True)]


def language_tokens(tokenizer: Any) -> dict[str, str]:
    """Language -> the token that stands for it, for a multilingual checkpoint (else {})."""
    found: dict[str, str] = {}
    names = {*tokenizer.get_vocab(), *tokenizer.additional_special_tokens}
    # M2M100 keeps its language tokens apart from the vocabulary.
    names.update(getattr(tokenizer, "lang_token_to_id", {}))
    for token in sorted(names):
        if _LANGUAGE_TOKEN.match(token):
            language = normalize_language(token.strip("_<>").replace("_", "-"))
            if language:
                found.setdefault(language, token)
    return found


def select_languages(
    tokenizer: Any, tokens: dict[str, str], texts: list[str], source: str, target: str
) -> tuple[list[str], dict[str, Any]]:
    """The texts and generate() options that make a multilingual checkpoint translate from
    `source` into `target`; sets the tokenizer's source language where it has one."""
    options: dict[str, Any] = {}
    target_token = tokens.get(target)
    if target_token and target_token.startswith(">>"):
        # Multi-target Marian: the source text starts with the target language's token.
        texts = [f"{target_token} {text}" for text in texts]
    elif target_token:
        # NLLB, M2M100, mBART-50: the first generated token is the target language's.
        options["forced_bos_token_id"] = tokenizer.convert_tokens_to_ids(target_token)
    source_token = tokens.get(source)
    if source_token and hasattr(tokenizer, "src_lang"):
        # M2M100 takes the bare code ("es" for "__es__"); the others take the token.
        tokenizer.src_lang = (
            source_token.strip("_") if source_token.startswith("__") else source_token
        )
    return texts, options
