"""Every public call is authenticated through the auth service; no answer leaves without it.

The credential (`x-api-key` or `authorization: Bearer`) goes to AuthService/Authenticate
with the method being called and a cost of one request. Auth's refusals reach the caller
as auth gave them (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED with RetryInfo
and QuotaFailure); auth being unreachable is UNAVAILABLE — never a call let through.

Auth is a network hop, and waiting for it before the handler starts puts its whole round
trip on every call. So a unary call of the public service whose credential auth accepted
a moment ago (and that had quota left then) runs its handler *while* auth checks it: the
answer still waits for auth's verdict, and a refusal replaces whatever the handler made.
What this risks is bounded work, never an answer: a revoked credential or a spent quota
costs at most the calls already in flight, because the refusal drops the credential back
to authenticate-first. Admin calls and streams (which answer before they end) always
authenticate first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import Counter

from services.common.credentials import credentials_from_metadata
from services.common.errors import Unauthenticated
from services.common.interceptors import INFRASTRUCTURE_PREFIXES, Scope, WrappingInterceptor
from services.gateway.downstream import Deadline, Downstream
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2

REMAINING_MINUTE_HEADER = "x-ratelimit-remaining-minute"
REMAINING_DAY_HEADER = "x-ratelimit-remaining-day"
PUBLIC_SERVICE_PREFIX = (
    "/" + gateway_pb2.DESCRIPTOR.services_by_name["SpeechTranslationService"].full_name + "/"
)

overlapped_total = Counter(
    "speechmesh_gateway_auth_overlapped_total",
    "Calls whose handler ran while auth checked them, by auth's verdict.",
    ["verdict"],
)
_ADMITTED = overlapped_total.labels("admitted")
_REFUSED = overlapped_total.labels("refused")


def _fingerprint(api_key: str, token: str) -> bytes:
    # Only a digest is kept between calls, not the secret itself.
    return hashlib.blake2b(f"{api_key}\0{token}".encode(), digest_size=16).digest()


async def _after_the_handler_starts(
    verdict: Awaitable[auth_pb2.AuthenticateResponse],
) -> auth_pb2.AuthenticateResponse:
    # One turn of the loop lets the handler send its downstream request first: auth's
    # answer comes back long before the handler's work is done, so it waits either way.
    await asyncio.sleep(0)
    return await verdict


class RecentAdmissions:
    """Credentials auth accepted lately, with how many more calls their quota allowed then.

    Bounded (least recently admitted dropped first); an entry expires after `window_s`.
    """

    def __init__(self, window_s: float, capacity: int = 10_000) -> None:
        self.window_s = window_s
        self.capacity = capacity
        # fingerprint -> (admitted at, calls that may still overlap; None = no limit)
        self._entries: collections.OrderedDict[bytes, tuple[float, int | None]] = (
            collections.OrderedDict()
        )

    def take(self, fingerprint: bytes) -> bool:
        """True when a call with this credential may overlap auth; spends one allowance."""
        entry = self._entries.get(fingerprint)
        if entry is None:
            return False
        admitted_at, allowance = entry
        if time.monotonic() - admitted_at > self.window_s or allowance == 0:
            del self._entries[fingerprint]
            return False
        if allowance is not None:
            self._entries[fingerprint] = (admitted_at, allowance - 1)
        return True

    def admitted(self, fingerprint: bytes, quota: auth_pb2.Quota) -> None:
        if not self.window_s:
            return  # overlapping is off: nothing will ever be taken
        limits = [
            remaining
            for limit, remaining in (
                (quota.minute_limit, quota.minute_remaining),
                (quota.day_limit, quota.day_remaining),
            )
            if limit
        ]
        self._entries[fingerprint] = (time.monotonic(), min(limits) if limits else None)
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def refused(self, fingerprint: bytes) -> None:
        self._entries.pop(fingerprint, None)


class _AuthScope:
    __slots__ = ("context", "fingerprint", "interceptor", "method", "overlappable", "pending")

    def __init__(
        self,
        interceptor: AuthenticationInterceptor,
        method: str,
        overlappable: bool,
        context: Any,
    ) -> None:
        self.interceptor = interceptor
        self.method = method
        self.overlappable = overlappable
        self.context = context
        self.pending: asyncio.Future[auth_pb2.AuthenticateResponse] | None = None

    async def __aenter__(self) -> None:
        api_key, token = credentials_from_metadata(self.context.invocation_metadata())
        if not api_key and not token:
            raise Unauthenticated(
                "no credential: send x-api-key or authorization: Bearer <token>",
                reason="CREDENTIALS_MISSING",
            )
        interceptor = self.interceptor
        self.fingerprint = _fingerprint(api_key, token)
        verdict: Awaitable[auth_pb2.AuthenticateResponse] = interceptor.auth.call(
            interceptor.stub.Authenticate,
            auth_pb2.AuthenticateRequest(api_key=api_key, token=token, method=self.method, cost=1),
            Deadline.from_context(self.context, interceptor.default_deadline_s),
        )
        if self.overlappable and interceptor.admissions.take(self.fingerprint):
            self.pending = asyncio.ensure_future(_after_the_handler_starts(verdict))
            return
        self._admit(await self._judged(verdict))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        pending = self.pending
        if pending is None:
            return
        if isinstance(exc, asyncio.CancelledError):
            pending.cancel()  # the caller has gone: nobody waits for the verdict
            with contextlib.suppress(BaseException):
                await pending
            return
        try:
            response = await self._judged(pending)
        except BaseException:
            _REFUSED.inc()
            raise  # auth's refusal replaces whatever the handler answered
        _ADMITTED.inc()
        self._admit(response)

    async def _judged(
        self, verdict: Awaitable[auth_pb2.AuthenticateResponse]
    ) -> auth_pb2.AuthenticateResponse:
        try:
            return await verdict
        except Exception:
            self.interceptor.admissions.refused(self.fingerprint)
            raise

    def _admit(self, response: auth_pb2.AuthenticateResponse) -> None:
        quota = response.quota
        self.interceptor.admissions.admitted(self.fingerprint, quota)
        trailing = []
        if quota.minute_limit:
            trailing.append((REMAINING_MINUTE_HEADER, str(quota.minute_remaining)))
        if quota.day_limit:
            trailing.append((REMAINING_DAY_HEADER, str(quota.day_remaining)))
        if trailing:
            self.context.set_trailing_metadata(tuple(trailing))


class AuthenticationInterceptor(WrappingInterceptor):
    def __init__(
        self, auth: Downstream, default_deadline_s: float, overlap_window_s: float
    ) -> None:
        super().__init__()
        self.auth = auth
        self.stub = auth_pb2_grpc.AuthServiceStub(auth.channel)
        self.default_deadline_s = default_deadline_s
        self.admissions = RecentAdmissions(overlap_window_s)

    def scope_for(self, method: str, handler: grpc.RpcMethodHandler) -> Scope | None:
        if method.startswith(INFRASTRUCTURE_PREFIXES):
            return None  # probes and grpcurl's reflection need no credential
        # Only answers that can be withheld until auth's verdict: unary, public, read-only.
        overlappable = (
            self.admissions.window_s > 0
            and method.startswith(PUBLIC_SERVICE_PREFIX)
            and not handler.request_streaming
            and not handler.response_streaming
        )
        return lambda context: _AuthScope(self, method, overlappable, context)
