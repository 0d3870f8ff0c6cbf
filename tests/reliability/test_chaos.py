"""Fault injection under load, on the whole mesh: kill -9 and restart mt, asr and auth;
stop Redis, or freeze it; freeze a downstream (SIGSTOP) past the callers' deadlines; flood
one API key. Closed-loop callers run through each fault and its recovery, every call with a
deadline, and every test asserts:

- nothing is lost: every call issued ends with a result or a status (none hangs past its
  deadline), and the statuses are the ones the fault explains, with ErrorInfo saying why;
- the breakers open while a downstream is away and close again once it is back;
- the mesh recovers by itself; the recovery time is printed.

`make test` runs the quick ones (mt killed and frozen, a flooded key); `make chaos` runs
them all (`-m chaos` selects the slow ones alone).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import random
import signal
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile

from services.common.testing import error_details
from services.gateway.settings import GatewaySettings
from speechmesh.asr.v1 import asr_pb2
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from speechmesh.mt.v1 import mt_pb2, mt_pb2_grpc
from tests.reliability import ADMIN, SERVICES, mesh_env, running_mesh, say
from tools.mesh import Mesh

pytestmark = pytest.mark.models

BREAKER_RESET_S = 1.0
SLACK_S = 0.75  # how far past its deadline a call may end before it counts as hung
# How long the gateway may go on admitting a credential auth accepted before it went away.
LEASE_S = GatewaySettings.model_fields["auth_lease_s"].default
STEADY_S = 1.5  # recovered: this long with nothing but successes
RECOVERY_LIMIT_S = 60.0
CLOSED, OPEN, HALF_OPEN = 0.0, 1.0, 2.0
SENTENCES = (
    "The train to the airport leaves every twenty minutes.",
    "Please send me the report before noon.",
    "We are going for a walk in the park this afternoon.",
    "The museum is closed on Mondays.",
)


# --- the mesh ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    env = mesh_env(
        SPEECHMESH_GATEWAY_BREAKER_FAIL_MAX="3",
        SPEECHMESH_GATEWAY_BREAKER_RESET_S=str(BREAKER_RESET_S),
        SPEECHMESH_GATEWAY_BREAKER_SYNC_INTERVAL_S="0.2",
        SPEECHMESH_GATEWAY_RETRY_MAX_ATTEMPTS="2",
        SPEECHMESH_GATEWAY_HEALTH_INTERVAL_S="0.5",
        **{f"SPEECHMESH_{s.upper()}_LOG_LEVEL": "WARNING" for s in SERVICES},
    )
    with running_mesh(env, tmp_path_factory.mktemp("chaos-logs")) as running:
        yield running


def _alive(mesh: Mesh, name: str) -> bool:
    process = mesh[name].process
    return process is not None and process.poll() is None


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a healthy mesh: whatever an earlier test left dead is restarted, frozen
    is resumed, and the breakers are closed."""
    assert mesh.redis is not None
    if mesh.redis.process is None or mesh.redis.process.poll() is not None:
        mesh.redis.start()
    for name in SERVICES:
        if not _alive(mesh, name):
            mesh[name].start()
            mesh[name].wait_started(180)
        os.kill(mesh[name].pid, signal.SIGCONT)
    async with grpc.aio.insecure_channel(mesh["gateway"].target) as opened:
        admin = gateway_pb2_grpc.AdminServiceStub(opened)
        await admin.ResetCircuitBreakers(
            gateway_pb2.ResetCircuitBreakersRequest(), metadata=ADMIN, timeout=30
        )
        yield opened


@pytest.fixture(scope="module")
def speech(clips: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, clips["en0"], 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def unique_wav(wav: bytes, index: int) -> bytes:
    """The clip with its first four samples made unique, so no cache answers for it."""
    return wav[:44] + index.to_bytes(8, "little") + wav[52:]


# --- load --------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    started: float
    ended: float = 0.0
    code: str = "OK"
    reason: str = ""
    degraded: bool = False  # answered, but a stage was unavailable
    explained: bool = True  # a refusal carrying ErrorInfo (or a deadline, which needs none)

    @property
    def ok(self) -> bool:
        return self.code == "OK" and not self.degraded

    @property
    def seconds(self) -> float:
        return self.ended - self.started


CallFn = Callable[[int, float], Awaitable[Any]]


@dataclass
class Caller:
    call: CallFn
    workers: int
    deadline_s: float
    pause_s: float = 0.0  # between calls (a real client paces itself)
    backoff_s: float = 0.05  # after a refusal


@dataclass
class Load:
    """Closed-loop callers that run until stopped; each call is bounded by its deadline."""

    callers: dict[str, Caller]
    calls: list[Call] = field(default_factory=list)
    issued: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Call indexes make each request unique (no cache may answer it), across loads too.
    _index: Iterator[int] = field(
        default_factory=lambda: itertools.count(random.randrange(1 << 48) << 16)
    )

    async def _worker(self, kind: str, caller: Caller) -> None:
        while not self._stop.is_set():
            self.issued += 1
            record = Call(kind, time.monotonic())
            try:
                async with asyncio.timeout(caller.deadline_s + SLACK_S):
                    response = await caller.call(next(self._index), caller.deadline_s)
                record.degraded = any(
                    s.state == gateway_pb2.STAGE_STATE_UNAVAILABLE
                    for s in getattr(response, "stages", ())
                )
            except TimeoutError:
                record.code = "HUNG"
            except grpc.aio.AioRpcError as error:
                record.code = error.code().name
                info = error_details(error).get("ErrorInfo")
                record.reason = info.reason if info else ""
                record.explained = info is not None or record.code == "DEADLINE_EXCEEDED"
            record.ended = time.monotonic()
            self.calls.append(record)
            await asyncio.sleep(caller.backoff_s if record.code != "OK" else caller.pause_s)

    def start(self) -> Load:
        for kind, caller in self.callers.items():
            for _ in range(caller.workers):
                self._tasks.append(asyncio.create_task(self._worker(kind, caller)))
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def of(self, *kinds: str, since: float = 0.0, until: float = float("inf")) -> list[Call]:
        return [
            c
            for c in self.calls
            if (not kinds or c.kind in kinds) and since <= c.started and c.ended <= until
        ]

    def last_failure(self, kinds: tuple[str, ...]) -> float:
        return max((c.ended for c in self.of(*kinds) if not c.ok), default=0.0)

    async def until_steady(self, kinds: tuple[str, ...], after: float) -> float:
        """Waits until `kinds` have succeeded, and only succeeded, for STEADY_S; returns when
        the first of those successes ended (the moment the mesh had recovered)."""
        limit = time.monotonic() + RECOVERY_LIMIT_S
        while time.monotonic() < limit:
            await asyncio.sleep(0.2)
            failed = max(self.last_failure(kinds), after)
            good = [c for c in self.of(*kinds) if c.started >= failed and c.ok]
            if good and time.monotonic() - failed >= STEADY_S and len(good) >= 3:
                return min(c.ended for c in good)
        raise AssertionError(f"{kinds} did not recover within {RECOVERY_LIMIT_S:.0f}s")

    def summary(self) -> str:
        counts = Counter(
            f"{c.kind}:{c.code}{'(degraded)' if c.degraded else ''}" for c in self.calls
        )
        return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))

    def check(self, allowed: dict[str, set[str]]) -> None:
        """Every call issued ended, in time, with a status the fault explains."""
        assert len(self.calls) == self.issued, "calls were lost"
        for call in self.calls:
            deadline = self.callers[call.kind].deadline_s
            assert call.code != "HUNG", f"a {call.kind} call hung past its deadline"
            assert call.seconds <= deadline + SLACK_S, f"{call.kind} took {call.seconds:.2f}s"
            assert call.code in allowed[call.kind] | {"OK"}, (call, self.summary())
            assert call.explained, f"{call.kind} {call.code} without ErrorInfo"


class Breakers:
    """Samples the gateway's breaker gauges (its metrics port needs no credential)."""

    def __init__(self, mesh: Mesh) -> None:
        self.url = f"http://127.0.0.1:{mesh['gateway'].metrics_port}/metrics"
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task[None] | None = None

    def read(self) -> dict[str, float]:
        states = {}
        for line in urllib.request.urlopen(self.url, timeout=2).read().decode().splitlines():
            if line.startswith("speechmesh_gateway_breaker_state{"):
                name = line.split('downstream="', 1)[1].split('"', 1)[0]
                states[name] = float(line.rsplit(" ", 1)[1])
        return states

    async def _poll(self) -> None:
        while True:
            self.samples.append((time.monotonic(), await asyncio.to_thread(self.read)))
            await asyncio.sleep(0.1)

    def start(self) -> Breakers:
        self._task = asyncio.create_task(self._poll())
        return self

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def opened(self, name: str, since: float) -> float | None:
        """When the breaker was first seen open after `since`."""
        return next((t for t, s in self.samples if t >= since and s.get(name) == OPEN), None)

    async def closes(self, name: str, within_s: float = 10.0) -> None:
        limit = time.monotonic() + within_s
        while self.read().get(name) != CLOSED:
            assert time.monotonic() < limit, f"the {name} breaker stayed {self.read()}"
            await asyncio.sleep(0.1)


def stubs(channel: grpc.aio.Channel) -> gateway_pb2_grpc.SpeechTranslationServiceStub:
    return gateway_pb2_grpc.SpeechTranslationServiceStub(channel)


def text_call(channel: grpc.aio.Channel, metadata: Any) -> CallFn:
    public = stubs(channel)

    def call(index: int, deadline_s: float) -> Awaitable[Any]:
        sentence = SENTENCES[index % len(SENTENCES)]
        return public.TranslateText(
            gateway_pb2.TranslateTextRequest(
                texts=[f"{sentence} Reference {index}."],
                source_language="en",
                target_language="pt",
            ),
            metadata=metadata,
            timeout=deadline_s,
        )

    return call


def speech_call(channel: grpc.aio.Channel, metadata: Any, wav: bytes) -> CallFn:
    public = stubs(channel)

    def call(index: int, deadline_s: float) -> Awaitable[Any]:
        return public.TranslateSpeech(
            gateway_pb2.TranslateSpeechRequest(
                audio=asr_pb2.Audio(content=unique_wav(wav, index)), target_language="pt"
            ),
            metadata=metadata,
            timeout=deadline_s,
        )

    return call


async def user(channel: grpc.aio.Channel, tier: int = auth_pb2.TIER_ADMIN) -> Any:
    created = await gateway_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
        gateway_pb2.CreateApiKeyRequest(owner="chaos", tier=tier),  # type: ignore[arg-type]
        metadata=ADMIN,
        timeout=10,
    )
    return (("x-api-key", created.api_key),)


@dataclass
class Fault:
    """What a fault-injection run measured."""

    name: str
    injected: float
    restored: float
    ready: float
    recovered: float
    load: Load

    def report(self, config: pytest.Config, extra: str = "") -> None:
        say(
            config,
            f"chaos: {self.name}: recovered {self.recovered - self.restored:.2f}s after the "
            f"fault was undone ({self.recovered - self.ready:.2f}s after the service was "
            f"ready; outage {self.recovered - self.injected:.2f}s){extra}; calls: "
            f"{self.load.summary()}",
        )


async def run_fault(
    name: str,
    load: Load,
    inject: Callable[[], None],
    restore: Callable[[], None],
    hold_s: float,
    affected: tuple[str, ...],
) -> Fault:
    """Baseline, fault, hold, undo the fault (and wait for the service), steady recovery."""
    await asyncio.sleep(1.0)
    assert all(c.ok for c in load.calls), f"unhealthy before the fault: {load.summary()}"
    await asyncio.to_thread(inject)
    # Taken once the fault is in: a service answered calls until then (a verdict asked in
    # the thread hop before a SIGSTOP leased calls past injected + LEASE_S, failing a check).
    injected = time.monotonic()
    await asyncio.sleep(hold_s)
    restored = time.monotonic()
    await asyncio.to_thread(restore)
    ready = time.monotonic()
    recovered = await load.until_steady(affected, after=restored)
    await load.stop()
    return Fault(name, injected, restored, ready, recovered, load)


def restart(mesh: Mesh, name: str) -> Callable[[], None]:
    def start() -> None:
        mesh[name].start()
        mesh[name].wait_started(180)

    return start


def fast(calls: list[Call], code: str, within_s: float) -> None:
    """Refusals of a kind a breaker answers came at once."""
    refused = sorted(c.seconds for c in calls if c.code == code)
    if refused:
        assert statistics.median(refused) < within_s, refused


# --- the quick ones (make test) ----------------------------------------------------------


@pytest.mark.timeout(180)
async def test_kill_mt_under_load(
    mesh: Mesh, channel: grpc.aio.Channel, speech: bytes, pytestconfig: pytest.Config
) -> None:
    """Text fails fast (UNAVAILABLE) while mt is away; speech still returns its transcript,
    the mt stage marked unavailable; the mt breaker opens, then closes once mt is back."""
    metadata = await user(channel)
    load = Load(
        {
            "text": Caller(text_call(channel, metadata), workers=2, deadline_s=5),
            "speech": Caller(speech_call(channel, metadata, speech), workers=1, deadline_s=10),
        }
    ).start()
    breakers = Breakers(mesh).start()
    try:
        fault = await run_fault(
            "kill -9 mt",
            load,
            inject=mesh["mt"].kill,
            restore=restart(mesh, "mt"),
            hold_s=1.5,
            affected=("text", "speech"),
        )
        await breakers.closes("mt")
    finally:
        await load.stop()
        await breakers.stop()
    load.check({"text": {"UNAVAILABLE"}, "speech": set()})
    during = load.of(since=fault.injected, until=fault.ready)
    assert any(c.degraded for c in during if c.kind == "speech"), load.summary()
    assert all(
        c.reason in {"MT_ERROR", "CIRCUIT_OPEN", "MODEL_NOT_READY"}
        for c in during
        if c.code != "OK"
    )
    opened = breakers.opened("mt", fault.injected)
    assert opened is not None and opened < fault.ready, "the mt breaker never opened"
    fast(load.of("text", since=opened), "UNAVAILABLE", within_s=0.5)
    fault.report(pytestconfig, f"; mt breaker open {opened - fault.injected:.2f}s after the kill")


@pytest.mark.timeout(180)
async def test_mt_frozen_past_the_callers_deadline(
    mesh: Mesh, channel: grpc.aio.Channel, speech: bytes, pytestconfig: pytest.Config
) -> None:
    """mt stops answering (SIGSTOP), so each call runs into its deadline: text ends at its
    deadline (DEADLINE_EXCEEDED, never later, nothing hangs), speech ends at its deadline or
    with its transcript; nothing gets an answer it should not. SIGCONT: everything recovers.
    (That the breaker opens and makes text fail fast: the test below.)"""
    metadata = await user(channel)
    load = Load(
        {
            "text": Caller(text_call(channel, metadata), workers=2, deadline_s=1.0),
            "speech": Caller(speech_call(channel, metadata, speech), workers=1, deadline_s=4.0),
        }
    ).start()
    breakers = Breakers(mesh).start()
    pid = mesh["mt"].pid
    try:
        fault = await run_fault(
            "SIGSTOP mt past the deadline",
            load,
            inject=lambda: os.kill(pid, signal.SIGSTOP),
            restore=lambda: os.kill(pid, signal.SIGCONT),
            hold_s=4.0,
            affected=("text", "speech"),
        )
        await breakers.closes("mt")
    finally:
        os.kill(pid, signal.SIGCONT)
        await load.stop()
        await breakers.stop()
    load.check({"text": {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, "speech": {"DEADLINE_EXCEEDED"}})
    during = load.of(since=fault.injected, until=fault.restored)
    assert any(c.code == "DEADLINE_EXCEEDED" for c in during if c.kind == "text")
    assert not any(c.ok and c.kind == "text" for c in during), "mt answered while frozen?"
    opened = breakers.opened("mt", fault.injected)
    fault.report(
        pytestconfig,
        "; mt breaker "
        + ("never opened" if opened is None else f"open {opened - fault.injected:.2f}s in"),
    )


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_a_frozen_downstream_opens_its_breaker(mesh: Mesh, channel: grpc.aio.Channel) -> None:
    metadata = await user(channel)
    load = Load({"text": Caller(text_call(channel, metadata), workers=2, deadline_s=1.0)}).start()
    breakers = Breakers(mesh).start()
    pid = mesh["mt"].pid
    try:
        fault = await run_fault(
            "SIGSTOP mt",
            load,
            inject=lambda: os.kill(pid, signal.SIGSTOP),
            restore=lambda: os.kill(pid, signal.SIGCONT),
            hold_s=5.0,
            affected=("text",),
        )
    finally:
        os.kill(pid, signal.SIGCONT)
        await load.stop()
        await breakers.stop()
    opened = breakers.opened("mt", fault.injected)
    assert opened is not None and opened < fault.restored, "the mt breaker never opened"
    fast(load.of("text", since=opened + 0.2, until=fault.restored), "UNAVAILABLE", within_s=0.3)


@pytest.mark.timeout(120)
async def test_flooding_one_key_leaves_the_others_alone(
    mesh: Mesh, channel: grpc.aio.Channel, pytestconfig: pytest.Config
) -> None:
    """A free key hammered by 8 callers gets its 10 calls a minute and then
    RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure; another key's translations all
    succeed meanwhile, at about their usual latency."""
    flooder = await user(channel, auth_pb2.TIER_FREE)
    victim = await user(channel, auth_pb2.TIER_ENTERPRISE)
    public = stubs(channel)

    def flood(index: int, deadline_s: float) -> Awaitable[Any]:
        return public.ListLanguages(
            gateway_pb2.ListLanguagesRequest(), metadata=flooder, timeout=deadline_s
        )

    victim_caller = Caller(text_call(channel, victim), workers=2, deadline_s=5, pause_s=0.05)
    alone = Load({"victim": victim_caller}).start()
    await asyncio.sleep(2.0)
    await alone.stop()
    flooded = Load(
        {
            "victim": victim_caller,
            "flood": Caller(flood, workers=8, deadline_s=5, backoff_s=0.0),
        }
    ).start()
    await asyncio.sleep(3.0)
    await flooded.stop()
    flooded.check({"victim": set(), "flood": {"RESOURCE_EXHAUSTED"}})
    floods = flooded.of("flood")
    assert sum(c.code == "OK" for c in floods) == 10, flooded.summary()
    assert {c.reason for c in floods if c.code != "OK"} == {"RATE_LIMITED"}
    before = statistics.median(c.seconds for c in alone.calls) * 1000
    during = statistics.median(c.seconds for c in flooded.of("victim")) * 1000
    say(
        pytestconfig,
        f"chaos: flooded key: {len(floods)} calls in 3s ({len(floods) - 10} refused); "
        f"the other key: {len(flooded.of('victim'))} calls, all OK, p50 {before:.0f} ms "
        f"alone -> {during:.0f} ms during the flood",
    )
    assert during < max(4 * before, before + 150), (before, during)
    # The refusal tells the flooder what to do.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flood(0, 5)
    details = error_details(caught.value)
    assert details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    assert details["QuotaFailure"].violations


@pytest.mark.timeout(120)
async def test_a_starting_mt_refuses_calls_as_unavailable(
    mesh: Mesh, channel: grpc.aio.Channel
) -> None:
    mesh["mt"].kill()
    mesh["mt"].start()
    codes: Counter[str] = Counter()
    try:
        # Reconnect at once, and let each call wait for the port: the calls must reach mt in
        # the window between its port opening and its models being loaded.
        options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]
        async with grpc.aio.insecure_channel(mesh["mt"].target, options=options) as direct:
            stub = mt_pb2_grpc.MtServiceStub(direct)
            limit = time.monotonic() + 90
            while codes["OK"] < 3 and time.monotonic() < limit:
                try:
                    await stub.Translate(
                        mt_pb2.TranslateRequest(
                            texts=["Good morning."], source_language="en", target_language="pt"
                        ),
                        timeout=5,
                        wait_for_ready=True,
                    )
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                await asyncio.sleep(0.02)
    finally:
        mesh["mt"].wait_started(120)
    assert codes["OK"] == 3, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


# --- the slow ones (make chaos) ----------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_kill_asr_under_load(
    mesh: Mesh, channel: grpc.aio.Channel, speech: bytes, pytestconfig: pytest.Config
) -> None:
    """Speech fails fast (UNAVAILABLE) while asr is away; text is untouched; the asr breaker
    opens, then closes once asr is back."""
    metadata = await user(channel)
    load = Load(
        {
            "text": Caller(text_call(channel, metadata), workers=1, deadline_s=5),
            "speech": Caller(speech_call(channel, metadata, speech), workers=2, deadline_s=10),
        }
    ).start()
    breakers = Breakers(mesh).start()
    try:
        fault = await run_fault(
            "kill -9 asr",
            load,
            inject=mesh["asr"].kill,
            restore=restart(mesh, "asr"),
            hold_s=1.5,
            affected=("speech",),
        )
        await breakers.closes("asr")
    finally:
        await load.stop()
        await breakers.stop()
    load.check({"text": set(), "speech": {"UNAVAILABLE"}})
    failed = [c for c in load.of("speech") if c.code != "OK"]
    assert failed and {c.reason for c in failed} <= {"ASR_ERROR", "CIRCUIT_OPEN"}
    opened = breakers.opened("asr", fault.injected)
    assert opened is not None and opened < fault.ready, "the asr breaker never opened"
    fast(load.of("speech", since=opened), "UNAVAILABLE", within_s=0.5)
    fault.report(pytestconfig, f"; asr breaker open {opened - fault.injected:.2f}s after the kill")


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_kill_auth_under_load(
    mesh: Mesh, channel: grpc.aio.Channel, pytestconfig: pytest.Config
) -> None:
    """Without auth nothing gets through (UNAVAILABLE, fail closed) once the leases of
    auth's last verdicts have run out; with auth back, everything works again."""
    metadata = await user(channel)
    load = Load({"text": Caller(text_call(channel, metadata), workers=3, deadline_s=5)}).start()
    breakers = Breakers(mesh).start()
    killed = 0.0

    def kill() -> None:
        nonlocal killed
        mesh["auth"].kill()
        killed = time.monotonic()

    try:
        fault = await run_fault(
            "kill -9 auth",
            load,
            inject=kill,
            restore=restart(mesh, "auth"),
            hold_s=2.0,
            affected=("text",),
        )
        await breakers.closes("auth")
    finally:
        await load.stop()
        await breakers.stop()
    load.check({"text": {"UNAVAILABLE"}})
    locked_out = load.of(since=killed + LEASE_S, until=fault.restored)
    assert locked_out and not any(c.ok for c in locked_out), "a call got in without auth"
    assert breakers.opened("auth", fault.injected) is not None, "the auth breaker never opened"
    fault.report(pytestconfig, f"; {len(locked_out)} calls refused while auth was dead")


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_redis_stopped_under_load(
    mesh: Mesh, channel: grpc.aio.Channel, speech: bytes, pytestconfig: pytest.Config
) -> None:
    """Without Redis auth cannot check a key, so it lets nothing through (UNAVAILABLE with
    RetryInfo); caches only miss. Redis back (its data on disk), everything works again."""
    assert mesh.redis is not None
    redis = mesh.redis
    metadata = await user(channel)
    load = Load(
        {
            "text": Caller(text_call(channel, metadata), workers=2, deadline_s=5),
            "speech": Caller(speech_call(channel, metadata, speech), workers=1, deadline_s=10),
        }
    ).start()
    try:
        fault = await run_fault(
            "Redis stopped",
            load,
            inject=redis.stop,
            restore=redis.start,
            hold_s=2.0,
            affected=("text", "speech"),
        )
    finally:
        await load.stop()
    load.check({"text": {"UNAVAILABLE"}, "speech": {"UNAVAILABLE"}})
    # The gateway admits calls on auth's leased verdicts for up to LEASE_S after them.
    during = load.of(since=fault.injected + LEASE_S, until=fault.restored)
    assert during and not any(c.ok for c in during), "a call got in without Redis"
    assert {c.reason for c in during} <= {"AUTH_STORE_UNAVAILABLE", "AUTH_ERROR", "CIRCUIT_OPEN"}, {
        c.reason for c in during
    }
    fault.report(pytestconfig)


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_redis_frozen_under_load(
    mesh: Mesh, channel: grpc.aio.Channel, pytestconfig: pytest.Config
) -> None:
    """Redis frozen (SIGSTOP: connections open, no answers): calls end at auth's Redis
    timeout or their own deadline, never hang, never get through; SIGCONT: recovered."""
    assert mesh.redis is not None
    redis = mesh.redis
    metadata = await user(channel)
    load = Load({"text": Caller(text_call(channel, metadata), workers=3, deadline_s=3)}).start()
    try:
        fault = await run_fault(
            "Redis frozen (SIGSTOP)",
            load,
            inject=redis.pause,
            restore=redis.resume,
            # Long enough for calls asked after the leases ran out to end (at their 3 s
            # deadline) while Redis is still frozen.
            hold_s=6.0,
            affected=("text",),
        )
    finally:
        redis.resume()
        await load.stop()
    load.check({"text": {"UNAVAILABLE", "DEADLINE_EXCEEDED"}})
    # The gateway admits calls on auth's leased verdicts for up to LEASE_S after them.
    during = load.of(since=fault.injected + LEASE_S, until=fault.restored)
    assert during and not any(c.ok for c in during), "a call got in without Redis"
    fault.report(pytestconfig)


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_asr_frozen_past_the_callers_deadline(
    mesh: Mesh, channel: grpc.aio.Channel, speech: bytes, pytestconfig: pytest.Config
) -> None:
    """asr stops answering: speech ends at its deadline (never later); text is untouched;
    SIGCONT: recovered."""
    metadata = await user(channel)
    load = Load(
        {
            "text": Caller(text_call(channel, metadata), workers=1, deadline_s=5),
            "speech": Caller(speech_call(channel, metadata, speech), workers=2, deadline_s=2.0),
        }
    ).start()
    breakers = Breakers(mesh).start()
    pid = mesh["asr"].pid
    try:
        fault = await run_fault(
            "SIGSTOP asr past the deadline",
            load,
            inject=lambda: os.kill(pid, signal.SIGSTOP),
            restore=lambda: os.kill(pid, signal.SIGCONT),
            hold_s=5.0,
            affected=("speech",),
        )
        await breakers.closes("asr")
    finally:
        os.kill(pid, signal.SIGCONT)
        await load.stop()
        await breakers.stop()
    load.check({"text": set(), "speech": {"DEADLINE_EXCEEDED", "UNAVAILABLE"}})
    during = load.of("speech", since=fault.injected + 0.5, until=fault.restored)
    assert during and not any(c.ok for c in during), "asr answered while frozen?"
    opened = breakers.opened("asr", fault.injected)  # see test_a_frozen_downstream_opens...
    fault.report(
        pytestconfig,
        "; asr breaker "
        + ("never opened" if opened is None else f"open {opened - fault.injected:.2f}s in"),
    )


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_auth_frozen_past_the_callers_deadline(
    mesh: Mesh, channel: grpc.aio.Channel, pytestconfig: pytest.Config
) -> None:
    """auth stops answering: once the leases of its last verdicts have run out, every call
    ends by its deadline without getting in; SIGCONT: recovered."""
    metadata = await user(channel)
    load = Load({"text": Caller(text_call(channel, metadata), workers=3, deadline_s=1.5)}).start()
    breakers = Breakers(mesh).start()
    pid = mesh["auth"].pid
    try:
        fault = await run_fault(
            "SIGSTOP auth past the deadline",
            load,
            inject=lambda: os.kill(pid, signal.SIGSTOP),
            restore=lambda: os.kill(pid, signal.SIGCONT),
            # A caller's first call after the leases end may start up to one deadline later
            # and must end before the restore to be judged: 1 + 1.5 + 1.5 s, with room.
            hold_s=5.0,
            affected=("text",),
        )
        await breakers.closes("auth")
    finally:
        os.kill(pid, signal.SIGCONT)
        await load.stop()
        await breakers.stop()
    load.check({"text": {"DEADLINE_EXCEEDED", "UNAVAILABLE"}})
    during = load.of(since=fault.injected + LEASE_S, until=fault.restored)
    assert during and not any(c.ok for c in during), "a call got in without auth"
    opened = breakers.opened("auth", fault.injected)  # see test_a_frozen_downstream_opens...
    fault.report(
        pytestconfig,
        "; auth breaker "
        + ("never opened" if opened is None else f"open {opened - fault.injected:.2f}s in"),
    )
