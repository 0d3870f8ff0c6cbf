"""Calls to one downstream service: deadline propagation, the circuit breaker, and the
mesh's only retries (tenacity: UNAVAILABLE, plus DEADLINE_EXCEEDED for idempotent reads;
full-jitter exponential backoff; a retry budget; never past the caller's deadline)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pybreaker
from prometheus_client import Counter, Histogram
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from services.common.errors import DeadlineExceeded, DownstreamError, Unavailable
from services.common.interceptors import REQUEST_ID_HEADER
from services.common.logs import request_id_var
from services.common.tls import channel_credentials
from services.gateway.breakers import CutShortByDeadline, SharedBreaker
from services.gateway.settings import GatewaySettings

log = logging.getLogger("speechmesh.gateway.downstream")

Response = TypeVar("Response")

call_seconds = Histogram(
    "speechmesh_gateway_downstream_seconds",
    "Downstream call latency, retries included, by downstream, method and final code.",
    ["downstream", "method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
retries_total = Counter(
    "speechmesh_gateway_retries_total", "Retried downstream calls.", ["downstream", "method"]
)
retries_denied = Counter(
    "speechmesh_gateway_retries_denied_total",
    "Retries not made because the retry budget was spent.",
    ["downstream"],
)
breaker_rejections = Counter(
    "speechmesh_gateway_breaker_rejections_total",
    "Calls refused at once because a breaker was open.",
    ["downstream"],
)


# How close to the deadline a cancellation must come to count as the downstream timing out.
_CANCEL_SLACK_S = 0.05
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# Reads may also be retried when an attempt ran out of time: repeating them is harmless.
_IDEMPOTENT_RETRYABLE = _RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}


class RetryBudget:
    """Retries may be at most `ratio` of requests over the last `window_s` (plus a small
    floor so a quiet gateway can still retry): a struggling downstream never sees a retry
    storm multiply its load."""

    def __init__(self, ratio: float, window_s: float = 10.0, floor: int = 3) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.floor = floor
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        for events in (self._requests, self._retries):
            while events and events[0] < now - self.window_s:
                events.popleft()

    def record_request(self) -> None:
        now = time.monotonic()
        self._trim(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        now = time.monotonic()
        self._trim(now)
        if len(self._retries) >= self.floor + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True


class Deadline:
    """The caller's deadline, as a point on the monotonic clock."""

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def from_context(cls, context: Any, default_s: float) -> Deadline:
        remaining = context.time_remaining() if context is not None else None
        return cls(time.monotonic() + (default_s if remaining is None else max(0.0, remaining)))

    def remaining(self) -> float:
        return self.at - time.monotonic()


class StopAtDeadline(stop_base):  # type: ignore[misc]
    """Stops retrying when the backoff would leave no time for another attempt."""

    def __init__(self, deadline: Deadline, margin_s: float) -> None:
        self.deadline = deadline
        self.margin_s = margin_s

    def __call__(self, state: RetryCallState) -> bool:
        wait = state.upcoming_sleep or 0.0
        return self.deadline.remaining() - wait <= self.margin_s


def outgoing_metadata(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call: the request id, so its logs join ours."""
    return ((REQUEST_ID_HEADER, request_id_var.get()), *extra)


class Downstream:
    """One downstream service: its channel, its breaker, and how to call it."""

    def __init__(
        self, name: str, target: str, settings: GatewaySettings, budget: RetryBudget
    ) -> None:
        self.name = name
        self.target = target
        self.settings = settings
        self.budget = budget
        self.breaker = SharedBreaker(name, settings.breaker_fail_max, settings.breaker_reset_s)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            # Fail fast while a downstream is away, so breakers and retries decide.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        credentials = channel_credentials(
            settings.downstream_tls_ca_file,
            settings.downstream_tls_cert_file,
            settings.downstream_tls_key_file,
        )
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if settings.downstream_tls_server_name:
                options.append(
                    ("grpc.ssl_target_name_override", settings.downstream_tls_server_name)
                )
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)

    def _retryable(self, codes: frozenset[grpc.StatusCode]) -> Callable[[BaseException], bool]:
        def retryable(error: BaseException) -> bool:
            if not (isinstance(error, grpc.aio.AioRpcError) and error.code() in codes):
                return False
            if self.budget.try_spend():
                return True
            retries_denied.labels(self.name).inc()
            return False

        return retryable

    async def call(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        deadline: Deadline,
        *,
        idempotent: bool = False,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        """Calls `method` (a stub method of this downstream's channel) within the deadline."""
        name = getattr(method, "_method", b"").decode().rsplit("/", 1)[-1] or "call"
        self.budget.record_request()
        started = time.perf_counter()
        code = "OK"
        retryable_codes = _IDEMPOTENT_RETRYABLE if idempotent else _RETRYABLE
        try:
            try:
                # Most calls succeed first time: tenacity's machinery (~80 µs a call here)
                # only starts once an attempt has failed in a way worth retrying.
                return await self._attempt(method, request, deadline, metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() not in retryable_codes:
                    raise
                first_failure: BaseException | None = error
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(self._retryable(retryable_codes)),
                stop=stop_any(
                    stop_after_attempt(self.settings.retry_max_attempts),
                    StopAtDeadline(deadline, self.settings.deadline_margin_s),
                ),
                wait=wait_random_exponential(
                    multiplier=self.settings.retry_initial_backoff_s,
                    max=self.settings.retry_max_backoff_s,
                ),
                before_sleep=lambda _: retries_total.labels(self.name, name).inc(),
                reraise=True,
            ):
                with attempt:
                    if first_failure is not None:
                        # Replayed as tenacity's first attempt, so the budget, the backoff
                        # and the attempt cap are decided in one place, as for any other.
                        failure, first_failure = first_failure, None
                        raise failure
                    return await self._attempt(method, request, deadline, metadata)
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            raise DownstreamError(self.name, error) from error
        except (Unavailable, DeadlineExceeded) as error:
            code = error.code.name
            raise
        finally:
            call_seconds.labels(self.name, name, code).observe(time.perf_counter() - started)
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        deadline: Deadline,
        metadata: tuple[tuple[str, str], ...],
    ) -> Response:
        timeout = deadline.remaining() - self.settings.deadline_margin_s
        if timeout <= 0:
            raise DeadlineExceeded(
                f"no time left to call {self.name}",
                reason="DEADLINE_EXCEEDED",
                metadata={"downstream": self.name},
            )
        try:
            with self.breaker.breaker.calling():
                try:
                    return await method(
                        request, timeout=timeout, metadata=outgoing_metadata(metadata)
                    )
                except asyncio.CancelledError as cancelled:
                    # The caller's deadline can cancel us a moment before the downstream's
                    # own DEADLINE_EXCEEDED arrives. pybreaker would count the cancellation as
                    # a success, so a frozen downstream would never open its breaker.
                    if deadline.remaining() <= self.settings.deadline_margin_s + _CANCEL_SLACK_S:
                        raise CutShortByDeadline(cancelled) from None
                    raise
        except CutShortByDeadline as passed:
            raise passed.cancelled from None
        except pybreaker.CircuitBreakerError as error:
            raise self._circuit_open() from error

    def _circuit_open(self) -> Unavailable:
        breaker_rejections.labels(self.name).inc()
        return Unavailable(
            f"{self.name} is unavailable (circuit open)",
            reason="CIRCUIT_OPEN",
            retry_after_s=round(self.breaker.retry_after_s(), 3),
            metadata={"downstream": self.name},
        )

    def open_stream(self, method: Callable[..., Any], deadline: Deadline) -> Any:
        """Starts a streaming call through the breaker's open check (streams are not
        retried: half of one may already have been consumed)."""
        if self.breaker.state == pybreaker.STATE_OPEN and self.breaker.retry_after_s() > 0:
            raise self._circuit_open()
        timeout = deadline.remaining() - self.settings.deadline_margin_s
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to call {self.name}", reason="DEADLINE_EXCEEDED")
        return method(timeout=timeout, metadata=outgoing_metadata())

    def record_stream_outcome(self, error: BaseException | None) -> None:
        """Feeds a finished stream's outcome to the breaker."""
        breaker = self.breaker.breaker
        if error is None:
            with breaker.calling():
                return
        # The caller handles the error itself; the breaker only needs to count it.
        with contextlib.suppress(type(error)), breaker.calling():
            raise error

    async def close(self) -> None:
        await self.channel.close(grace=None)
