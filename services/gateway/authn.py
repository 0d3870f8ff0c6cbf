"""Every public call is authenticated through the auth service before its handler runs.

The credential (`x-api-key` or `authorization: Bearer`) goes to AuthService/Authenticate
with the method being called and a cost of one request. Auth's refusals reach the caller
as auth gave them (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED with RetryInfo
and QuotaFailure); auth being unreachable is UNAVAILABLE — never a call let through.
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import Any

import grpc

from services.common.credentials import credentials_from_metadata
from services.common.errors import Unauthenticated
from services.common.interceptors import INFRASTRUCTURE_PREFIXES, Scope, WrappingInterceptor
from services.gateway.downstream import Deadline, Downstream
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc

principal_var: contextvars.ContextVar[auth_pb2.Principal | None] = contextvars.ContextVar(
    "principal", default=None
)

REMAINING_MINUTE_HEADER = "x-ratelimit-remaining-minute"
REMAINING_DAY_HEADER = "x-ratelimit-remaining-day"


class _AuthScope:
    __slots__ = ("context", "interceptor", "method", "token")

    def __init__(self, interceptor: AuthenticationInterceptor, method: str, context: Any) -> None:
        self.interceptor = interceptor
        self.method = method
        self.context = context

    async def __aenter__(self) -> None:
        api_key, token = credentials_from_metadata(self.context.invocation_metadata())
        if not api_key and not token:
            raise Unauthenticated(
                "no credential: send x-api-key or authorization: Bearer <token>",
                reason="CREDENTIALS_MISSING",
            )
        interceptor = self.interceptor
        response = await interceptor.auth.call(
            interceptor.stub.Authenticate,
            auth_pb2.AuthenticateRequest(api_key=api_key, token=token, method=self.method, cost=1),
            Deadline.from_context(self.context, interceptor.default_deadline_s),
        )
        quota = response.quota
        trailing = []
        if quota.minute_limit:
            trailing.append((REMAINING_MINUTE_HEADER, str(quota.minute_remaining)))
        if quota.day_limit:
            trailing.append((REMAINING_DAY_HEADER, str(quota.day_remaining)))
        if trailing:
            self.context.set_trailing_metadata(tuple(trailing))
        self.token = principal_var.set(response.principal)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        principal_var.reset(self.token)


class AuthenticationInterceptor(WrappingInterceptor):
    def __init__(self, auth: Downstream, default_deadline_s: float) -> None:
        super().__init__()
        self.auth = auth
        self.stub = auth_pb2_grpc.AuthServiceStub(auth.channel)
        self.default_deadline_s = default_deadline_s

    def scope_for(self, method: str, handler: grpc.RpcMethodHandler) -> Scope | None:
        if method.startswith(INFRASTRUCTURE_PREFIXES):
            return None  # probes and grpcurl's reflection need no credential
        return lambda context: _AuthScope(self, method, context)
