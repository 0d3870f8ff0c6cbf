"""The whole mesh, five real processes (redis, auth, asr, mt, gateway) and real models:
speech in, transcript and Portuguese out, unary and streaming; the mesh degrading and
recovering when mt dies; failing fast when asr dies; cancellation reaching asr."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from services.common.testing import error_details
from speechmesh.asr.v1 import asr_pb2
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.asr.wer import word_error_rate
from tests.speech import ENGLISH, RATE, wav_bytes
from tools.mesh import Mesh

pytestmark = pytest.mark.models

ADMIN = (("x-api-key", "dev-admin-key"),)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    env = {
        "SPEECHMESH_GATEWAY_BREAKER_FAIL_MAX": "2",
        "SPEECHMESH_GATEWAY_BREAKER_RESET_S": "1",
        "SPEECHMESH_GATEWAY_RETRY_MAX_ATTEMPTS": "2",
        "SPEECHMESH_ASR_MODELS": '["whisper-base-int8"]',
        **{f"SPEECHMESH_{s}_ACCESS_LOG": "false" for s in ("AUTH", "ASR", "MT", "GATEWAY")},
    }
    with Mesh(env=env) as running:
        yield running


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh["gateway"].target) as opened:
        yield opened


@pytest.fixture
async def user(channel: grpc.aio.Channel) -> tuple[tuple[str, str], ...]:
    created = await gateway_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
        gateway_pb2.CreateApiKeyRequest(owner="e2e", tier=auth_pb2.TIER_ENTERPRISE), metadata=ADMIN
    )
    return (("x-api-key", created.api_key),)


def speech_request(
    samples: np.ndarray, target: str = "pt", source: str = ""
) -> gateway_pb2.TranslateSpeechRequest:
    return gateway_pb2.TranslateSpeechRequest(
        audio=asr_pb2.Audio(content=wav_bytes(samples)),
        source_language=source,
        target_language=target,
    )


def stages(response: object) -> dict[str, int]:
    return {s.stage: s.state for s in response.stages}  # type: ignore[attr-defined]


async def test_speech_in_transcript_and_portuguese_out(
    channel: grpc.aio.Channel, user: tuple[tuple[str, str], ...], clips: dict[str, np.ndarray]
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    response = await public.TranslateSpeech(speech_request(clips["en0"]), metadata=user)
    # The asr tests hold the word error rate goal over many sentences; one sentence of nine
    # words can miss two ("Can you please end me ..." failed CI at < 0.15 once).
    assert word_error_rate([ENGLISH[0]], [response.transcript]) < 0.25, response.transcript
    assert response.detected_language == "en" and response.target_language == "pt"
    assert "relatório" in response.translation.lower(), response.translation
    assert stages(response) == {"asr": gateway_pb2.STAGE_STATE_OK, "mt": gateway_pb2.STAGE_STATE_OK}


async def test_speech_to_english_uses_whisper_translation(
    channel: grpc.aio.Channel, user: tuple[tuple[str, str], ...], clips: dict[str, np.ndarray]
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    response = await public.TranslateSpeech(speech_request(clips["pt"], target="en"), metadata=user)
    assert response.detected_language == "pt"
    mt_stage = next(s for s in response.stages if s.stage == "mt")
    assert mt_stage.models == ["asr:whisper-base-int8"]
    assert response.translation and response.translation != response.transcript


async def test_text_translation_and_languages(
    channel: grpc.aio.Channel, user: tuple[tuple[str, str], ...]
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    translated = await public.TranslateText(
        gateway_pb2.TranslateTextRequest(
            texts=["Good morning, my friend.", "Thank you."],
            source_language="en",
            target_language="pt",
        ),
        metadata=user,
    )
    assert [t.text for t in translated.translations][1].lower().startswith("obrigad")
    languages = await public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=user)
    routes = {(r.source_language, r.target_language, r.speech) for r in languages.routes}
    assert {("en", "pt", True), ("pt", "en", False), ("pt", "en", True)} <= routes
    assert "pt" in languages.transcription_languages


async def test_results_come_from_the_cache_the_second_time(
    mesh: Mesh, channel: grpc.aio.Channel, user: tuple[tuple[str, str], ...]
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    hits = 'speechmesh_cache_lookups_total{cache="gateway_text",result="hit"}'
    request = gateway_pb2.TranslateTextRequest(
        texts=["The museum is closed on Mondays."], source_language="en", target_language="pt"
    )
    first = await public.TranslateText(request, metadata=user)
    before = mesh["gateway"].metric(hits)
    assert await public.TranslateText(request, metadata=user) == first
    assert mesh["gateway"].metric(hits) == before + 1
    cleared = await gateway_pb2_grpc.AdminServiceStub(channel).ClearCache(
        gateway_pb2.ClearCacheRequest(translations=True), metadata=ADMIN
    )
    assert cleared.deleted_entries >= 1


async def _stream_translation(
    public: gateway_pb2_grpc.SpeechTranslationServiceStub,
    samples: np.ndarray,
    metadata: tuple[tuple[str, str], ...],
) -> list[gateway_pb2.StreamingTranslateSpeechResponse]:
    async def requests() -> AsyncIterator[gateway_pb2.StreamingTranslateSpeechRequest]:
        yield gateway_pb2.StreamingTranslateSpeechRequest(
            config=gateway_pb2.StreamingTranslateSpeechConfig(
                recognition=asr_pb2.StreamingRecognitionConfig(
                    encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                    sample_rate_hertz=RATE,
                    language="en",
                    interim_results=True,
                ),
                target_language="pt",
            )
        )
        pcm = (samples * 32767).astype("<i2").tobytes()
        for start in range(0, len(pcm), 3_200):
            await asyncio.sleep(0.1)  # live audio, as interims are for
            yield gateway_pb2.StreamingTranslateSpeechRequest(
                audio_content=pcm[start : start + 3_200]
            )

    return [r async for r in public.StreamingTranslateSpeech(requests(), metadata=metadata)]


async def test_streaming_speech_translation(
    channel: grpc.aio.Channel, user: tuple[tuple[str, str], ...], clips: dict[str, np.ndarray]
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    silence = np.zeros(RATE, np.float32)
    responses = await _stream_translation(
        public, np.concatenate([silence, clips["en0"], silence, clips["en1"], silence]), user
    )
    finals = [r for r in responses if r.result.is_final]
    assert len(finals) == 2
    assert all(r.translation and stages(r)["mt"] == gateway_pb2.STAGE_STATE_OK for r in finals)
    assert "relatório" in finals[0].translation.lower()
    assert any(not r.result.is_final for r in responses)


async def test_cancelling_a_stream_cancels_it_downstream(
    mesh: Mesh,
    channel: grpc.aio.Channel,
    user: tuple[tuple[str, str], ...],
    clips: dict[str, np.ndarray],
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    cancelled = 'grpc_server_handled_total{grpc_code="CANCELLED",grpc_method="StreamingRecognize"'
    before = mesh["asr"].metric(cancelled)
    pcm = (clips["two_cities"] * 32767).astype("<i2").tobytes()

    async def talking() -> AsyncIterator[gateway_pb2.StreamingTranscribeRequest]:
        yield gateway_pb2.StreamingTranscribeRequest(
            config=asr_pb2.StreamingRecognitionConfig(
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=RATE, language="en"
            )
        )
        for start in range(0, len(pcm), 3_200):  # real time: 100 ms of speech per 100 ms
            yield gateway_pb2.StreamingTranscribeRequest(audio_content=pcm[start : start + 3_200])
            await asyncio.sleep(0.1)

    call = public.StreamingTranscribe(talking(), metadata=user)
    await asyncio.sleep(2.5)  # mid-sentence: asr holds an utterance in progress
    call.cancel()
    for _ in range(50):
        if mesh["asr"].metric(cancelled) > before:
            break
        await asyncio.sleep(0.1)
    assert mesh["asr"].metric(cancelled) == before + 1


async def test_a_caller_deadline_reaches_asr(
    channel: grpc.aio.Channel, user: tuple[tuple[str, str], ...], clips: dict[str, np.ndarray]
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await public.TranslateSpeech(
            speech_request(clips["two_cities"]), metadata=user, timeout=0.3
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0


async def test_mt_down_degrades_then_recovers(
    mesh: Mesh,
    channel: grpc.aio.Channel,
    user: tuple[tuple[str, str], ...],
    clips: dict[str, np.ndarray],
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    admin = gateway_pb2_grpc.AdminServiceStub(channel)
    mesh["mt"].kill()
    try:
        for _ in range(3):
            response = await public.TranslateSpeech(speech_request(clips["en2"]), metadata=user)
            assert response.transcript and not response.translation
            assert stages(response)["mt"] == gateway_pb2.STAGE_STATE_UNAVAILABLE
        status = await admin.GetMeshStatus(gateway_pb2.GetMeshStatusRequest(), metadata=ADMIN)
        mt = next(d for d in status.downstreams if d.name == "mt")
        assert mt.breaker == gateway_pb2.BREAKER_STATE_OPEN
        # An open breaker answers at once, without waiting on the dead service.
        started = time.monotonic()
        response = await public.TranslateSpeech(speech_request(clips["en3"]), metadata=user)
        assert "circuit open" in next(s.message for s in response.stages if s.stage == "mt")
        assert time.monotonic() - started < 5
    finally:
        mesh["mt"].start()
        mesh["mt"].wait_started(120)
    await asyncio.sleep(1.2)  # the breaker's reset timeout: the next call is the trial
    response = await public.TranslateSpeech(speech_request(clips["en2"]), metadata=user)
    assert response.translation and stages(response)["mt"] == gateway_pb2.STAGE_STATE_OK
    status = await admin.GetMeshStatus(gateway_pb2.GetMeshStatusRequest(), metadata=ADMIN)
    assert (
        next(d for d in status.downstreams if d.name == "mt").breaker
        == gateway_pb2.BREAKER_STATE_CLOSED
    )


async def test_asr_down_fails_fast(
    mesh: Mesh,
    channel: grpc.aio.Channel,
    user: tuple[tuple[str, str], ...],
    clips: dict[str, np.ndarray],
) -> None:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    mesh["asr"].kill()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await public.TranslateSpeech(speech_request(clips["en1"]), metadata=user, timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3
        assert error_details(caught.value)["ErrorInfo"].reason in {"ASR_ERROR", "CIRCUIT_OPEN"}
    finally:
        mesh["asr"].start()
        mesh["asr"].wait_started(180)
