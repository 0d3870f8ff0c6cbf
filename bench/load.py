"""`make load` and `make soak`: load through the gateway, on the whole mesh as deployed
(redis, auth, asr, mt and gateway, each its own process, started here on loopback ports).

Load (`--concurrency 1 8 32 --duration 20`): for each concurrency, each RPC in turn runs as
a closed loop of that many callers for the duration (then the calls in flight finish, each
within its deadline):

- `text`: TranslateText, one English sentence → Portuguese (200 distinct sentences);
- `speech`: TranslateSpeech, a 3 s espeak-ng English sentence → transcript + Portuguese;
- `stream`: StreamingTranslateSpeech, the same sentence in 100 ms LINEAR16 chunks sent as
  fast as they go, then half-close; latency is the whole stream, to its final result.

Every cache is off unless `--cache` (so each call does the work) and calls are
authenticated with an ADMIN-tier key (no rate limit). Printed and written to
`bench/results/load-<timestamp>.md` (+ `.png`, latency percentiles against concurrency):
calls/s, p50/p95/p99, the error rate by status code, and each service's peak RSS.

Soak (`--soak`, 10 minutes unless `--duration`): one mixed closed loop (text 60%, speech
30%, stream 10%) at `--concurrency` (8); RSS of every service sampled every 0.2 s. Growth
is the peak RSS over the last minute against the peak over the first minute after a warm-up
(the first 10% of the run, at least 30 s): goal < 5% per service; error rate goal < 0.1%.
Written to `bench/results/soak-<timestamp>.md` (+ `.png`, RSS over time, and `.csv`, the
samples).

Bounded: every call has a deadline (`--deadline`), each run a duration and a call cap, and
the mesh is stopped at the end. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench.bench_mt import sentences
from bench.stats import LoadResult
from speechmesh.asr.v1 import asr_pb2
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.speech import ENGLISH, RATE, spoken, wav_bytes
from tools.mesh import Mesh

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN = (("x-api-key", "dev-admin-key"),)
CHUNK_BYTES = 3_200  # 100 ms of 16 kHz LINEAR16
SERVICES = ("auth", "asr", "mt", "gateway")
RPCS = ("text", "speech", "stream")
SOAK_MIX = {"text": 0.6, "speech": 0.3, "stream": 0.1}
RSS_GOAL = 0.05
ERROR_GOAL = 0.001


def mesh_env(cache: bool) -> dict[str, str]:
    env = {
        **{f"SPEECHMESH_{s.upper()}_ACCESS_LOG": "false" for s in SERVICES},
        **{f"SPEECHMESH_{s.upper()}_LOG_LEVEL": "WARNING" for s in SERVICES},
    }
    if not cache:
        env |= {f"SPEECHMESH_{s}_CACHE_TTL_S": "0" for s in ("GATEWAY", "MT", "ASR")}
    return env


def spoken_pcm(folder: Path) -> np.ndarray:
    """The test sentence, spoken by espeak-ng, as 16 kHz mono int16."""
    return np.round(spoken(folder, "spoken", ENGLISH[0]) * 32768).astype(np.int16)


# --- calls -------------------------------------------------------------------------------

Call = Callable[[int, float], Awaitable[object]]


def make_calls(channel: grpc.aio.Channel, metadata: object, pcm: np.ndarray) -> dict[str, Call]:
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(channel)
    texts = sentences()
    wav = wav_bytes(pcm)
    pcm_bytes = pcm.astype("<i2").tobytes()

    def text(index: int, deadline_s: float) -> Awaitable[object]:
        return public.TranslateText(  # type: ignore[no-any-return]
            gateway_pb2.TranslateTextRequest(
                texts=[texts[index % len(texts)]], source_language="en", target_language="pt"
            ),
            metadata=metadata,
            timeout=deadline_s,
        )

    def speech(index: int, deadline_s: float) -> Awaitable[object]:
        return public.TranslateSpeech(  # type: ignore[no-any-return]
            gateway_pb2.TranslateSpeechRequest(
                audio=asr_pb2.Audio(content=wav), target_language="pt"
            ),
            metadata=metadata,
            timeout=deadline_s,
        )

    async def stream(index: int, deadline_s: float) -> object:
        async def requests() -> AsyncIterator[gateway_pb2.StreamingTranslateSpeechRequest]:
            yield gateway_pb2.StreamingTranslateSpeechRequest(
                config=gateway_pb2.StreamingTranslateSpeechConfig(
                    recognition=asr_pb2.StreamingRecognitionConfig(
                        encoding=asr_pb2.AUDIO_ENCODING_LINEAR16,
                        sample_rate_hertz=RATE,
                        language="en",
                    ),
                    target_language="pt",
                )
            )
            for start in range(0, len(pcm_bytes), CHUNK_BYTES):
                yield gateway_pb2.StreamingTranslateSpeechRequest(
                    audio_content=pcm_bytes[start : start + CHUNK_BYTES]
                )

        finals = [
            response
            async for response in public.StreamingTranslateSpeech(
                requests(), metadata=metadata, timeout=deadline_s
            )
            if response.result.is_final
        ]
        if not finals:
            raise RuntimeError("the stream ended without a final result")
        return finals

    return {"text": text, "speech": speech, "stream": stream}


# --- measuring ---------------------------------------------------------------------------


def other_benchmarks() -> list[str]:
    """Other benchmarks running on this machine now (they would skew the figures)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["pid"] != os.getpid() and (
            "bench/bench_" in cmdline or "load.py" in cmdline
        ):
            found.append(cmdline)
    return found


class RssSampler:
    """Samples the resident set of every mesh process in a thread, and notes when another
    benchmark runs beside this one."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval_s = interval_s
        self.series: list[tuple[float, dict[str, int]]] = []
        self.contended: list[tuple[float, str]] = []  # (when, what) another benchmark ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        return {name: p.memory_info().rss for name, p in self.processes.items()}

    def _run(self) -> None:
        checked = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self.series.append((now, self.sample()))
            if now - checked >= 2.0:
                checked = now
                self.contended += [(now, cmdline) for cmdline in other_benchmarks()]
            self._stop.wait(self.interval_s)

    def contention(self, since: float = 0.0, until: float = float("inf")) -> set[str]:
        return {what for when, what in self.contended if since <= when <= until}

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        window = [s for t, s in self.series if since <= t <= until] or [self.sample()]
        return {name: max(s[name] for s in window) for name in self.processes}


@dataclass
class Run:
    rpc: str
    concurrency: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    peak_rss: dict[str, int] = field(default_factory=dict)
    contended: set[str] = field(default_factory=set)  # other benchmarks seen meanwhile
    rss_series: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def ok(self) -> int:
        return self.codes["OK"]

    @property
    def error_rate(self) -> float:
        return 1 - self.ok / self.calls if self.calls else 0.0

    @property
    def result(self) -> LoadResult:
        return LoadResult(self.ok, self.seconds, self.latencies_s or [float("nan")])

    def p(self, percentile: float) -> float:
        return self.result.percentile(percentile) * 1000 if self.latencies_s else float("nan")


async def closed_loop_for(
    calls: dict[str, Call],
    mix: dict[str, float],
    concurrency: int,
    duration_s: float,
    deadline_s: float,
    max_calls: int,
) -> tuple[list[float], Counter[str], float]:
    """`concurrency` callers issue calls (the RPC drawn from `mix`) back to back for
    `duration_s` (or `max_calls`); calls in flight then finish within their deadline.
    Returns the successful calls' latencies, the final status of every call, and the
    seconds from the first call to the last answer."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    counter = itertools.count()
    rng = random.Random(7)
    names, weights = list(mix), list(mix.values())
    started = time.perf_counter()
    stop_at = started + duration_s

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            index = next(counter)
            if index >= max_calls:
                return
            call = calls[rng.choices(names, weights)[0]]
            began = time.perf_counter()
            try:
                async with asyncio.timeout(deadline_s + 5):
                    await call(index, deadline_s)
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
            except TimeoutError:
                codes["HUNG"] += 1
            except Exception as error:  # a wrong answer is an error too, not a crash
                codes[type(error).__name__] += 1
            else:
                codes["OK"] += 1
                latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, codes, time.perf_counter() - started


async def measure_load(
    mesh: Mesh, pcm: np.ndarray, args: argparse.Namespace, sampler: RssSampler
) -> list[Run]:
    runs = []
    async with grpc.aio.insecure_channel(mesh["gateway"].target) as channel:
        created = await gateway_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            gateway_pb2.CreateApiKeyRequest(owner="load", tier=auth_pb2.TIER_ADMIN),
            metadata=ADMIN,
        )
        calls = make_calls(channel, (("x-api-key", created.api_key),), pcm)
        for rpc in args.rpcs:  # warm every path up before anything is measured
            for index in range(3):
                await calls[rpc](index, args.deadline)
        for concurrency in args.concurrency:
            for rpc in args.rpcs:
                began = time.monotonic()
                latencies, codes, seconds = await closed_loop_for(
                    calls, {rpc: 1.0}, concurrency, args.duration, args.deadline, args.max_calls
                )
                run = Run(rpc, concurrency, seconds, latencies, codes)
                run.peak_rss = sampler.peak(began, time.monotonic())
                run.contended = sampler.contention(began, time.monotonic())
                runs.append(run)
                print(row(run), flush=True)
    return runs


async def measure_soak(
    mesh: Mesh, pcm: np.ndarray, args: argparse.Namespace, sampler: RssSampler
) -> Run:
    async with grpc.aio.insecure_channel(mesh["gateway"].target) as channel:
        created = await gateway_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            gateway_pb2.CreateApiKeyRequest(owner="soak", tier=auth_pb2.TIER_ADMIN),
            metadata=ADMIN,
        )
        calls = make_calls(channel, (("x-api-key", created.api_key),), pcm)
        for rpc in RPCS:
            await calls[rpc](0, args.deadline)
        concurrency = args.concurrency[0]
        began = time.monotonic()
        latencies, codes, seconds = await closed_loop_for(
            calls, SOAK_MIX, concurrency, args.duration, args.deadline, args.max_calls
        )
        run = Run("mixed", concurrency, seconds, latencies, codes)
        run.rss_series = [(t - began, s) for t, s in sampler.series if t >= began]
        run.peak_rss = sampler.peak(began)
        run.contended = sampler.contention(began)
        return run


# --- reporting ---------------------------------------------------------------------------

HEADER = (
    f"{'rpc':<7} {'conc':>4} | {'calls':>6} {'calls/s':>8} | {'p50 ms':>8} {'p95 ms':>8} "
    f"{'p99 ms':>8} | {'errors':<18} | peak RSS MiB (auth asr mt gateway)"
)


def _errors(run: Run) -> str:
    failed = {code: n for code, n in run.codes.items() if code != "OK"}
    if not failed:
        return "0%"
    return f"{run.error_rate:.1%} " + ",".join(f"{c}:{n}" for c, n in sorted(failed.items()))


def _mib(values: dict[str, int]) -> str:
    return " ".join(f"{values.get(s, 0) / 2**20:.0f}" for s in SERVICES)


def row(run: Run) -> str:
    return (
        f"{run.rpc:<7} {run.concurrency:>4} | {run.calls:>6} {run.result.rate:>8.2f} | "
        f"{run.p(50):>8.1f} {run.p(95):>8.1f} {run.p(99):>8.1f} | {_errors(run):<18} | "
        f"{_mib(run.peak_rss)}" + ("  (another benchmark ran meanwhile)" if run.contended else "")
    )


def contention_note(runs: list[Run]) -> list[str]:
    seen = set().union(*(run.contended for run in runs))
    if not seen:
        return ["No other benchmark ran on the machine meanwhile."]
    return [
        "**Another benchmark ran on the machine during rows marked `*`; their figures are "
        "skewed:** " + "; ".join(f"`{what}`" for what in sorted(seen))
    ]


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}"


def plot_load(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rpcs = [r for r in RPCS if any(run.rpc == r for run in runs)]
    figure, axes = plt.subplots(1, len(rpcs), figsize=(5 * len(rpcs), 4), squeeze=False)
    for axis, rpc in zip(axes[0], rpcs, strict=True):
        mine = [run for run in runs if run.rpc == rpc]
        levels = [run.concurrency for run in mine]
        for percentile, style in ((50, "o-"), (95, "s--"), (99, "^:")):
            axis.plot(levels, [run.p(percentile) for run in mine], style, label=f"p{percentile}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent callers")
        axis.set_ylabel("latency (ms)")
        rates = ", ".join(f"{run.result.rate:.1f}" for run in mine)
        axis.set_title(f"{rpc}: calls/s {rates}", fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle("speechmesh through the gateway: latency by concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_soak(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    times = [t / 60 for t, _ in run.rss_series]
    for axis, name in zip(axes.flat, SERVICES, strict=True):
        axis.plot(times, [s[name] / 2**20 for _, s in run.rss_series], linewidth=0.8)
        axis.set_title(name, fontsize=10)
        axis.set_ylabel("RSS (MiB)")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("minutes")
    figure.suptitle(f"soak: mixed load at concurrency {run.concurrency}, RSS per service")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_markdown(runs: list[Run], args: argparse.Namespace, png: Path, started: str) -> str:
    lines = [
        f"# Load through the gateway — {started}",
        "",
        f"Machine: {machine()}. Mesh: every service its own process on loopback, default "
        f"models (asr default whisper-base-int8), caches {'on' if args.cache else 'off'}. "
        f"Closed loop, {args.duration:.0f} s per row, deadline {args.deadline:.0f} s per call.",
        "",
        f"Reproduce: `python bench/load.py --concurrency "
        f"{' '.join(map(str, args.concurrency))} --duration {args.duration:g}`",
        "",
        "| rpc | concurrency | calls | calls/s | p50 ms | p95 ms | p99 ms | errors | "
        + " | ".join(f"peak RSS {s} MiB" for s in SERVICES)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(SERVICES),
    ]
    for run in runs:
        lines.append(
            f"| {run.rpc}{'*' if run.contended else ''} | {run.concurrency} | {run.calls} | "
            f"{run.result.rate:.2f} | "
            f"{run.p(50):.1f} | {run.p(95):.1f} | {run.p(99):.1f} | {_errors(run)} | "
            + " | ".join(f"{run.peak_rss.get(s, 0) / 2**20:.0f}" for s in SERVICES)
            + " |"
        )
    lines += ["", *contention_note(runs), "", f"![latency by concurrency]({png.name})", ""]
    return "\n".join(lines)


def soak_growth(run: Run, warmup_s: float, window_s: float) -> dict[str, tuple[int, int, float]]:
    """Per service: the peak RSS over the first `window_s` after the warm-up, the peak over
    the last `window_s`, and the growth between. Peaks, not single samples: asr's RSS swings
    by a few hundred MiB with each batch, so one sample at each end would measure the batch."""
    end = run.rss_series[-1][0]
    first = [s for t, s in run.rss_series if warmup_s <= t <= warmup_s + window_s]
    last = [s for t, s in run.rss_series if t >= end - window_s]
    growth = {}
    for name in SERVICES:
        before, after = max(s[name] for s in first), max(s[name] for s in last)
        growth[name] = (before, after, after / before - 1)
    return growth


def soak_markdown(
    run: Run,
    growth: dict[str, tuple[int, int, float]],
    windows: tuple[float, float],
    args: argparse.Namespace,
    png: Path,
) -> str:
    verdict = "met" if run.error_rate < ERROR_GOAL else "NOT met"
    warmup_s, window_s = windows
    mix = ", ".join(f"{rpc} {share:.0%}" for rpc, share in SOAK_MIX.items())
    lines = [
        f"# Soak — {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"Machine: {machine()}. Mixed closed loop ({mix}) at concurrency {run.concurrency} "
        f"for {run.seconds / 60:.1f} min, caches {'on' if args.cache else 'off'}.",
        "",
        f"Reproduce: `python bench/load.py --soak --duration {args.duration:g} --concurrency "
        f"{run.concurrency}`",
        "",
        f"Calls: {run.calls} ({run.result.rate:.2f}/s), p50 {run.p(50):.0f} ms, p95 "
        f"{run.p(95):.0f} ms, p99 {run.p(99):.0f} ms; error rate {run.error_rate:.3%} "
        f"({_errors(run)}) — goal < {ERROR_GOAL:.1%}: {verdict}.",
        "",
        f"RSS: the peak over the first {window_s:.0f} s after a {warmup_s:.0f} s warm-up, "
        f"against the peak over the last {window_s:.0f} s.",
        "",
        "| service | peak RSS after warm-up MiB | peak RSS at the end MiB | growth | goal < 5% |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (first, last, change) in growth.items():
        lines.append(
            f"| {name} | {first / 2**20:.1f} | {last / 2**20:.1f} | {change:+.2%} | "
            f"{'met' if change < RSS_GOAL else 'NOT met'} |"
        )
    lines += ["", *contention_note([run]), "", f"![RSS over time]({png.name})", ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument("--rpcs", nargs="+", choices=RPCS, default=list(RPCS))
    parser.add_argument("--deadline", type=float, default=120.0, help="per call, seconds")
    parser.add_argument("--max-calls", type=int, default=100_000, help="per run")
    parser.add_argument("--soak", action="store_true", help="one long mixed run (10 min)")
    parser.add_argument("--cache", action="store_true", help="keep the results caches on")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [8] if args.soak else [1, 8, 32]
    if args.duration is None:
        args.duration = 600.0 if args.soak else 20.0
    if not 0 < args.duration <= 3_600 or not all(0 < c <= 256 for c in args.concurrency):
        parser.error("--duration must be in (0, 3600] and --concurrency in (0, 256]")
    return args


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with Mesh`, which stops the children


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    started = dt.datetime.now().isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="speechmesh-load-") as folder:
        pcm = spoken_pcm(Path(folder))
        print(f"{machine()}; starting the mesh...", flush=True)
        with Mesh(env=mesh_env(args.cache), log_dir=Path(folder)) as mesh:
            pids = {name: mesh[name].pid for name in SERVICES}
            with RssSampler(pids) as sampler:
                if args.soak:
                    run = asyncio.run(measure_soak(mesh, pcm, args, sampler))
                else:
                    print(HEADER)
                    print("-" * len(HEADER))
                    runs = asyncio.run(measure_load(mesh, pcm, args, sampler))
    if args.soak:
        warmup_s = max(30.0, 0.1 * args.duration)
        window_s = min(60.0, 0.1 * args.duration)
        growth = soak_growth(run, warmup_s, window_s)
        png = args.out / f"soak-{stamp}.png"
        markdown = args.out / f"soak-{stamp}.md"
        plot_soak(run, png)
        (args.out / f"soak-{stamp}.csv").write_text(
            "seconds,"
            + ",".join(f"{s}_rss_bytes" for s in SERVICES)
            + "\n"
            + "".join(
                f"{t:.2f}," + ",".join(str(sample[s]) for s in SERVICES) + "\n"
                for t, sample in run.rss_series
            )
        )
        markdown.write_text(soak_markdown(run, growth, (warmup_s, window_s), args, png))
        print(row(run))
        for name, (first, last, change) in growth.items():
            print(f"  {name:8} RSS {first / 2**20:8.1f} -> {last / 2**20:8.1f} MiB ({change:+.2%})")
        print(f"  error rate {run.error_rate:.3%} (goal < {ERROR_GOAL:.1%})")
    else:
        png = args.out / f"load-{stamp}.png"
        markdown = args.out / f"load-{stamp}.md"
        plot_load(runs, png)
        markdown.write_text(load_markdown(runs, args, png, started))
    print(f"report: {markdown.relative_to(ROOT) if markdown.is_relative_to(ROOT) else markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
