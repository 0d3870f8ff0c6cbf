"""The mt service over real gRPC, with the real Bergamot models, a tiny Hugging Face Marian
and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.errors import DeadlineExceeded
from services.common.server import Runtime
from services.common.testing import (
    RedisServer,
    error_details,
    insecure_channel,
    running_service,
)
from services.common.utf8 import invalid_utf8_fields
from services.mt.build_models import build
from services.mt.marian_onnx import MarianOnnx
from services.mt.service import MtService
from services.mt.settings import MtSettings
from services.mt.translator import TranslateJob
from speechmesh.mt.v1 import mt_pb2, mt_pb2_grpc
from tests.mt.test_marian_models import ENGLISH, PORTUGUESE
from tests.mt.tiny_marian import CORPUS, build_tiny_marian

MT_SERVICE = "speechmesh.mt.v1.MtService"
ROOT = Path(__file__).resolve().parents[2]
TINY = "tiny-marian"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="session")
def bergamot_models() -> dict[str, Path]:
    return {path.name.removeprefix("bergamot-"): path for path in build()}


@pytest.fixture(scope="session")
def reference(bergamot_models: dict[str, Path]) -> dict[tuple[str, str], MarianOnnx]:
    """The runners on their own, to compare the service with: (direction, precision)."""
    runners = {}
    for direction, folder in bergamot_models.items():
        for precision in ("int8", "fp32"):
            runner = MarianOnnx(folder, precision)  # type: ignore[arg-type]
            runner.load()
            runners[direction, precision] = runner
    return runners


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_marian(tmp_path_factory.mktemp("checkpoints") / TINY)


@pytest.fixture(scope="session")
def hf_export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the session, so the tiny checkpoint is exported once."""
    return tmp_path_factory.mktemp("hf-export")


def mt_settings(
    redis_url: str, redis_prefix: str, bergamot: dict[str, Path], **overrides: object
) -> MtSettings:
    options: dict[str, object] = {
        "port": 0,
        "metrics_port": -1,
        "host": "127.0.0.1",
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "health_interval_s": 0.2,
        "access_log": False,
        "bergamot_models": bergamot,
    }
    options.update(overrides)
    return MtSettings(**options)  # type: ignore[arg-type]


@dataclass
class MtHarness:
    runtime: Runtime
    service: MtService
    stub: mt_pb2_grpc.MtServiceStub
    channel: grpc.aio.Channel

    async def translate(self, *texts: str, **fields: object) -> list[mt_pb2.Translation]:
        fields.setdefault("target_language", "pt")
        request = mt_pb2.TranslateRequest(texts=texts, **fields)  # type: ignore[arg-type]
        return list((await self.stub.Translate(request)).translations)


@contextlib.asynccontextmanager
async def serve(settings: MtSettings) -> AsyncIterator[MtHarness]:
    service = MtService(settings)
    async with running_service(service, settings) as runtime:
        async with insecure_channel(runtime.port) as channel:
            yield MtHarness(runtime, service, mt_pb2_grpc.MtServiceStub(channel), channel)


@pytest.fixture
async def mt(
    redis_url: str, redis_prefix: str, bergamot_models: dict[str, Path]
) -> AsyncIterator[MtHarness]:
    async with serve(mt_settings(redis_url, redis_prefix, bergamot_models)) as harness:
        yield harness


@pytest.fixture
async def mixed(
    redis_url: str,
    redis_prefix: str,
    bergamot_models: dict[str, Path],
    tiny_checkpoint: Path,
    hf_export_dir: Path,
) -> AsyncIterator[MtHarness]:
    """Bergamot and the tiny checkpoint (es→en and es→fr), fp32 so that the Hugging Face
    path can be compared token for token with transformers in PyTorch."""
    settings = mt_settings(
        redis_url,
        redis_prefix,
        bergamot_models,
        hf_models={"es-en": tiny_checkpoint, "es-fr": tiny_checkpoint},
        hf_export_dir=hf_export_dir,
        precision="fp32",
        cache_ttl_s=0,
    )
    async with serve(settings) as harness:
        yield harness


async def expect_error(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in error_details(error)["BadRequest"].field_violations]


# --- translation ------------------------------------------------------------------------


@pytest.mark.models
async def test_translates_in_order_like_the_runner(
    mt: MtHarness, reference: dict[tuple[str, str], MarianOnnx]
) -> None:
    texts = ENGLISH[:6]
    results = await mt.translate(*texts, source_language="en")
    expected = reference["en-pt", "int8"].translate_batch(texts)
    assert [r.text for r in results] == [e.text for e in expected]
    assert all(list(r.models) == ["bergamot-en-pt"] and r.source_language == "en" for r in results)
    back = await mt.translate(*PORTUGUESE[:3], source_language="pt-BR", target_language="en")
    assert [r.text for r in back] == [
        e.text for e in reference["pt-en", "int8"].translate_batch(PORTUGUESE[:3])
    ]


@pytest.mark.models
async def test_beam_search(mt: MtHarness, reference: dict[tuple[str, str], MarianOnnx]) -> None:
    results = await mt.translate(*ENGLISH[:4], source_language="en", beam_size=4)
    expected = reference["en-pt", "int8"].translate_batch(ENGLISH[:4], beam_size=4)
    assert [r.text for r in results] == [e.text for e in expected]


@pytest.mark.models
async def test_long_texts_are_split_into_sentences_and_put_back_together(
    mt: MtHarness, reference: dict[tuple[str, str], MarianOnnx]
) -> None:
    text = f"  {ENGLISH[0]} {ENGLISH[1]}\n\n{ENGLISH[2]}  {ENGLISH[3]}\n"
    (result,) = await mt.translate(text, source_language="en")
    parts = [out.text for out in reference["en-pt", "int8"].translate_batch(ENGLISH[:4])]
    assert result.text == f"  {parts[0]} {parts[1]}\n\n{parts[2]}  {parts[3]}\n"


@pytest.mark.models
async def test_urls_emails_and_numbers_survive_both_directions(mt: MtHarness) -> None:
    # Unprotected, the model writes "maria.silva-example.com", "1.250" and "17,5".
    english = [
        "Send the 3 reports to maria.silva@example.com before 10:30 tomorrow.",
        "The full price list is at https://shop.example.com/prices?id=42, updated daily.",
        "We sold 1,250 units in 2023, up 17.5% from the year before.",
    ]
    results = await mt.translate(*english, source_language="en")
    for text, result in zip(english, results, strict=True):
        for span in ("3", "maria.silva@example.com", "10:30"):
            if span in text:
                assert span in result.text, result.text
    assert "https://shop.example.com/prices?id=42" in results[1].text
    assert all(n in results[2].text for n in ("1,250", "2023", "17.5")), results[2].text
    # Unprotected, the model writes "support.com.br", "1,299.90" and ".../en-br".
    portuguese = {
        "Ligue para 0800 123 4567 ou escreva para suporte@empresa.com.br hoje.": (
            "0800 123 4567",
            "suporte@empresa.com.br",
        ),
        "O pedido custa R$ 1.299,90 e chega em 12/05/2024.": ("1.299,90", "12/05/2024"),
        "Acesse https://www.gov.br/receitafederal/pt-br para mais detalhes.": (
            "https://www.gov.br/receitafederal/pt-br",
        ),
    }
    back = await mt.translate(*portuguese, source_language="pt", target_language="en")
    for spans, result in zip(portuguese.values(), back, strict=True):
        assert all(span in result.text for span in spans), result.text


@pytest.mark.models
async def test_glossary_and_do_not_translate(mt: MtHarness) -> None:
    (result,) = await mt.translate(
        "The Spring Festival starts on Friday and the museum opens early.",
        source_language="en",
        glossary=[mt_pb2.GlossaryEntry(source="museum", target="Museu do Amanhã")],
        do_not_translate=["Spring Festival"],
    )
    assert "Spring Festival" in result.text and "Museu do Amanhã" in result.text, result.text
    assert "museu " not in result.text.replace("Museu do Amanhã", "")


@pytest.mark.models
async def test_detects_the_source_language_or_asks_for_it(mt: MtHarness) -> None:
    english, portuguese = ENGLISH[4], PORTUGUESE[3]
    results = await mt.translate(english, portuguese, target_language="pt")
    assert results[0].source_language == "en" and list(results[0].models) == ["bergamot-en-pt"]
    # Already in the target language: returned as it is, with no model.
    assert results[1].source_language == "pt" and not results[1].models
    assert results[1].text == portuguese
    # Nothing to detect and nothing to translate: returned as it is.
    empty, number = await mt.translate("", "42 - 7", target_language="en")
    assert (empty.text, number.text) == ("", "42 - 7")
    assert not empty.models and not number.models
    error = await expect_error(mt.translate(english, "OK"), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_details(error)["ErrorInfo"].reason == "LANGUAGE_NOT_DETECTED"
    assert violations(error) == ["source_language"]
    assert "texts[1]" in (error.details() or "")


@pytest.mark.models
async def test_concurrent_callers_share_batches_and_get_their_own_results(
    mt: MtHarness, reference: dict[tuple[str, str], MarianOnnx]
) -> None:
    batcher = "mt-bergamot-en-pt"
    batches_before = sample("speechmesh_batch_size_count", batcher=batcher)
    items_before = sample("speechmesh_batch_size_sum", batcher=batcher)
    results = await asyncio.gather(*(mt.translate(text, source_language="en") for text in ENGLISH))
    expected = [reference["en-pt", "int8"].translate_batch([t])[0].text for t in ENGLISH]
    assert [r[0].text for r in results] == expected
    batches = sample("speechmesh_batch_size_count", batcher=batcher) - batches_before
    assert sample("speechmesh_batch_size_sum", batcher=batcher) - items_before == len(ENGLISH)
    assert batches < len(ENGLISH) / 2, f"{len(ENGLISH)} callers ran in {batches} batches"


# --- cache --------------------------------------------------------------------------------


async def wait_cached(harness: MtHarness, text: str, **fields: object) -> mt_pb2.Translation:
    for _ in range(50):
        (result,) = await harness.translate(text, **fields)
        if result.cached:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError("never served from the cache")


@pytest.mark.models
async def test_cache_hits_per_pair_model_and_beam(mt: MtHarness) -> None:
    text = f"{ENGLISH[7]} {ENGLISH[8]}"
    hits_before = sample("speechmesh_cache_lookups_total", cache="mt", result="hit")
    (first,) = await mt.translate(text, source_language="en")
    assert not first.cached
    again = await wait_cached(mt, text, source_language="en")
    assert again.text == first.text
    assert sample("speechmesh_cache_lookups_total", cache="mt", result="hit") >= hits_before + 2
    # Another beam width is another entry.
    (beam,) = await mt.translate(text, source_language="en", beam_size=3)
    assert not beam.cached
    # Only one of two sentences cached: the text is not served from the cache.
    (mixed_text,) = await mt.translate(f"{ENGLISH[7]} {ENGLISH[9]}", source_language="en")
    assert not mixed_text.cached


@pytest.mark.models
async def test_translates_without_redis_and_stays_ready(
    redis_prefix: str, bergamot_models: dict[str, Path]
) -> None:
    with RedisServer() as redis:
        settings = mt_settings(redis.url, redis_prefix, bergamot_models)
        async with serve(settings) as mt:
            text = ENGLISH[10]
            (first,) = await mt.translate(text, source_language="en")
            await wait_cached(mt, text, source_language="en")
            errors_before = sample("speechmesh_cache_errors_total", cache="mt")
            redis.stop()
            (down,) = await mt.translate(text, source_language="en")
            assert down.text == first.text and not down.cached
            assert sample("speechmesh_cache_errors_total", cache="mt") > errors_before
            await asyncio.sleep(0.5)  # a few readiness checks
            health = health_pb2_grpc.HealthStub(mt.channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service=MT_SERVICE))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            redis.start()
            await wait_cached(mt, text, source_language="en")


# --- the Hugging Face path ------------------------------------------------------------------


def torch_reference(checkpoint: Path, texts: list[str], beam: int = 1) -> list[str]:
    from transformers import AutoTokenizer, MarianMTModel

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = MarianMTModel.from_pretrained(checkpoint)
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    outputs = model.generate(**inputs, num_beams=beam)
    return [str(t) for t in tokenizer.batch_decode(outputs, skip_special_tokens=True)]


@pytest.mark.models
async def test_hugging_face_checkpoint_end_to_end(mixed: MtHarness, tiny_checkpoint: Path) -> None:
    texts = CORPUS[:5]
    for beam in (1, 3):
        results = await mixed.translate(
            *texts, source_language="es", target_language="en", beam_size=beam
        )
        assert [r.text for r in results] == torch_reference(
            tiny_checkpoint, [f">>en<< {t}" for t in texts], beam
        )
        assert all(list(r.models) == [TINY] for r in results)
    assert len({r.text for r in results}) > 1, "the outputs should depend on the input"
    # The same checkpoint is multi-target: the target language picks the token.
    french = await mixed.translate(*texts, source_language="es", target_language="fr")
    assert [r.text for r in french] == torch_reference(
        tiny_checkpoint, [f">>fr<< {t}" for t in texts]
    )


@pytest.mark.models
async def test_pivots_through_english(
    mixed: MtHarness, tiny_checkpoint: Path, reference: dict[tuple[str, str], MarianOnnx]
) -> None:
    text = CORPUS[1]
    (result,) = await mixed.translate(text, source_language="es", target_language="pt")
    assert list(result.models) == [TINY, "bergamot-en-pt"]
    (english,) = torch_reference(tiny_checkpoint, [f">>en<< {text}"])
    assert result.text == reference["en-pt", "fp32"].translate_batch([english])[0].text


@pytest.mark.models
async def test_spans_survive_a_model_that_loses_placeholders(mixed: MtHarness) -> None:
    # Random weights never copy "[0]", so this goes through the fallback around the spans.
    before = sample("speechmesh_mt_placeholder_fallbacks_total", route="es-en")
    (result,) = await mixed.translate(
        "el gato duerme en https://example.com/gato y bob@example.com lo sabe",
        source_language="es",
        target_language="en",
    )
    assert "https://example.com/gato" in result.text and "bob@example.com" in result.text
    assert sample("speechmesh_mt_placeholder_fallbacks_total", route="es-en") == before + 1


@pytest.mark.models
async def test_lists_direct_then_pivoted_pairs(mixed: MtHarness) -> None:
    response = await mixed.stub.ListLanguagePairs(mt_pb2.ListLanguagePairsRequest())
    pairs = [
        (p.source_language, p.target_language, list(p.models), p.pivot, p.pivot_language)
        for p in response.pairs
    ]
    assert pairs == [
        ("en", "pt", ["bergamot-en-pt"], False, ""),
        ("es", "en", [TINY], False, ""),
        ("es", "fr", [TINY], False, ""),
        ("pt", "en", ["bergamot-pt-en"], False, ""),
        ("es", "pt", [TINY, "bergamot-en-pt"], True, "en"),
    ]


@pytest.mark.models
def test_int8_export_is_quantized_and_translates(
    tiny_checkpoint: Path, hf_export_dir: Path
) -> None:
    from services.mt.hf_seq2seq import HfSeq2Seq, ensure_export

    export = ensure_export(tiny_checkpoint, hf_export_dir)
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"):
        fp32, int8 = (export / p / name for p in ("fp32", "int8"))
        assert int8.stat().st_size < fp32.stat().st_size
    model = HfSeq2Seq(tiny_checkpoint, hf_export_dir, "int8")
    model.load()
    outputs = model.translate(CORPUS[:3], 1, "es", "en")
    assert len(outputs) == 3 and all(outputs)
    assert ensure_export(tiny_checkpoint, hf_export_dir) == export  # a second call reuses it


def test_multilingual_checkpoints_select_their_languages(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, M2M100Tokenizer, NllbTokenizer

    from services.mt.hf_seq2seq import language_tokens, select_languages

    sentencepiece = str(tiny_checkpoint / "source.spm")
    texts = ["el gato"]
    # Multi-target Marian: a token in front of the text.
    marian = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokens = language_tokens(marian)
    assert tokens == {"en": ">>en<<", "fr": ">>fr<<"}
    assert select_languages(marian, tokens, texts, "es", "fr") == ([">>fr<< el gato"], {})
    # A language the checkpoint has no token for changes nothing (a bilingual checkpoint).
    assert select_languages(marian, tokens, texts, "es", "de") == (texts, {})
    # NLLB: source language on the tokenizer, target as the forced first token.
    nllb = NllbTokenizer(vocab_file=sentencepiece)
    tokens = language_tokens(nllb)
    assert tokens["pt"] == "por_Latn" and tokens["es"] == "spa_Latn"
    _, options = select_languages(nllb, tokens, texts, "es", "pt")
    assert options == {"forced_bos_token_id": nllb.convert_tokens_to_ids("por_Latn")}
    assert nllb.src_lang == "spa_Latn"
    assert nllb(texts).input_ids[0][0] == nllb.convert_tokens_to_ids("spa_Latn")
    # M2M100: the same, with `__pt__` tokens and bare codes for the source.
    (tmp_path / "vocab.json").write_text((tiny_checkpoint / "vocab.json").read_text())
    m2m = M2M100Tokenizer(vocab_file=str(tmp_path / "vocab.json"), spm_file=sentencepiece)
    tokens = language_tokens(m2m)
    assert tokens["pt"] == "__pt__"
    _, options = select_languages(m2m, tokens, texts, "es", "pt")
    assert options == {"forced_bos_token_id": m2m.get_lang_id("pt")}
    assert m2m(texts).input_ids[0][0] == m2m.get_lang_id("es")


# --- bad input, limits, deadlines ---------------------------------------------------------


@pytest.mark.models
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["a"] * 65}, "texts"),
        ({"texts": ["ok", "x" * 5001]}, "texts[1]"),
        ({"texts": ["ok", "bell\x07"]}, "texts[1]"),
        ({"texts": ["ok"], "target_language": ""}, "target_language"),
        ({"texts": ["ok"], "target_language": "not a language"}, "target_language"),
        ({"texts": ["ok"], "source_language": "e"}, "source_language"),
        ({"texts": ["ok"], "beam_size": 9}, "beam_size"),
        ({"texts": ["ok"], "beam_size": -1}, "beam_size"),
        ({"texts": ["ok"], "glossary": [mt_pb2.GlossaryEntry(source=" ")]}, "glossary[0].source"),
        ({"texts": ["ok"], "do_not_translate": ["y" * 201]}, "do_not_translate[0]"),
    ],
)
async def test_bad_requests_are_invalid_argument_with_the_field(
    mt: MtHarness, fields: dict[str, object], field: str
) -> None:
    request = mt_pb2.TranslateRequest(
        **{"source_language": "en", "target_language": "pt", **fields}  # type: ignore[arg-type]
    )
    error = await expect_error(mt.stub.Translate(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in violations(error)


@pytest.mark.models
async def test_invalid_utf8_is_invalid_argument_naming_the_text(mt: MtHarness) -> None:
    good = mt_pb2.TranslateRequest(texts=["fine"], target_language="pt").SerializeToString()
    raw = good + b"\x0a\x04ab\xffc"  # a second text, not UTF-8
    call = mt.channel.unary_unary(
        f"/{MT_SERVICE}/Translate", request_serializer=None, response_deserializer=None
    )
    error = await expect_error(call(raw), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == ["texts[1]"]
    # The service is fine afterwards.
    assert (await mt.translate("Good morning.", source_language="en"))[0].text == "Bom dia."


def test_invalid_utf8_fields_walks_nested_messages() -> None:
    request = mt_pb2.TranslateRequest(
        texts=["a", "b"],
        target_language="pt",
        beam_size=2,
        glossary=[mt_pb2.GlossaryEntry(source="x", target="y")] * 2,
    )
    descriptor = cast(Descriptor, request.DESCRIPTOR)
    data = request.SerializeToString().replace(b"y", b"\xfe").replace(b"b", b"\xff")
    assert invalid_utf8_fields(descriptor, data) == [
        "texts[1]",
        "glossary[0].target",
        "glossary[1].target",
    ]
    assert invalid_utf8_fields(descriptor, data[:-3]) == ["texts[1]", "glossary[0].target"]


@pytest.mark.models
async def test_unsupported_pair_is_not_found(mt: MtHarness) -> None:
    error = await expect_error(
        mt.translate("Hello.", source_language="en", target_language="de"),
        grpc.StatusCode.NOT_FOUND,
    )
    info = error_details(error)["ErrorInfo"]
    assert info.reason == "LANGUAGE_PAIR_NOT_SUPPORTED"
    assert dict(info.metadata) == {"source_language": "en", "target_language": "de"}


@pytest.mark.models
async def test_full_queue_is_resource_exhausted_with_retry_info(
    redis_url: str, redis_prefix: str, bergamot_models: dict[str, Path]
) -> None:
    settings = mt_settings(
        redis_url, redis_prefix, bergamot_models, max_queue=4, max_batch_size=2, cache_ttl_s=0
    )
    async with serve(settings) as mt:
        calls = [mt.translate(*ENGLISH[i : i + 2], source_language="en") for i in range(0, 20, 2)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        # One call with more sentences than the queue holds could never succeed.
        error = await expect_error(
            mt.translate(" ".join(ENGLISH[:5]), source_language="en"),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["texts"]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if isinstance(r, list)]
    assert refused and served and len(refused) + len(served) == len(results)
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(error)
        assert details["ErrorInfo"].reason == "QUEUE_FULL"
        assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0


@pytest.mark.models
async def test_deadlines(mt: MtHarness) -> None:
    # Server side: an item that cannot start before the caller's deadline is dropped.
    job = TranslateJob([ENGLISH[11]], "pt", "en")
    with pytest.raises(DeadlineExceeded):
        await mt.service.translator.translate(job, timeout_s=0.0)
    # Over gRPC, a deadline too short for the model fails as DEADLINE_EXCEEDED, and the
    # service still answers afterwards.
    request = mt_pb2.TranslateRequest(
        texts=[" ".join(ENGLISH)] * 8, source_language="en", target_language="pt", beam_size=8
    )
    await expect_error(mt.stub.Translate(request, timeout=0.05), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert (await mt.translate("Good morning.", source_language="en"))[0].text == "Bom dia."


# --- lifecycle ------------------------------------------------------------------------------


@pytest.mark.models
async def test_not_serving_until_models_are_loaded(
    redis_url: str,
    redis_prefix: str,
    bergamot_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = mt_settings(redis_url, redis_prefix, bergamot_models)
    service = MtService(settings)
    loading, release = threading.Event(), threading.Event()
    load = service.translator.load

    def gated_load() -> None:
        loading.set()
        release.wait(10)
        load()

    monkeypatch.setattr(service.translator, "load", gated_load)
    runtime = Runtime(service, settings)
    starting = asyncio.create_task(runtime.start())
    try:
        # The port is bound before models load, so health can say NOT_SERVING meanwhile.
        assert await asyncio.to_thread(loading.wait, 10)
        async with insecure_channel(runtime.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", MT_SERVICE):
                check = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            release.set()
            await starting
            check = await health.Check(health_pb2.HealthCheckRequest(service=MT_SERVICE))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        await starting
        await runtime.stop(grace_s=0)


@pytest.mark.models
def test_bergamot_service_runs_without_torch(bergamot_models: dict[str, Path]) -> None:
    script = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'optimum'): sys.modules[name] = None\n"
        "from services.mt.service import MtService\n"
        "from services.mt.settings import MtSettings\n"
        f"models = { ({k: str(v) for k, v in bergamot_models.items()})!r}\n"
        "translator = MtService(MtSettings(cache_ttl_s=0, bergamot_models=models)).translator\n"
        "translator.load()\n"
        "print(translator.models['bergamot-en-pt'].translate(['Good morning.'], 1, 'en', 'pt'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['Bom dia.']"


def test_settings_refuse_bad_pairs_and_empty_registries() -> None:
    with pytest.raises(ValueError, match="language pair"):
        MtSettings(hf_models={"spanish": Path("/x")})
    with pytest.raises(ValueError, match="no models"):
        MtSettings(bergamot_models={})


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Each service stops its batcher threads; a leak would slow every later test."""
    before = {t.name for t in threading.enumerate()}
    yield
    for _ in range(100):  # a stopped executor's thread exits soon, not at once
        leaked = {
            t.name
            for t in threading.enumerate()
            if t.name not in before and t.name.startswith("mt-") and t.is_alive()
        }
        if not leaked:
            return
        time.sleep(0.02)
    raise AssertionError(f"threads left running: {sorted(leaked)}")
