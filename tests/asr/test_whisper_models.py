"""The Whisper build and the torch-free runner, checked against CTranslate2 on real weights.

CTranslate2 runs the original faster-whisper `model.bin`; the converted PyTorch model and
the ONNX fp32 runner must choose exactly its greedy tokens. Speech comes from espeak-ng
(made per session) and from the recordings `moonshine-voice` ships.
"""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import ctranslate2
import numpy as np
import pytest

from services.asr.build_models import (
    STAGES,
    STAMP,
    asr_cache_dir,
    build,
    is_complete,
    whisper_sources,
)
from services.asr.ct2_reader import read_ct2
from services.asr.settings import AsrSettings
from services.asr.whisper_onnx import Transcription, WhisperOnnx, looks_degenerate
from tests.asr.wer import word_error_rate
from tests.speech import BECKETT, ENGLISH, RATE, TWO_CITIES

# torch and transformers are imported inside the tests that compare against them: they take
# seconds to import, which every test collection would otherwise pay.

MODELS = ("whisper-tiny.en", "whisper-base")
THREADS = 2


@pytest.fixture(scope="session")
def model_folders() -> dict[str, Path]:
    """Builds what is missing (a no-op on a built cache)."""
    return build()


@pytest.fixture(scope="session")
def runners(model_folders: dict[str, Path]) -> dict[tuple[str, str], WhisperOnnx]:
    loaded = {}
    for name in MODELS:
        for precision in ("onnx-fp32", "onnx-int8"):
            runner = WhisperOnnx(model_folders[name] / precision, threads=THREADS)
            runner.load()
            loaded[name, precision] = runner
    return loaded


@pytest.fixture(scope="session")
def ct2_models(model_folders: dict[str, Path]) -> dict[str, ctranslate2.models.Whisper]:
    """CTranslate2 on the original weights (for base, the two parts joined by the build)."""
    return {
        name: ctranslate2.models.Whisper(
            str(model_folders[name] / "ct2"),
            device="cpu",
            compute_type="float32",
            intra_threads=THREADS,
        )
        for name in MODELS
    }


def _ct2_tokens(
    model: ctranslate2.models.Whisper, runner: WhisperOnnx, audio: np.ndarray, timestamps: bool
) -> list[int]:
    prompt = runner.prompt(_english(runner), "transcribe", timestamps)
    features = ctranslate2.StorageView.from_array(runner.features([audio]))
    (result,) = model.generate(features, [prompt], beam_size=1)
    return list(result.sequences_ids[0])


def _english(runner: WhisperOnnx) -> str | None:
    return "en" if runner.multilingual else None


@pytest.mark.models
@pytest.mark.parametrize("name", MODELS)
def test_converted_checkpoint_decodes_like_ctranslate2(
    name: str,
    model_folders: dict[str, Path],
    runners: dict[tuple[str, str], WhisperOnnx],
    ct2_models: dict[str, ctranslate2.models.Whisper],
    clips: dict[str, np.ndarray],
) -> None:
    import torch
    from transformers import WhisperForConditionalGeneration

    runner = runners[name, "onnx-fp32"]
    model = WhisperForConditionalGeneration.from_pretrained(model_folders[name] / "hf").eval()
    eot = model.generation_config.eos_token_id
    options = {"language": "en", "task": "transcribe"} if runner.multilingual else {}
    for clip in ("en0", "beckett"):
        features = torch.from_numpy(runner.features([clips[clip]]))
        with torch.inference_mode():
            sequence = model.generate(features, num_beams=1, do_sample=False, **options)[0]
        # Ids from <|endoftext|> up are the prompt and end tokens, not text.
        text_ids = [t for t in sequence.tolist() if t < eot]
        assert text_ids == _ct2_tokens(ct2_models[name], runner, clips[clip], False), clip


@pytest.mark.models
@pytest.mark.parametrize("name", MODELS)
def test_converted_config_follows_the_weights(name: str, model_folders: dict[str, Path]) -> None:
    config = json.loads((model_folders[name] / "hf" / "config.json").read_text())
    generation = json.loads((model_folders[name] / "hf" / "generation_config.json").read_text())
    expected = {
        "whisper-tiny.en": (384, 4, 6, 51864, False),
        "whisper-base": (512, 6, 8, 51865, True),
    }[name]
    assert (
        config["d_model"],
        config["encoder_layers"],
        config["encoder_attention_heads"],
        config["vocab_size"],
        generation["is_multilingual"],
    ) == expected
    assert len(generation["alignment_heads"]) == 8
    if generation["is_multilingual"]:
        assert len(generation["lang_to_id"]) == 99
        assert generation["lang_to_id"]["<|pt|>"] == 50267
        assert generation["task_to_id"] == {"transcribe": 50359, "translate": 50358}
        assert generation["no_timestamps_token_id"] == 50363
    else:
        assert "lang_to_id" not in generation
        assert generation["no_timestamps_token_id"] == 50362


@pytest.mark.models
@pytest.mark.parametrize("timestamps", [False, True], ids=["text", "timestamps"])
@pytest.mark.parametrize("name", MODELS)
def test_onnx_fp32_chooses_ctranslate2_tokens(
    name: str,
    timestamps: bool,
    runners: dict[tuple[str, str], WhisperOnnx],
    ct2_models: dict[str, ctranslate2.models.Whisper],
    clips: dict[str, np.ndarray],
) -> None:
    runner = runners[name, "onnx-fp32"]
    for clip in ("en0", "beckett"):
        (result,) = runner.generate([clips[clip]], language=_english(runner), timestamps=timestamps)
        assert result.tokens == _ct2_tokens(ct2_models[name], runner, clips[clip], timestamps), clip
        if timestamps:
            assert result.segments, clip
            starts = [s.start for s in result.segments]
            assert starts == sorted(starts)
            assert all(0 <= s.start <= s.end <= 30 for s in result.segments)


@pytest.mark.models
@pytest.mark.parametrize(
    "margin_s",
    [None, 1.0, AsrSettings.model_fields["stream_window_margin_s"].default],
    ids=["30s-window", "1s-margin", "default-margin"],
)
@pytest.mark.parametrize("name", MODELS)
def test_onnx_int8_word_error_rate(
    name: str,
    margin_s: float | None,
    runners: dict[tuple[str, str], WhisperOnnx],
    clips: dict[str, np.ndarray],
) -> None:
    runner = runners[name, "onnx-int8"]
    english = [clips[f"en{i}"] for i in range(len(ENGLISH))]
    results = runner.generate(
        [*english, clips["beckett"]], language=_english(runner), window_margin_s=margin_s
    )
    texts = [r.text for r in results]
    assert word_error_rate(ENGLISH, texts[:-1]) < 0.15, texts
    assert word_error_rate([BECKETT], texts[-1:]) < 0.15, texts


@pytest.mark.models
def test_an_abandoned_clip_leaves_its_batch_and_the_others_are_untouched(
    runners: dict[tuple[str, str], WhisperOnnx], clips: dict[str, np.ndarray]
) -> None:
    runner = runners["whisper-base", "onnx-int8"]
    alone = runner.generate([clips["en1"]], language="en", timestamps=True)
    asked: list[int] = []

    def abandoned(item: int) -> bool:
        asked.append(item)
        return item == 1

    kept, dropped = runner.generate(
        [clips["en1"], clips["en2"]], language="en", timestamps=True, abandoned=abandoned
    )
    assert kept.tokens == alone[0].tokens
    assert len(dropped.tokens) == 1 and asked.count(1) == 1  # gone after its first token


@pytest.mark.models
@pytest.mark.parametrize("name", MODELS)
def test_any_length_encoder_is_the_encoder_on_a_full_window(
    name: str, runners: dict[tuple[str, str], WhisperOnnx], clips: dict[str, np.ndarray]
) -> None:
    runtime = runners[name, "onnx-fp32"]._require()
    assert runtime.encoder_any_length is not None
    features = runners[name, "onnx-fp32"].features([clips["en0"]])
    ours = runtime.encoder_any_length.run(None, {"input_features": features})[0]
    optimum = runtime.encoder.run(None, {"input_features": features})[0]
    assert np.abs(ours - optimum).max() < 1e-3
    encoded, short = runners[name, "onnx-fp32"]._encode_window([clips["en0"]], margin_s=1.0)
    assert short and encoded.shape[1] < 1500 / 5  # a ~3 s clip: a window of ~4 s, not 30


def test_degenerate_results_are_recognized() -> None:
    def result(text: str, logprob: float) -> Transcription:
        return Transcription([], text, logprob, 0.0, "en", 1.0, [])

    assert looks_degenerate(result(" the report the report" * 20, -0.2))  # repeats itself
    assert looks_degenerate(result(" Could you send me the report?", -1.4))  # unsure
    assert not looks_degenerate(result(" Could you send me the report?", -0.3))


@pytest.mark.models
@pytest.mark.parametrize("precision", ["onnx-fp32", "onnx-int8"])
@pytest.mark.parametrize("name", MODELS)
def test_batch_gives_each_clip_its_own_tokens(
    name: str,
    precision: str,
    runners: dict[tuple[str, str], WhisperOnnx],
    clips: dict[str, np.ndarray],
) -> None:
    runner = runners[name, precision]
    audios = [clips["en1"], clips["beckett"], clips["en2"]]
    languages: list[str | None] = [_english(runner)] * 3
    if runner.multilingual:
        # One clip of another language, detected inside the batch.
        audios[2], languages[2] = clips["pt"], None
    for timestamps in (False, True):
        batch = runner.generate(audios, language=languages, timestamps=timestamps)
        alone = [
            runner.generate([audio], language=code, timestamps=timestamps)[0]
            for audio, code in zip(audios, languages, strict=True)
        ]
        assert [r.tokens for r in batch] == [r.tokens for r in alone]
        assert len({tuple(r.tokens) for r in batch}) == 3


@pytest.mark.models
@pytest.mark.parametrize("precision", ["onnx-fp32", "onnx-int8"])
def test_base_detects_portuguese_and_translates_to_english(
    precision: str, runners: dict[tuple[str, str], WhisperOnnx], clips: dict[str, np.ndarray]
) -> None:
    runner = runners["whisper-base", precision]
    ((code, probability),) = runner.detect_language(runner.encode(runner.features([clips["pt"]])))
    assert code == "pt" and probability > 0.5
    (heard,) = runner.generate([clips["pt"]])
    assert heard.language == "pt"
    assert {"não", "você"} <= set(heard.text.lower().replace(",", " ").split())
    (translated,) = runner.generate([clips["pt"]], task="translate")
    words = set(translated.text.lower().replace(",", " ").replace(".", " ").split())
    assert {"i", "know", "what", "think"} <= words, translated.text
    assert translated.text.isascii(), translated.text


@pytest.mark.models
def test_english_only_model_refuses_other_languages_and_translation(
    runners: dict[tuple[str, str], WhisperOnnx], clips: dict[str, np.ndarray]
) -> None:
    runner = runners["whisper-tiny.en", "onnx-int8"]
    with pytest.raises(ValueError):
        runner.generate([clips["en0"]], language="pt")
    with pytest.raises(ValueError):
        runner.generate([clips["en0"]], task="translate")
    with pytest.raises(ValueError):
        runner.detect_language(runner.encode(runner.features([clips["en0"]])))


@pytest.mark.models
@pytest.mark.parametrize("name", MODELS)
def test_long_audio_is_windowed_by_timestamps(
    name: str, runners: dict[tuple[str, str], WhisperOnnx], clips: dict[str, np.ndarray]
) -> None:
    audio = clips["two_cities"]
    result: Transcription = runners[name, "onnx-int8"].transcribe_long(audio)
    assert word_error_rate([TWO_CITIES], [result.text]) < 0.1, result.text
    bounds = [(s.start, s.end) for s in result.segments]
    assert all(start <= end for start, end in bounds)
    assert all(b[1] <= c[0] + 1e-6 for b, c in itertools.pairwise(bounds))
    # The speech runs past the first 30 s window and its end is placed near the clip's end.
    assert bounds[-1][1] > 35 and bounds[-1][1] <= len(audio) / RATE + 0.5


@pytest.mark.models
def test_features_match_whisper_feature_extractor(
    runners: dict[tuple[str, str], WhisperOnnx], clips: dict[str, np.ndarray]
) -> None:
    from transformers import WhisperFeatureExtractor

    runner = runners["whisper-base", "onnx-int8"]
    reference = WhisperFeatureExtractor.from_pretrained(runner.folder)
    noise = np.random.default_rng(0).standard_normal(3 * RATE).astype(np.float32) * 0.1
    audios = [clips["beckett"], clips["two_cities"], noise, np.zeros(800, np.float32)]
    ours = runner.features(audios)
    theirs = reference(audios, sampling_rate=RATE, return_tensors="np").input_features
    assert ours.shape == theirs.shape == (4, 80, 3000)
    assert np.abs(ours - theirs).max() < 1e-4
    # Short windows compute only their frames, and get the same values, down to the fewest
    # frames whose neighbours hold no audio (here the noise is loud to its last sample).
    fewest = -(-(len(noise) + 200) // 160)
    short = runner.features(audios[2:], frames=fewest)
    assert short.shape == (2, 80, fewest)
    assert np.array_equal(short, ours[2:, :, :fewest])
    with pytest.raises(ValueError, match="do not cover"):
        runner.features([noise], frames=fewest - 1)


@pytest.mark.models
def test_rebuild_is_a_no_op(model_folders: dict[str, Path]) -> None:
    root = asr_cache_dir()

    def snapshot() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}

    before = snapshot()
    started = time.perf_counter()
    assert build() == model_folders
    assert time.perf_counter() - started < 5
    assert snapshot() == before


@pytest.mark.models
def test_interrupted_stage_is_redone_alone(model_folders: dict[str, Path]) -> None:
    folder = model_folders["whisper-tiny.en"]
    fingerprint = whisper_sources()["tiny.en"].fingerprint()
    earlier = {stage: (folder / stage / STAMP).stat().st_mtime_ns for stage in STAGES}
    # What a run killed while quantizing leaves: no stamp on the last stage, a temp folder.
    (folder / "onnx-int8" / STAMP).unlink()
    (folder / ".tmp-onnx-int8-killed").mkdir()
    build(only="tiny.en")
    assert not (folder / ".tmp-onnx-int8-killed").exists()
    assert all(is_complete(folder / stage, fingerprint) for stage in STAGES)
    later = {stage: (folder / stage / STAMP).stat().st_mtime_ns for stage in STAGES}
    assert [s for s in STAGES if later[s] != earlier[s]] == ["onnx-int8"]


def test_runner_imports_no_torch() -> None:
    code = (
        "import sys, services.asr.whisper_onnx; "
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_ct2_reader_parses_variables_aliases_and_fp16(tmp_path: Path) -> None:
    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    heads = np.array(6, np.int16)
    data = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, 2)
    data += string("a/weight") + struct.pack("<BII", 2, 2, 3) + struct.pack("<BI", 4, 12)
    data += weight.tobytes()
    data += string("a/num_heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2)
    data += heads.tobytes()
    data += struct.pack("<I", 1) + string("b/weight") + string("a/weight")
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    model = read_ct2(path)
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    assert model.variables["a/weight"].dtype == np.float16
    np.testing.assert_array_equal(model.variables["b/weight"], weight)
    assert model.scalar("a/num_heads") == 6
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError):
        read_ct2(path)
