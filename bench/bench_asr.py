"""`make bench-asr`: the asr service beside CTranslate2 (faster-whisper's engine) and plain
transformers PyTorch, on the same weights, the same clips and the same thread count.

Clips: espeak-ng sentences (~3 s each), moonshine-voice's beckett.wav (10 s, human voice)
and two_cities.wav (44 s, human voice), all 16 kHz mono.

1. Real-time factor, one caller (RTF = processing seconds / audio seconds; lower is faster)
   - the asr service over gRPC (Recognize, WAV in, language `en`), its own process, with
     whisper-{tiny.en,base}-{fp32,int8} all loaded, transcript cache off;
   - `ctranslate2.models.Whisper` on `<cache>/asr/whisper-*/ct2` (compute_type float32 or
     int8, greedy beam_size=1, timestamps on as the service decodes them, intra_threads =
     the service's threads), fed the project's own log-mel features
     (`services.asr.whisper_onnx.log_mel_spectrogram`, a vectorised numpy STFT like
     faster-whisper's) — their time is included;
   - transformers `WhisperForConditionalGeneration` on `<cache>/asr/whisper-*/hf` (fp32
     only: PyTorch has no int8 of these weights), `WhisperFeatureExtractor` features
     (included), greedy, timestamps on, torch threads = the service's threads.
   Audio over 30 s is cut where the service cuts it (its VAD split points) and the pieces go
   to the peers as one batch, as the service decodes them; finding the cuts is not charged
   to the peers. The median of the rounds is taken per clip (transformers, not part of the
   goal and slow, times the 44 s clip in the first round only: one timing of it moved the
   service's speed ratio between 0.76 and 1.06 from run to run).
2. Streaming throughput, base int8 alone loaded: 8 concurrent StreamingRecognize streams,
   each sending one clip in 100 ms LINEAR16 chunks as fast as flow control lets it (no
   interim results), as audio seconds per wall second — beside the same 8 streams one
   after another, and beside CTranslate2 transcribing the same 8 clips one after another,
   from 8 caller threads (inter_threads=2 x intra_threads=1: one worker per core), and as
   one batch.
   A stream decodes one Whisper window per utterance, and by default encodes it in its own
   length plus a margin (the setting `stream_window_margin_s`): a window of 30 s for a 2 s
   utterance would be mostly padding. The 8 streams run once more on a service with 30 s
   windows (margin 0), and so does part 3, to show what that saves.
3. Final-result latency: single streams sending espeak sentences in real time (each 100 ms
   chunk is sent once its 100 ms have "been spoken"), then silence in real time until the
   final result of the sentence arrives. Latency = final received - last speech chunk sent;
   also shown minus the silence the detector must hear (what is left: VAD frame lag,
   chunking, queueing and inference). Without and with interim results. By default a
   finished sentence ends its utterance after the shorter sentence-end silence; one row
   turns that off (sentence_end_silence_duration = silence_duration), so only the full
   silence ends an utterance.
4. Peak RSS of the asr service process (psutil, sampled every 20 ms) with base int8 alone
   loaded, during parts 2 and 3 — beside a bare Python process running CTranslate2 base int8
   over the same 8 clips.

Goals (from the asr issue): at least as fast as CTranslate2 single-stream; well ahead of it
under concurrency; final result ≤ 500 ms after speech ends (judged with the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench.stats import LoadResult
from services.asr.recognizer import split_points
from services.asr.settings import AsrSettings
from services.asr.vad import SileroVad
from services.asr.whisper_onnx import FrontEnd, log_mel_spectrogram, mel_filter_bank
from services.common.proto_time import duration
from services.common.settings import model_cache_dir
from speechmesh.asr.v1 import asr_pb2, asr_pb2_grpc
from tests.asr.wer import word_error_rate
from tests.speech import ASSETS, BECKETT, RATE, TWO_CITIES, resampled, spoken, wav_bytes
from tools.mesh import Mesh

CHUNK = RATE // 10  # 100 ms
THREADS = 2  # the asr service's default SPEECHMESH_ASR_THREADS, given to every system
MODELS = ("whisper-tiny.en", "whisper-base")
PRECISIONS = {"fp32": "float32", "int8": "int8"}  # service precision -> ct2 compute_type
STREAM_MODEL = "whisper-base-int8"
STREAMS = 8
LONG_S = 30.0  # transformers times clips longer than this once in part 1
SILENCE_S = 0.5  # silence that ends an utterance: the service's default, set explicitly
# ... or ends it after a finished sentence (the service's default, set explicitly)
SENTENCE_END_SILENCE_S = AsrSettings.model_fields["sentence_end_silence_s"].default
# The service encodes a streamed utterance in its length plus this margin (its default);
# parts 2 and 3 also run with Whisper's 30 s window (margin 0) to show what that saves.
WINDOW_MARGIN_S = AsrSettings.model_fields["stream_window_margin_s"].default
WINDOW = f"+{WINDOW_MARGIN_S:g} s"
LEAD_IN_S = 0.3  # silence before each real-time utterance
# (interim results, sentence end on) per latency run of part 3
LATENCY_RUNS = ((False, True), (True, True), (False, False))
MAX_TRAILING_S = 6.0

# Twelve sentences without commas (so the voice detector hears one utterance each); the
# first four are the asr tests' ENGLISH sentences.
SENTENCES = (
    "Could you please send me the report before noon?",
    "We are going for a walk in the park this afternoon.",
    "I would like a cup of coffee with milk and two slices of toast.",
    "Please turn off the lights when you leave the room.",
    "The train to Lisbon leaves at seven o'clock tomorrow morning.",
    "My sister works as a nurse in a small hospital near the river.",
    "The meeting has been moved to Thursday afternoon.",
    "He forgot his umbrella at the restaurant last night.",
    "The children are playing football in the park.",
    "This book was written more than two hundred years ago.",
    "Our flight was delayed by almost three hours.",
    "The doctor said I should drink more water.",
)


# --------------------------------------------------------------------------- clips


@dataclass
class Clip:
    name: str
    samples: np.ndarray  # 16 kHz mono float32
    text: str
    bounds: list[tuple[int, int]] = field(default_factory=list)  # the service's ≤30 s pieces
    wav: bytes = b""

    @property
    def seconds(self) -> float:
        return len(self.samples) / RATE

    @property
    def pieces(self) -> list[np.ndarray]:
        return [self.samples[a:b] for a, b in self.bounds]

    @property
    def pcm(self) -> bytes:
        return pcm16(self.samples)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _trimmed(samples: np.ndarray, margin_s: float = 0.03) -> np.ndarray:
    """espeak pads its output with silence: cut it, so the clip ends where speech ends."""
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    margin = int(margin_s * RATE)
    return samples[max(0, loud[0] - margin) : loud[-1] + margin]


def make_clips(folder: Path) -> dict[str, Clip]:
    clips = {}
    for index, text in enumerate(SENTENCES):
        samples = _trimmed(spoken(folder, f"s{index}", text))
        clips[f"espeak{index}"] = Clip(f"espeak{index}", samples, text)
    for name, text in (("beckett", BECKETT), ("two_cities", TWO_CITIES)):
        clips[name] = Clip(name, resampled(ASSETS / f"{name}.wav", folder / f"{name}.wav"), text)
    vad = SileroVad(model_cache_dir() / "asr" / "silero_vad.onnx")
    for clip in clips.values():
        cuts = split_points(clip.samples, vad)
        clip.bounds = list(zip([0, *cuts], [*cuts, len(clip.samples)], strict=True))
        clip.wav = wav_bytes(clip.samples)
    return clips


def wer(reference: str, hypothesis: str) -> float:
    return word_error_rate([reference], [hypothesis])


# --------------------------------------------------------------------------- peers


class Ct2Whisper:
    """CTranslate2 Whisper on the original weights, decoding as the service does: greedy,
    timestamps on, language given."""

    def __init__(self, model: str, compute_type: str, intra: int, inter: int = 1) -> None:
        import ctranslate2
        from tokenizers import Tokenizer

        folder = model_cache_dir() / "asr" / model / "ct2"
        self.ctranslate2 = ctranslate2
        self.model = ctranslate2.models.Whisper(
            str(folder),
            device="cpu",
            compute_type=compute_type,
            intra_threads=intra,
            inter_threads=inter,
        )
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.eot = int(self.tokenizer.token_to_id("<|endoftext|>"))
        self.prompt = [int(self.tokenizer.token_to_id("<|startoftranscript|>"))]
        if self.model.is_multilingual:
            self.prompt += [
                int(self.tokenizer.token_to_id("<|en|>")),
                int(self.tokenizer.token_to_id("<|transcribe|>")),
            ]
        self.front = FrontEnd(
            RATE, 400, 160, 30 * RATE, mel_filter_bank(self.model.n_mels, 400, RATE)
        )

    def features(self, pieces: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([log_mel_spectrogram(p, self.front) for p in pieces])

    def transcribe_clip(self, clip: Clip) -> str:
        return " ".join(t for t in self.transcribe_pieces(clip.pieces) if t)

    def transcribe_pieces(self, pieces: Sequence[np.ndarray]) -> list[str]:
        """One batch; the text of each piece."""
        features = self.ctranslate2.StorageView.from_array(self.features(pieces))
        results = self.model.generate(
            features,
            [self.prompt] * len(pieces),
            beam_size=1,
            max_length=448,
            return_no_speech_prob=True,
        )
        texts = []
        for result in results:
            ids = [t for t in result.sequences_ids[0] if t < self.eot]
            texts.append(str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip())
        return texts


class HfWhisper:
    """transformers WhisperForConditionalGeneration, fp32, greedy, timestamps on."""

    def __init__(self, model: str, threads: int) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        folder = model_cache_dir() / "asr" / model / "hf"
        torch.set_num_threads(threads)
        self.torch = torch
        self.processor = WhisperProcessor.from_pretrained(folder)
        self.model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))
        self.options: dict[str, Any] = (
            {"language": "en", "task": "transcribe"} if multilingual else {}
        )

    def transcribe_clip(self, clip: Clip) -> str:
        return self.transcribe(clip.pieces)

    def transcribe(self, pieces: Sequence[np.ndarray]) -> str:
        with self.torch.inference_mode():
            features = self.processor.feature_extractor(  # type: ignore[attr-defined]
                list(pieces), sampling_rate=RATE, return_tensors="pt"
            ).input_features
            ids = self.model.generate(
                features, num_beams=1, do_sample=False, return_timestamps=True, **self.options
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return " ".join(t.strip() for t in texts if t.strip())


# --------------------------------------------------------------------------- mesh helpers


def mesh_env(models: list[str]) -> dict[str, str]:
    return {
        "SPEECHMESH_ASR_MODELS": json.dumps(models),
        "SPEECHMESH_ASR_DEFAULT_MODEL": models[0],
        "SPEECHMESH_ASR_THREADS": str(THREADS),
        "SPEECHMESH_ASR_CACHE_TTL_S": "0",
        "SPEECHMESH_ASR_SILENCE_DURATION_S": str(SILENCE_S),
        "SPEECHMESH_ASR_SENTENCE_END_SILENCE_S": str(SENTENCE_END_SILENCE_S),
        "SPEECHMESH_ASR_ACCESS_LOG": "false",
        "SPEECHMESH_ASR_LOG_LEVEL": "WARNING",
    }


class RssSampler:
    """Samples a process's RSS every `interval_s` on a thread; keeps the peak per phase."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.phase = "idle"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "idle"

    @property
    def peak(self) -> int:
        return max(self.peaks.values())


# --------------------------------------------------------------------------- 1. RTF


@dataclass
class Timed:
    seconds: list[float] = field(default_factory=list)
    text: str = ""


RTF_CLIPS = ("espeak0", "espeak1", "espeak2", "espeak3", "beckett", "two_cities")
GROUPS = {
    "espeak x4": ("espeak0", "espeak1", "espeak2", "espeak3"),
    "beckett": ("beckett",),
    "two_cities": ("two_cities",),
}
SYSTEMS = ("service", "ctranslate2", "transformers")


def measure_rtf(clips: dict[str, Clip], repeats: int) -> dict[tuple[str, str, str, str], Timed]:
    """(model, precision, system, clip) -> times and the last transcript."""
    measured: dict[tuple[str, str, str, str], Timed] = {}
    names = [f"{m}-{p}" for m in MODELS for p in PRECISIONS]
    with (
        tempfile.TemporaryDirectory() as logs,
        Mesh(services=("asr",), env=mesh_env(names), log_dir=Path(logs)) as mesh,
        grpc.insecure_channel(
            mesh["asr"].target,
            options=[("grpc.max_send_message_length", 64 << 20)],
        ) as channel,
    ):
        stub = asr_pb2_grpc.AsrServiceStub(channel)

        def service(name: str) -> Callable[[Clip], str]:
            def run(clip: Clip) -> str:
                response = stub.Recognize(
                    asr_pb2.RecognizeRequest(
                        audio=asr_pb2.Audio(content=clip.wav), language="en", model=name
                    ),
                    timeout=300,
                )
                return str(response.transcript)

            return run

        for model in MODELS:
            hf = HfWhisper(model, THREADS)
            for precision, compute_type in PRECISIONS.items():
                ct2 = Ct2Whisper(model, compute_type, intra=THREADS)
                runners: dict[str, Callable[[Clip], str]] = {
                    "service": service(f"{model}-{precision}"),
                    "ctranslate2": ct2.transcribe_clip,
                }
                if precision == "fp32":
                    runners["transformers"] = hf.transcribe_clip
                for run in runners.values():  # warm-up
                    for name in ("espeak0", "espeak1"):
                        run(clips[name])
                # Interleaved, so a burst of load elsewhere hits every system alike.
                for round_ in range(repeats):
                    for system, run in runners.items():
                        for name in RTF_CLIPS:
                            if round_ and system == "transformers" and clips[name].seconds > LONG_S:
                                continue
                            started = time.perf_counter()
                            text = run(clips[name])
                            elapsed = time.perf_counter() - started
                            timed = measured.setdefault((model, precision, system, name), Timed())
                            timed.seconds.append(elapsed)
                            timed.text = text
                print(f"  measured {model} {precision}  load {_load()}", flush=True)
                del ct2
            del hf
    return measured


def group_rtf(
    measured: dict[tuple[str, str, str, str], Timed],
    clips: dict[str, Clip],
    key: tuple[str, str, str],
    group: Sequence[str],
) -> tuple[float, float] | None:
    """RTF of a group of clips (sum of median times / sum of durations) and its WER."""
    found = [measured.get((*key, name)) for name in group]
    if any(t is None for t in found):
        return None
    timed = [t for t in found if t is not None]
    seconds = sum(statistics.median(t.seconds) for t in timed)
    audio = sum(clips[name].seconds for name in group)
    errors = statistics.mean(wer(clips[n].text, t.text) for n, t in zip(group, timed, strict=True))
    return seconds / audio, errors


# --------------------------------------------------------------------------- 2. throughput


def _request_stream(
    clip: Clip, model: str, *, interim: bool
) -> Iterator[asr_pb2.StreamingRecognizeRequest]:
    yield asr_pb2.StreamingRecognizeRequest(
        config=asr_pb2.StreamingRecognitionConfig(
            encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
            sample_rate_hertz=RATE,
            language="en",
            interim_results=interim,
            model=model,
        )
    )
    pcm = clip.pcm
    for start in range(0, len(pcm), 2 * CHUNK):
        yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[start : start + 2 * CHUNK])


async def stream_fast(stub: asr_pb2_grpc.AsrServiceStub, clip: Clip) -> list[str]:
    """One stream, the clip in 100 ms chunks as fast as the stream takes them; its finals."""

    async def requests() -> Any:
        for request in _request_stream(clip, STREAM_MODEL, interim=False):
            yield request

    finals = []
    async for response in stub.StreamingRecognize(requests(), timeout=600):
        if response.result.is_final:
            finals.append(response.result.transcript)
    return finals


@dataclass
class Throughput:
    system: str
    rates: list[float]  # audio seconds per wall second, one per repeat
    wer: float = 0.0
    windows: int = 0  # Whisper windows decoded (a final result of a stream is one or more)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


Outputs = list[list[str]]  # per clip, the texts of the windows it was decoded in


def measure_throughput(
    target: str, clips: list[Clip], repeats: int, *, peers: bool = True, label: str = ""
) -> list[Throughput]:
    """Every system below; with `peers=False` only the service's concurrent streams (for a
    service started with other settings, named by `label`)."""

    async def streams(todo: list[Clip], concurrent: bool) -> Outputs:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = asr_pb2_grpc.AsrServiceStub(channel)
            if concurrent:
                return list(await asyncio.gather(*(stream_fast(stub, c) for c in todo)))
            return [await stream_fast(stub, c) for c in todo]

    async def recognize_all(todo: list[Clip]) -> Outputs:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = asr_pb2_grpc.AsrServiceStub(channel)
            responses = await asyncio.gather(
                *(
                    stub.Recognize(
                        asr_pb2.RecognizeRequest(
                            audio=asr_pb2.Audio(content=c.wav), language="en", model=STREAM_MODEL
                        ),
                        timeout=600,
                    )
                    for c in todo
                )
            )
            # The service decodes each clip in its pieces; one text per piece is not returned.
            return [
                [r.transcript] + [""] * (len(c.bounds) - 1)
                for c, r in zip(todo, responses, strict=True)
            ]

    systems: dict[str, Callable[[list[Clip]], Outputs]] = {
        f"service, {STREAMS} concurrent streams{label}": lambda t: asyncio.run(streams(t, True)),
    }
    if peers:
        model, precision = STREAM_MODEL.rsplit("-", 1)
        ct2_one = Ct2Whisper(model, PRECISIONS[precision], intra=THREADS)
        ct2_pool = Ct2Whisper(model, PRECISIONS[precision], intra=1, inter=THREADS)

        def ct2_sequential(todo: list[Clip]) -> Outputs:
            return [ct2_one.transcribe_pieces(c.pieces) for c in todo]

        def ct2_threads(todo: list[Clip]) -> Outputs:
            with ThreadPoolExecutor(STREAMS) as pool:
                return list(pool.map(lambda c: ct2_pool.transcribe_pieces(c.pieces), todo))

        def ct2_batch(todo: list[Clip]) -> Outputs:
            texts = ct2_one.transcribe_pieces([p for c in todo for p in c.pieces])
            out, at = [], 0
            for c in todo:
                out.append(texts[at : at + len(c.bounds)])
                at += len(c.bounds)
            return out

        pieces = sum(len(c.bounds) for c in clips)
        systems |= {
            "service, the streams one by one": lambda t: asyncio.run(streams(t, False)),
            f"service, Recognize x{STREAMS} concurrent": lambda t: asyncio.run(recognize_all(t)),
            f"ctranslate2, sequential (intra {THREADS})": ct2_sequential,
            f"ctranslate2, {STREAMS} threads (inter {THREADS} x intra 1)": ct2_threads,
            f"ctranslate2, one batch of {pieces} (intra {THREADS})": ct2_batch,
        }
    short = [c for c in clips if len(c.bounds) == 1 and c.seconds < 5]
    for name, run in systems.items():  # warm-up on the short clips: every path, batches too
        run(short)
        print(f"  warmed up {name}", flush=True)
    audio = sum(c.seconds for c in clips)
    found = {name: Throughput(name, []) for name in systems}
    for _ in range(repeats):
        for name, run in systems.items():
            started = time.perf_counter()
            outputs = run(clips)
            found[name].rates.append(audio / (time.perf_counter() - started))
            found[name].wer = statistics.mean(
                wer(c.text, " ".join(t for t in texts if t))
                for c, texts in zip(clips, outputs, strict=True)
            )
            found[name].windows = sum(len(texts) for texts in outputs)
            print(f"  {name}: {found[name].rates[-1]:.2f} audio s/s  load {_load()}", flush=True)
    return list(found.values())


# --------------------------------------------------------------------------- 3. latency


async def utterance_latency(
    stub: asr_pb2_grpc.AsrServiceStub, clip: Clip, *, interim: bool, sentence_end: bool
) -> tuple[float, str]:
    """Sends the clip in real time, then silence until the clip's final result arrives."""
    lead = np.zeros(int(LEAD_IN_S * RATE), np.float32)
    speech = pcm16(np.concatenate([lead, clip.samples]))
    chunks = [speech[i : i + 2 * CHUNK] for i in range(0, len(speech), 2 * CHUNK)]
    speech_end_s = len(speech) / 2 / RATE
    silence = bytes(2 * CHUNK)
    done = asyncio.Event()
    sent: dict[str, float] = {}

    async def requests() -> Any:
        yield asr_pb2.StreamingRecognizeRequest(
            config=asr_pb2.StreamingRecognitionConfig(
                encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hertz=RATE,
                language="en",
                interim_results=interim,
                model=STREAM_MODEL,
                sentence_end_silence_duration=duration(
                    SENTENCE_END_SILENCE_S if sentence_end else SILENCE_S
                ),
            )
        )
        start = time.perf_counter()
        total = len(chunks) + int(MAX_TRAILING_S / 0.1)
        for index in range(total):
            # A chunk exists once its 100 ms have been spoken.
            chunk_len = len(chunks[index]) if index < len(chunks) else len(silence)
            due = start + (index * 2 * CHUNK + chunk_len) / 2 / RATE
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if done.is_set():
                return
            if index < len(chunks):
                if index == len(chunks) - 1:
                    sent["last_speech"] = time.perf_counter()
                yield asr_pb2.StreamingRecognizeRequest(audio_content=chunks[index])
            else:
                yield asr_pb2.StreamingRecognizeRequest(audio_content=silence)

    latency, finals = float("nan"), []
    async for response in stub.StreamingRecognize(requests(), timeout=120):
        result = response.result
        if not result.is_final:
            continue
        finals.append(result.transcript)
        end = result.end_offset.ToTimedelta().total_seconds()
        if "last_speech" in sent and end >= speech_end_s - 0.3 and not done.is_set():
            latency = time.perf_counter() - sent["last_speech"]
            done.set()
    return latency, " ".join(finals)


async def measure_latency(
    target: str, clips: list[Clip], interim: bool, sentence_end: bool = True
) -> tuple[LoadResult, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = asr_pb2_grpc.AsrServiceStub(channel)
        options = {"interim": interim, "sentence_end": sentence_end}
        await utterance_latency(stub, clips[0], **options)  # warm-up
        latencies, errors = [], []
        for clip in clips:
            latency, text = await utterance_latency(stub, clip, **options)
            latencies.append(latency)
            errors.append(wer(clip.text, text))
    missing = [x for x in latencies if x != x]
    if missing:
        print(f"  {len(missing)} utterances got no final covering their end", flush=True)
    found = [x for x in latencies if x == x]
    return LoadResult(len(found), sum(found), found), statistics.mean(errors)


# --------------------------------------------------------------------------- 4. ct2 RSS

_CT2_RSS_CHILD = r"""
import json, sys, threading
import numpy as np, psutil
import ctranslate2
process = psutil.Process()
peak = [0]
def sample():  # ru_maxrss would count the parent's memory at fork: sample instead
    while True:
        peak[0] = max(peak[0], process.memory_info().rss)
        threading.Event().wait(0.01)
threading.Thread(target=sample, daemon=True).start()
out = {"imports": process.memory_info().rss}
folder, compute_type, threads, features_file, prompt = sys.argv[1:6]
model = ctranslate2.models.Whisper(folder, device="cpu", compute_type=compute_type,
                                   intra_threads=int(threads))
out["loaded"] = process.memory_info().rss
out["peak_loading"], peak[0] = peak[0], 0
data = np.load(features_file)
for key in data.files:
    features = ctranslate2.StorageView.from_array(data[key])
    model.generate(features, [json.loads(prompt)] * len(data[key]),
                   beam_size=1, max_length=448, return_no_speech_prob=True)
threading.Event().wait(0.05)
out["peak"] = peak[0]
print(json.dumps(out))
"""


def ct2_rss(clips: list[Clip], folder: Path) -> dict[str, int]:
    """A bare Python + CTranslate2 process transcribing the clips one after another."""
    model, precision = STREAM_MODEL.rsplit("-", 1)
    ct2 = Ct2Whisper(model, PRECISIONS[precision], intra=1)
    features = folder / "features.npz"
    np.savez(features, *[ct2.features(c.pieces) for c in clips])
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            _CT2_RSS_CHILD,
            str(model_cache_dir() / "asr" / model / "ct2"),
            PRECISIONS[precision],
            str(THREADS),
            str(features),
            json.dumps(ct2.prompt),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- report


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report_rtf(
    repeats: int, measured: dict[tuple[str, str, str, str], Timed], clips: dict[str, Clip]
) -> list[float]:
    print(
        f"\n1. Real-time factor, one caller (processing s / audio s, lower is faster; median of "
        f"{repeats} per clip, {THREADS} threads each; speed = ctranslate2 time ÷ system time "
        "(above 1.00 is faster than ctranslate2)"
    )
    header = (
        f"{'model':<16} {'prec':<4} {'clips':<10} {'audio s':>7} | {'service':>7} {'ct2':>7} "
        f"{'torch':>7} | {'svc speed':>9} {'torch speed':>11} | "
        f"{'WER svc':>7} {'ct2':>5} {'torch':>5}"
    )
    print(header)
    print("-" * len(header))
    speeds = []
    for model in MODELS:
        for precision in PRECISIONS:
            for group_name, group in GROUPS.items():
                row: dict[str, tuple[float, float] | None] = {
                    s: group_rtf(measured, clips, (model, precision, s), group) for s in SYSTEMS
                }
                ct2 = row["ctranslate2"]
                assert ct2 is not None and row["service"] is not None
                svc_speed = ct2[0] / row["service"][0]
                speeds.append(svc_speed)
                torch_row = row["transformers"]
                audio = sum(clips[n].seconds for n in group)
                print(
                    f"{model:<16} {precision:<4} {group_name:<10} {audio:>7.1f} | "
                    f"{row['service'][0]:>7.3f} {ct2[0]:>7.3f} "
                    f"{(f'{torch_row[0]:.3f}' if torch_row else '—'):>7} | "
                    f"{svc_speed:>9.2f} "
                    f"{(f'{ct2[0] / torch_row[0]:.2f}' if torch_row else '—'):>11} | "
                    f"{row['service'][1]:>7.2f} {ct2[1]:>5.2f} "
                    f"{(f'{torch_row[1]:.2f}' if torch_row else '—'):>5}"
                )
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of part 1")
    parser.add_argument(
        "--throughput-repeats", type=int, default=1, help="timed runs of each part 2 system"
    )
    args = parser.parse_args()
    began = time.perf_counter()
    print(f"load average at start: {_load()}  ({os.cpu_count()} cores)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-asr-") as tmp:
        folder = Path(tmp)
        clips = make_clips(folder)
        stream_clips = [clips[f"espeak{i}"] for i in range(6)] + [
            clips["beckett"],
            clips["two_cities"],
        ]
        latency_clips = [clips[f"espeak{i}"] for i in range(len(SENTENCES))]

        print("1. real-time factor …", flush=True)
        measured = measure_rtf(clips, args.repeats)
        load_rtf = _load()

        print("2-4. streaming, latency and memory (base int8 alone) …", flush=True)
        with (
            Mesh(services=("asr",), env=mesh_env([STREAM_MODEL]), log_dir=folder) as mesh,
            RssSampler(mesh["asr"].pid) as rss,
        ):
            rss_idle = psutil.Process(mesh["asr"].pid).memory_info().rss
            with rss.during("throughput"):
                throughput = measure_throughput(
                    mesh["asr"].target, stream_clips, args.throughput_repeats
                )
            load_throughput = _load()
            latency = {}
            for interim, sentence_end in LATENCY_RUNS:
                with rss.during(f"latency interim={interim} end={sentence_end}"):
                    latency[interim, sentence_end] = asyncio.run(
                        measure_latency(mesh["asr"].target, latency_clips, interim, sentence_end)
                    )
            load_latency = _load()
        full_env = {**mesh_env([STREAM_MODEL]), "SPEECHMESH_ASR_STREAM_WINDOW_MARGIN_S": "0"}
        with Mesh(services=("asr",), env=full_env, log_dir=folder) as mesh:
            throughput += measure_throughput(
                mesh["asr"].target,
                stream_clips,
                args.throughput_repeats,
                peers=False,
                label=", 30 s windows",
            )
            full_latency = {
                (interim, sentence_end): asyncio.run(
                    measure_latency(mesh["asr"].target, latency_clips, interim, sentence_end)
                )
                for interim, sentence_end in LATENCY_RUNS
            }
        ct2_memory = ct2_rss(stream_clips, folder)

    # ---- report
    speeds = report_rtf(args.repeats, measured, clips)
    print(f"load average after part 1: {load_rtf}")
    print(
        "WER: word error rate against the text spoken (mean per clip). torch = transformers "
        "PyTorch fp32 (no int8). Peers get the service's ≤30 s pieces of two_cities as one batch."
    )

    audio = sum(c.seconds for c in stream_clips)
    print(
        f"\n2. Throughput, {STREAM_MODEL}, the same {len(stream_clips)} clips "
        f"({audio:.1f} s of audio: 6 espeak sentences, beckett, two_cities); "
        f"audio s per wall s (median of {args.throughput_repeats} after a warm-up on the "
        "short clips); "
        "ratio = ÷ ctranslate2 sequential"
    )
    peer = next(t for t in throughput if t.system.startswith("ctranslate2, sequential"))
    print(
        f"{'system':<44} | {'audio s/s':>9} {'RTF':>6} | {'÷ ct2 seq':>9} | {'windows':>7} "
        f"{'WER':>5}"
    )
    for t in throughput:
        print(
            f"{t.system:<44} | {t.rate:>9.2f} {1 / t.rate:>6.3f} | {t.rate / peer.rate:>9.2f} | "
            f"{t.windows:>7} {t.wer:>5.2f}"
        )
    print(
        "windows: Whisper windows decoded (streams: one per final result, as the voice "
        "detector cut the audio into utterances; the others: the ≤30 s pieces)"
    )
    print(f"load average after part 2: {load_throughput}")

    print(
        f"\n3. Final-result latency after the end of speech, {STREAM_MODEL}, real-time "
        f"100 ms chunks, {len(latency_clips)} espeak sentences (one stream each), "
        f"silence_duration {SILENCE_S} s, sentence_end_silence_duration "
        f"{SENTENCE_END_SILENCE_S} s (the defaults)"
    )
    print(
        f"{'window':<8} {'interim':<7} {'sentence end':<12} | {'p50 ms':>7} {'p95 ms':>7} "
        f"{'max ms':>7} | {'p50 - silence':>13} {'p95 - silence':>13} | {'WER':>5}"
    )
    rows = [(WINDOW, *run, r) for run, r in latency.items()]
    rows += [("30 s", *run, r) for run, r in full_latency.items()]
    for window, interim, sentence_end, (result, errors) in rows:
        silence_ms = (SENTENCE_END_SILENCE_S if sentence_end else SILENCE_S) * 1000
        print(
            f"{window:<8} {'on' if interim else 'off':<7} "
            f"{f'{SENTENCE_END_SILENCE_S:g} s' if sentence_end else 'off':<12} | "
            f"{result.p50_ms:>7.0f} "
            f"{result.percentile(95) * 1000:>7.0f} {max(result.latencies_s) * 1000:>7.0f} | "
            f"{result.p50_ms - silence_ms:>13.0f} "
            f"{result.percentile(95) * 1000 - silence_ms:>13.0f} | {errors:>5.2f}"
        )
    print(
        f"window {WINDOW}: the default (each utterance encoded in its own length plus "
        f"{WINDOW_MARGIN_S:g} s; `make bench-asr-windows` compares margins); 30 s: Whisper's "
        "window, SPEECHMESH_ASR_STREAM_WINDOW_MARGIN_S=0. sentence end: the silence that "
        "ends an utterance whose words end a sentence (all of these do), off = only the full "
        f"{SILENCE_S:g} s; the silence column subtracts the shorter one where it is on"
    )
    print(f"load average after part 3: {load_latency}")

    mib = 1 << 20
    print(f"\n4. Memory, {STREAM_MODEL} alone loaded (RSS, MiB)")
    print(f"  asr service after start-up (idle):           {rss_idle / mib:>7.0f}")
    for phase, peak in rss.peaks.items():
        if phase != "idle":
            print(f"  asr service peak during {phase:<21} {peak / mib:>7.0f}")
    print(f"  asr service peak over the whole run:         {rss.peak / mib:>7.0f}")
    print(
        f"  bare ctranslate2 process: after imports {ct2_memory['imports'] / mib:.0f}, "
        f"model loaded {ct2_memory['loaded'] / mib:.0f} (peak while loading "
        f"{ct2_memory['peak_loading'] / mib:.0f}), peak while transcribing the same 8 clips "
        f"one by one {ct2_memory['peak'] / mib:.0f}"
    )
    print(
        f"  service peak ÷ ct2 peak while transcribing: {rss.peak / ct2_memory['peak']:.2f}; "
        f"service idle ÷ ct2 loaded: {rss_idle / ct2_memory['loaded']:.2f}"
    )

    # ---- goals
    concurrent = throughput[0]
    best_ct2 = max(
        (t for t in throughput if t.system.startswith("ctranslate2")), key=lambda t: t.rate
    )
    threads_ct2 = next(t for t in throughput if "threads" in t.system)
    full_window = throughput[-1]
    p50_off = latency[False, True][0].p50_ms
    print("\nGoals (asr issue)")
    print(
        f"  at least as fast as ctranslate2 single-stream: service speed ÷ ct2 over the "
        f"{len(speeds)} model/precision/clip rows: min {min(speeds):.2f}, median "
        f"{statistics.median(speeds):.2f}, rows ≥ 1.00: {sum(s >= 1 for s in speeds)}/"
        f"{len(speeds)} → {_met(min(speeds) >= 1)} (rows ≥ 0.95, within this machine's noise: "
        f"{sum(s >= 0.95 for s in speeds)}/{len(speeds)})"
    )
    print(
        f"  well ahead under concurrency ({STREAMS} streams): "
        f"{concurrent.rate / threads_ct2.rate:.2f}x ctranslate2 with {STREAMS} threads, "
        f"{concurrent.rate / best_ct2.rate:.2f}x its best ({best_ct2.system}) → "
        f"{_met(concurrent.rate / best_ct2.rate >= 1.2)} (read as ≥ 1.2x the best peer); "
        f"with 30 s windows {full_window.rate / best_ct2.rate:.2f}x"
    )
    print(
        f"  final ≤ 500 ms after speech ends: p50 {p50_off:.0f} ms, p95 "
        f"{latency[False, True][0].percentile(95) * 1000:.0f} ms (interim off) → "
        f"{_met(p50_off <= 500)}; with interim results p50 {latency[True, True][0].p50_ms:.0f} "
        f"ms; waiting for the full {SILENCE_S:g} s silence: p50 "
        f"{latency[False, False][0].p50_ms:.0f} ms; with 30 s windows: p50 "
        f"{full_latency[False, True][0].p50_ms:.0f} ms"
    )
    print(f"\nload average at end: {_load()}; took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
