"""The asr service as deployed: its own process, real models, real Redis, over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.proto_time import duration
from services.common.testing import error_details
from speechmesh.asr.v1 import asr_pb2, asr_pb2_grpc
from tests.asr.wer import word_error_rate
from tests.speech import BECKETT, ENGLISH, RATE, TWO_CITIES, wav_bytes
from tools.mesh import Mesh

pytestmark = pytest.mark.models

ASR = "speechmesh.asr.v1.AsrService"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Mesh(
        services=("asr",),
        log_dir=None,
        env={"SPEECHMESH_ASR_ACCESS_LOG": "false", "SPEECHMESH_ASR_MAX_AUDIO_DURATION_S": "120"},
    ) as m:
        yield m


@pytest.fixture
async def asr(mesh: Mesh) -> AsyncIterator[asr_pb2_grpc.AsrServiceStub]:
    async with grpc.aio.insecure_channel(mesh["asr"].target) as channel:
        yield asr_pb2_grpc.AsrServiceStub(channel)


def audio(samples: np.ndarray) -> asr_pb2.Audio:
    return asr_pb2.Audio(content=wav_bytes(samples))


@pytest.mark.parametrize("model", ["whisper-tiny.en-int8", "whisper-base-int8"])
async def test_english_word_error_rate(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray], model: str
) -> None:
    names = [f"en{i}" for i in range(len(ENGLISH))] + ["beckett"]
    results = await asyncio.gather(
        *(
            asr.Recognize(
                asr_pb2.RecognizeRequest(audio=audio(clips[n]), language="en", model=model)
            )
            for n in names
        )
    )
    texts = [r.transcript for r in results]
    assert word_error_rate([*ENGLISH, BECKETT], texts) < 0.15, texts
    assert word_error_rate([BECKETT], texts[-1:]) < 0.15, texts[-1]
    assert all(r.model == model and r.language == "en" for r in results)


async def test_portuguese_is_detected_and_translated(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    heard = await asr.Recognize(asr_pb2.RecognizeRequest(audio=audio(clips["pt"])))
    assert heard.language == "pt" and heard.language_probability > 0.5
    english = await asr.Recognize(
        asr_pb2.RecognizeRequest(audio=audio(clips["pt"]), task=asr_pb2.TASK_TRANSLATE)
    )
    assert english.language == "pt"
    assert {"know", "right"} & set(english.transcript.lower().replace(",", " ").split()), english


async def test_long_audio_is_windowed_not_truncated(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    result = await asr.Recognize(
        asr_pb2.RecognizeRequest(
            audio=audio(clips["two_cities"]), language="en", word_timestamps=True
        )
    )
    assert result.audio_duration.ToTimedelta().total_seconds() > 40
    assert result.segments[-1].end_offset.ToTimedelta().total_seconds() > 35
    assert word_error_rate([TWO_CITIES], [result.transcript]) < 0.15, result.transcript
    words = [w for s in result.segments for w in s.words]
    assert len(words) > 80
    starts = [w.start_offset.ToTimedelta().total_seconds() for w in words]
    assert starts == sorted(starts)


async def test_long_audio_in_a_given_language_is_decoded_in_one_batch(
    mesh: Mesh, asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    def batches() -> tuple[float, float]:
        return tuple(  # type: ignore[return-value]
            mesh["asr"].metric(f'speechmesh_batch_size_{part}{{batcher="asr"}}')
            for part in ("count", "sum")
        )

    before = batches()
    request = asr_pb2.RecognizeRequest(audio=audio(clips["two_cities"][: 40 * RATE]), language="en")
    result = await asr.Recognize(request)
    assert result.segments[-1].end_offset.ToTimedelta().total_seconds() > 30
    after = batches()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)  # its two pieces, together


async def test_concurrent_callers_get_their_own_results(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    names = ["en0", "en1", "en2", "en3", "beckett"]
    alone = [
        (
            await asr.Recognize(
                asr_pb2.RecognizeRequest(audio=audio(clips[n]), language="en", word_timestamps=True)
            )
        ).transcript
        for n in names
    ]
    together = await asyncio.gather(
        *(
            asr.Recognize(asr_pb2.RecognizeRequest(audio=audio(clips[n]), language="en"))
            for n in names
        )
    )
    assert [r.transcript for r in together] == alone


async def test_a_caller_gone_mid_batch_stops_its_decoding(
    mesh: Mesh, asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    def abandoned() -> float:
        return mesh["asr"].metric("speechmesh_asr_abandoned_in_batch_total")

    before = abandoned()
    # 29 s of speech (one window: no pass of the voice detector first) decode for over a
    # second; the deadline passes while their batch runs.
    request = asr_pb2.RecognizeRequest(
        audio=audio(clips["two_cities"][RATE : 30 * RATE]), language="en"
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asr.Recognize(request, timeout=0.5)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if abandoned() > before:
            break
        await asyncio.sleep(0.05)
    assert abandoned() == before + 1


async def test_repeated_audio_comes_from_the_cache(
    mesh: Mesh, asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    def hits() -> float:
        return mesh["asr"].metric(
            'speechmesh_cache_lookups_total{cache="asr_transcripts",result="hit"}'
        )

    request = asr_pb2.RecognizeRequest(audio=audio(clips["en3"][: RATE * 2]), language="en")
    first = await asr.Recognize(request)
    before = hits()
    again = await asr.Recognize(request)
    assert again == first and hits() == before + 1


def _pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def _stream(
    asr: asr_pb2_grpc.AsrServiceStub,
    samples: np.ndarray,
    real_time: bool = False,
    **config: object,
) -> list[asr_pb2.StreamingRecognizeResponse]:
    async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
        yield asr_pb2.StreamingRecognizeRequest(
            config=asr_pb2.StreamingRecognitionConfig(
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=RATE, **config
            )
        )
        pcm = _pcm(samples)
        for start in range(0, len(pcm), 3_200):  # 100 ms chunks
            if real_time:
                await asyncio.sleep(0.1)
            yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[start : start + 3_200])

    return [r async for r in asr.StreamingRecognize(requests())]


async def test_streaming_gives_interim_then_final_matching_unary(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    """Live audio: an interim still computing at a pause gives way to the final's
    speculation, so a caller streaming much faster than real time may see none."""
    silence = np.zeros(RATE, np.float32)
    speech = clips["en1"]
    responses = await _stream(
        asr,
        np.concatenate([silence, speech, silence, clips["en2"], silence]),
        real_time=True,
        language="en",
        interim_results=True,
    )
    results = [r.result for r in responses]
    finals = [r for r in results if r.is_final]
    assert len(finals) == 2 and [f.utterance_index for f in finals] == [0, 1]
    interims = [r for r in results if not r.is_final]
    assert interims and results.index(interims[0]) < results.index(finals[0])
    # The speculation a final came from was not sent as an interim just before it.
    assert not {i.end_offset.ToNanoseconds() for i in interims} & {
        f.end_offset.ToNanoseconds() for f in finals
    }
    unary = await asr.Recognize(asr_pb2.RecognizeRequest(audio=audio(speech), language="en"))
    assert word_error_rate([unary.transcript], [finals[0].transcript]) < 0.1, (unary, finals[0])
    start = finals[0].start_offset.ToTimedelta().total_seconds()
    assert 0.6 < start < 1.1


@pytest.mark.parametrize("interim", [False, True])
async def test_single_utterance_ends_the_stream(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray], interim: bool
) -> None:
    """The end comes after the utterance's final, not after an interim sent before it."""
    silence = np.zeros(RATE, np.float32)
    responses = await _stream(
        asr,
        np.concatenate([silence, clips["en0"], silence, clips["en1"], silence]),
        real_time=interim,  # live audio gets its interims (see the test above)
        language="en",
        single_utterance=True,
        interim_results=interim,
    )
    assert [r.result.is_final for r in responses if r.result.is_final] == [True]
    assert any(r.HasField("result") and not r.result.is_final for r in responses) == interim
    assert responses[-2].result.is_final
    assert responses[-1].speech_event == asr_pb2.SPEECH_EVENT_END_OF_SINGLE_UTTERANCE


def _trimmed(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[loud[0] : loud[-1] + 1]


async def test_a_finished_sentence_ends_its_utterance_after_a_shorter_silence(
    mesh: Mesh, asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    """0.4 s between two sentences: more than the sentence-end silence (0.3 s by default),
    less than the full one (0.5 s). By default that ends the first; turned off, the two are
    one utterance."""
    gap = np.zeros(int(0.4 * RATE), np.float32)
    audio = np.concatenate(
        [gap, _trimmed(clips["en0"]), gap, _trimmed(clips["en3"]), np.zeros(RATE, np.float32)]
    )
    by_sentence = 'speechmesh_asr_utterance_ends_total{by="sentence_end"}'
    before = mesh["asr"].metric(by_sentence)
    finals = [r.result for r in await _stream(asr, audio, language="en") if r.result.is_final]
    assert len(finals) == 2, finals
    assert mesh["asr"].metric(by_sentence) == before + 2
    assert word_error_rate([ENGLISH[0]], [finals[0].transcript]) < 0.3, finals
    assert word_error_rate([ENGLISH[3]], [finals[1].transcript]) < 0.3, finals
    first_end = finals[0].end_offset.ToTimedelta().total_seconds()
    assert abs(first_end - (len(gap) + len(_trimmed(clips["en0"]))) / RATE) < 0.15

    off = duration(0.5)  # = silence_duration
    results = await _stream(asr, audio, language="en", sentence_end_silence_duration=off)
    finals = [r.result for r in results if r.result.is_final]
    assert len(finals) == 1, finals
    assert word_error_rate([f"{ENGLISH[0]} {ENGLISH[3]}"], [finals[0].transcript]) < 0.3


async def test_half_close_flushes_the_last_utterance(
    asr: asr_pb2_grpc.AsrServiceStub, clips: dict[str, np.ndarray]
) -> None:
    # espeak-ng ends the clip with ~0.35 s of silence: enough to end a finished sentence, so
    # only the full silence (never heard here) may end the utterance.
    responses = await _stream(
        asr,
        np.concatenate([np.zeros(RATE // 2, np.float32), clips["en0"]]),
        language="en",
        sentence_end_silence_duration=duration(0.5),
    )
    assert len(responses) == 1 and responses[0].result.is_final
    # The flush is under test here; accuracy is measured over many clips elsewhere, and one
    # 9-word espeak sentence has come back with 1 or 3 words wrong.
    transcript = responses[0].result.transcript
    assert word_error_rate([ENGLISH[0]], [transcript]) < 0.5, transcript
    speech_end = (RATE // 2 + len(clips["en0"])) / RATE
    assert abs(responses[0].result.end_offset.ToTimedelta().total_seconds() - speech_end) < 0.1


BAD_REQUESTS = {
    "empty": (asr_pb2.RecognizeRequest(), "audio.content"),
    "not audio": (
        asr_pb2.RecognizeRequest(audio=asr_pb2.Audio(content=b"hello" * 100)),
        "audio.content",
    ),
    "truncated flac": (
        asr_pb2.RecognizeRequest(audio=asr_pb2.Audio(content=b"fLaC\x00\x00\x00")),
        "audio.content",
    ),
    "absurd rate": (
        asr_pb2.RecognizeRequest(
            audio=asr_pb2.Audio(
                content=b"\x00\x00" * 100,
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hertz=3,
            )
        ),
        "audio.sample_rate_hertz",
    ),
    "too long": (
        asr_pb2.RecognizeRequest(
            audio=asr_pb2.Audio(
                content=b"\x00\x00" * 8_000 * 121,
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hertz=8_000,
            )
        ),
        "audio.content",
    ),
    "unknown language": (
        asr_pb2.RecognizeRequest(
            audio=asr_pb2.Audio(content=wav_bytes(np.zeros(RATE, np.float32))), language="xx"
        ),
        "language",
    ),
    "not a language": (
        asr_pb2.RecognizeRequest(
            audio=asr_pb2.Audio(content=wav_bytes(np.zeros(RATE, np.float32))), language="!!"
        ),
        "language",
    ),
    "english-only translate": (
        asr_pb2.RecognizeRequest(
            audio=asr_pb2.Audio(content=wav_bytes(np.zeros(RATE, np.float32))),
            task=asr_pb2.TASK_TRANSLATE,
            model="whisper-tiny.en-int8",
        ),
        "task",
    ),
}


async def test_bad_input_is_refused_and_the_service_stays_up(
    mesh: Mesh, asr: asr_pb2_grpc.AsrServiceStub
) -> None:
    nan = np.zeros(RATE, np.float32)
    nan[10] = np.nan
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, nan, RATE, format="WAV", subtype="FLOAT")
    cases = {
        **BAD_REQUESTS,
        "nan samples": (
            asr_pb2.RecognizeRequest(audio=asr_pb2.Audio(content=buffer.getvalue())),
            "audio.content",
        ),
    }
    for name, (request, field) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asr.Recognize(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        violations = error_details(caught.value)["BadRequest"].field_violations
        assert violations[0].field == field, (name, violations)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asr.Recognize(
            asr_pb2.RecognizeRequest(
                audio=asr_pb2.Audio(content=wav_bytes(np.zeros(RATE, np.float32))), model="nope"
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(mesh["asr"].target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=ASR)
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_streams_are_refused(asr: asr_pb2_grpc.AsrServiceStub) -> None:
    async def audio_first() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
        yield asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x00")

    async def container() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
        yield asr_pb2.StreamingRecognizeRequest(
            config=asr_pb2.StreamingRecognitionConfig(
                encoding=asr_pb2.AUDIO_ENCODING_FLAC, sample_rate_hertz=RATE
            )
        )

    for requests, field in ((audio_first, "config"), (container, "config.encoding")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in asr.StreamingRecognize(requests())]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value)["BadRequest"].field_violations[0].field == field


async def test_models_and_config_are_listed(asr: asr_pb2_grpc.AsrServiceStub) -> None:
    models = {m.name: m for m in (await asr.ListModels(asr_pb2.ListModelsRequest())).models}
    assert models["whisper-base-int8"].is_default and models["whisper-base-int8"].can_translate
    assert models["whisper-tiny.en-int8"].languages == ["en"]
    config = await asr.GetConfig(asr_pb2.GetConfigRequest())
    assert config.sample_rate_hertz == RATE and config.default_model == "whisper-base-int8"
