"""Every public call is authorized by the auth service; no answer leaves without its verdict.

The credential (`x-api-key` or `authorization: Bearer`) goes to AuthService/Authenticate
with the method being called and a cost of one request. Auth's refusals reach the caller
as auth gave them (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED with RetryInfo
and QuotaFailure); auth being unreachable is UNAVAILABLE — never a call let through.

A round trip to auth on every call costs as much as the gateway's own work, and auth's CPU
as much again on the same machines. So auth's verdict is *leased*: once auth has admitted a
credential for a unary method of the public service, further calls with it to that method
are admitted here for `lease_s`, as far as the quota auth last reported goes, and their cost
is charged to auth in one batch every `charge_interval_s`. A charge is also a fresh verdict,
so a spent quota or a revoked key ends the lease at the next charge; a revocation also ends
it at once through auth's announcement on Redis. What a lease risks is bounded: a replica
never admits more than the quota auth told it was left, and a revoked credential gets at
most the calls of one charge interval (or of `lease_s`, if the announcement was lost).
Admin calls (side effects) and streams always authenticate first, as does every call when
`lease_s` is 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import Counter
from redis.asyncio import Redis

from services.common.credentials import REVOKED_KEYS_CHANNEL, credentials_from_metadata
from services.common.errors import DeadlineExceeded, DownstreamError, Unauthenticated, Unavailable
from services.common.interceptors import INFRASTRUCTURE_PREFIXES, Scope, WrappingInterceptor
from services.common.tasks import stop_tasks
from services.gateway.downstream import Deadline, Downstream
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2

log = logging.getLogger("speechmesh.gateway.authn")

REMAINING_MINUTE_HEADER = "x-ratelimit-remaining-minute"
REMAINING_DAY_HEADER = "x-ratelimit-remaining-day"
PUBLIC_SERVICE_PREFIX = (
    "/" + gateway_pb2.DESCRIPTOR.services_by_name["SpeechTranslationService"].full_name + "/"
)
# Auth refuses a larger cost in one call.
MAX_CHARGE = 1000
# A charge is small; one that takes longer than this is auth being away.
CHARGE_DEADLINE_S = 2.0
# A lease whose charge failed was verified "never": it admits nothing until auth answers.
_NEVER = float("-inf")
# Codes that mean auth could not answer, as opposed to auth saying no.
_AUTH_AWAY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)

leased_total = Counter(
    "speechmesh_gateway_auth_leased_total",
    "Calls admitted on a lease of auth's verdict, without a round trip to auth.",
)
charges_total = Counter(
    "speechmesh_gateway_auth_lease_charges_total",
    "Batched charges of leased calls to auth, by outcome (charged; refused: the lease ended"
    " and its calls went uncharged; failed: auth unreachable, charged later).",
    ["outcome"],
)
_CHARGED, _REFUSED, _FAILED = (charges_total.labels(o) for o in ("charged", "refused", "failed"))

Credential = tuple[str, str, str]  # api key, token, method


@dataclass(slots=True)
class Lease:
    """Auth's last verdict on one credential for one method, and the calls admitted since."""

    credential: Credential
    key_id: str
    verified_at: float  # monotonic time the verdict was asked for
    answered_at: float  # and when it came back
    quota: auth_pb2.Quota  # as auth reported it with that verdict
    pending: int = 0  # admitted here, not yet charged
    charging: int = 0  # in the charge now on its way to auth
    charge: asyncio.Task[None] | None = None

    def spent(self) -> int:
        """Calls admitted here that auth's last report does not include."""
        return self.pending + self.charging

    def left(self) -> int | None:
        """Calls the quota still allows as far as this replica knows; None: no limit."""
        limits = [
            remaining
            for limit, remaining in (
                (self.quota.minute_limit, self.quota.minute_remaining),
                (self.quota.day_limit, self.quota.day_remaining),
            )
            if limit
        ]
        return min(limits) - self.spent() if limits else None

    def observe(self, quota: auth_pb2.Quota, asked_at: float) -> None:
        """Takes in a verdict auth has just given on this credential."""
        if asked_at < self.answered_at:
            # Asked before the verdict held came back: auth may have judged it first, so
            # keep the lower of each count (counts only fall within a verdict's flight).
            quota = auth_pb2.Quota(
                minute_limit=quota.minute_limit,
                minute_remaining=min(quota.minute_remaining, self.quota.minute_remaining),
                day_limit=quota.day_limit,
                day_remaining=min(quota.day_remaining, self.quota.day_remaining),
            )
        self.quota = quota
        self.verified_at = max(self.verified_at, asked_at)
        self.answered_at = time.monotonic()


def quota_trailers(quota: auth_pb2.Quota, spent: int = 0) -> tuple[tuple[str, str], ...]:
    """The remaining quota for the caller's trailing metadata, less `spent` calls auth has
    not counted yet."""
    trailing = []
    if quota.minute_limit:
        trailing.append((REMAINING_MINUTE_HEADER, str(max(0, quota.minute_remaining - spent))))
    if quota.day_limit:
        trailing.append((REMAINING_DAY_HEADER, str(max(0, quota.day_remaining - spent))))
    return tuple(trailing)


class Leases:
    """The leases this replica holds, bounded: at capacity, new verdicts are not leased."""

    def __init__(self, lease_s: float, capacity: int = 10_000) -> None:
        self.lease_s = lease_s
        self.capacity = capacity
        self._leases: dict[Credential, Lease] = {}
        # Calls waiting for auth's verdict, by credential: auth may charge them after the
        # verdict a lease holds, so a lease leaves room for them.
        self._asking: collections.Counter[Credential] = collections.Counter()

    def get(self, credential: Credential) -> Lease | None:
        return self._leases.get(credential)

    def admit(self, credential: Credential) -> Lease | None:
        """The lease that admits one more call with this credential, or None: ask auth."""
        lease = self._leases.get(credential)
        if lease is None or time.monotonic() - lease.verified_at > self.lease_s:
            return None
        left = lease.left()
        if left is not None and left - self._asking[credential] <= 0:
            return None
        lease.pending += 1
        return lease

    @contextlib.contextmanager
    def asking(self, credential: Credential) -> Iterator[None]:
        """Entered while a call with `credential` waits for auth's verdict."""
        self._asking[credential] += 1
        try:
            yield
        finally:
            self._asking[credential] -= 1
            if not self._asking[credential]:
                del self._asking[credential]

    def grant(
        self, credential: Credential, response: auth_pb2.AuthenticateResponse, asked_at: float
    ) -> None:
        lease = self._leases.get(credential)
        if lease is not None:
            lease.observe(response.quota, asked_at)
        elif self.lease_s and len(self._leases) < self.capacity:
            self._leases[credential] = Lease(
                credential, response.principal.key_id, asked_at, time.monotonic(), response.quota
            )

    def drop(self, lease: Lease) -> None:
        if self._leases.get(lease.credential) is lease:
            del self._leases[lease.credential]

    def revoke(self, key_id: str) -> None:
        for lease in [lease for lease in self._leases.values() if lease.key_id == key_id]:
            self.drop(lease)

    def sweep(self) -> list[Lease]:
        """Forgets expired leases with nothing left to charge; returns those with calls to
        charge and no charge under way."""
        now, due = time.monotonic(), []
        for lease in list(self._leases.values()):
            if lease.pending and lease.charge is None:
                due.append(lease)
            elif not lease.spent() and now - lease.verified_at > self.lease_s:
                del self._leases[lease.credential]
        return due

    def all(self) -> list[Lease]:
        return list(self._leases.values())


class _AuthScope:
    __slots__ = ("context", "interceptor", "leasable", "method")

    def __init__(
        self, interceptor: AuthenticationInterceptor, method: str, leasable: bool, context: Any
    ) -> None:
        self.interceptor = interceptor
        self.method = method
        self.leasable = leasable
        self.context = context

    async def __aenter__(self) -> None:
        api_key, token = credentials_from_metadata(self.context.invocation_metadata())
        if not api_key and not token:
            raise Unauthenticated(
                "no credential: send x-api-key or authorization: Bearer <token>",
                reason="CREDENTIALS_MISSING",
            )
        interceptor, credential = self.interceptor, (api_key, token, self.method)
        if self.leasable:
            lease = interceptor.leases.admit(credential)
            if lease is not None:
                leased_total.inc()
                self.context.set_trailing_metadata(quota_trailers(lease.quota, lease.spent()))
                return
            lease = interceptor.leases.get(credential)
            if lease is not None and lease.spent():
                # Auth must count what the lease admitted before it judges one more call.
                await interceptor.settle(lease)
        asked_at = time.monotonic()
        leases = interceptor.leases
        with leases.asking(credential) if self.leasable else contextlib.nullcontext():
            response = await interceptor.auth.call(
                interceptor.stub.Authenticate,
                auth_pb2.AuthenticateRequest(
                    api_key=api_key, token=token, method=self.method, cost=1
                ),
                Deadline.from_context(self.context, interceptor.default_deadline_s),
            )
        if self.leasable:
            leases.grant(credential, response, asked_at)
        if trailing := quota_trailers(response.quota):
            self.context.set_trailing_metadata(trailing)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


class AuthenticationInterceptor(WrappingInterceptor):
    def __init__(
        self,
        auth: Downstream,
        redis: Redis,
        default_deadline_s: float,
        lease_s: float,
        charge_interval_s: float,
    ) -> None:
        super().__init__()
        self.auth = auth
        self.redis = redis
        self.stub = auth_pb2_grpc.AuthServiceStub(auth.channel)
        self.default_deadline_s = default_deadline_s
        self.charge_interval_s = charge_interval_s
        self.leases = Leases(lease_s)
        self._tasks: list[asyncio.Task[None]] = []

    def scope_for(self, method: str, handler: grpc.RpcMethodHandler) -> Scope | None:
        if method.startswith(INFRASTRUCTURE_PREFIXES):
            return None  # probes and grpcurl's reflection need no credential
        # Only calls without side effects beyond their answer, answered once: unary, public.
        leasable = (
            self.leases.lease_s > 0
            and method.startswith(PUBLIC_SERVICE_PREFIX)
            and not handler.request_streaming
            and not handler.response_streaming
        )
        return lambda context: _AuthScope(self, method, leasable, context)

    async def start(self) -> None:
        if self.leases.lease_s:
            self._tasks = [
                asyncio.create_task(self._charge_periodically()),
                asyncio.create_task(self._follow_revocations()),
            ]

    async def stop(self) -> None:
        """Stops leasing, then charges what the leases admitted (auth permitting), all at
        once: shutdown waits CHARGE_DEADLINE_S at most, however many leases there are."""
        await stop_tasks(*self._tasks)
        self.leases.lease_s = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CHARGE_DEADLINE_S):
                await asyncio.gather(
                    *(self.settle(lease) for lease in self.leases.all()), return_exceptions=True
                )

    async def settle(self, lease: Lease) -> None:
        """Charges what `lease` admitted, so that auth counts it before it judges another
        call. Best effort: if auth cannot be reached, the call it was to judge says so."""
        while lease.charge is not None or lease.pending:
            # One caller giving up must not cancel the charge.
            await asyncio.shield(self._charging(lease))
            if self.leases.get(lease.credential) is not lease or lease.verified_at == _NEVER:
                return

    def _charging(self, lease: Lease) -> asyncio.Task[None]:
        """The charge of `lease` under way, started if there is none."""
        if lease.charge is None:
            lease.charge = asyncio.create_task(self._charge(lease))
        return lease.charge

    async def _charge(self, lease: Lease) -> None:
        count = min(lease.pending, MAX_CHARGE)
        lease.pending -= count
        lease.charging = count
        api_key, token, method = lease.credential
        asked_at = time.monotonic()
        try:
            response = await self.auth.call(
                self.stub.Authenticate,
                auth_pb2.AuthenticateRequest(
                    api_key=api_key, token=token, method=method, cost=count
                ),
                Deadline(asked_at + CHARGE_DEADLINE_S),
            )
        except (DownstreamError, Unavailable, DeadlineExceeded) as error:
            if isinstance(error, DownstreamError) and error.code not in _AUTH_AWAY:
                _REFUSED.inc()
                log.warning(
                    "lease ended: auth refused its charge",
                    extra={"key_id": lease.key_id, "calls": count, "code": error.code.name},
                )
                self.leases.drop(lease)
            else:
                _FAILED.inc()
                lease.pending += count  # charged at the next try
                lease.verified_at = _NEVER  # and nothing more admitted until then
        else:
            _CHARGED.inc()
            lease.observe(response.quota, asked_at)
        finally:
            lease.charging = 0
            lease.charge = None

    async def _charge_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.charge_interval_s)
            for lease in self.leases.sweep():
                self._charging(lease)

    async def _follow_revocations(self) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(REVOKED_KEYS_CHANNEL)
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self.leases.revoke(message["data"].decode())
            except Exception:  # Redis away, or anything else: this loop must not die
                # Missed announcements only delay a revocation to the end of its leases.
                log.warning("cannot follow key revocations; retrying", exc_info=True)
                await asyncio.sleep(1.0)
